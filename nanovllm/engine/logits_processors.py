"""Per-row edits of a step's logits before sampling, in vLLM V1's order: the min_tokens mask
(stop ids and EOS), logit_bias, the repetition penalty, then frequency and presence penalties.
They change the argmax, so they apply to greedy rows too. `xp` is the array module of the logits.

Token masks (a grammar, allowed_token_ids, bad_words) were applied before, by the model runner.
The min_tokens mask never empties a row: where a mask left only stop tokens (a grammar that
allows nothing but EOS), the grammar wins and the row keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """One row of logits: a sequence that needs its next token."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: np.random.Generator | None  # None: the sampler's shared generator
    eos_token_ids: Sequence[int]


def penalized(xp, logits, rows: list[SamplingRow]):
    """float32 logits after min_tokens masking and penalties; a copy only if a row needs one."""
    masked = [i for i, row in enumerate(rows) if _below_min_tokens(row)]
    biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
    repeated = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    counted = [i for i, row in enumerate(rows) if _has_count_penalty(row.params)]
    if not (masked or biased or repeated or counted):
        return xp.asarray(logits, dtype=xp.float32)
    x = xp.array(logits, dtype=xp.float32)  # never write into the caller's logits
    if masked:
        _mask_stop_tokens(xp, x, rows, masked)
    if biased:
        apply_logit_bias(xp, x, biased, [rows[i].params.logit_bias for i in biased])
    if repeated:
        _apply_repetition_penalty(xp, x, rows, repeated)
    if counted:
        _apply_count_penalties(xp, x, rows, counted)
    return x


def _mask_stop_tokens(xp, x, rows: list[SamplingRow], masked: list[int]) -> None:
    # vLLM masks EOS here even with ignore_eos: its min_tokens set always holds the EOS ids.
    vocab = x.shape[1]
    pairs = [
        (i, t)
        for i in masked
        for t in {*rows[i].params.stop_token_ids, *rows[i].eos_token_ids}
        if t < vocab  # an id outside the vocabulary can never be sampled anyway
    ]
    if not pairs:
        return
    row_idx, token_idx = np.array(pairs, dtype=np.int64).T
    index = (xp.asarray(row_idx), xp.asarray(token_idx))
    kept = x[index]
    x[index] = -np.inf
    # A row that a token mask (a grammar that allows only EOS) had narrowed to stop tokens would
    # now allow nothing: the mask wins there, and the row keeps them.
    rows = np.unique(row_idx)
    alive = np.asarray(_to_host((x[xp.asarray(rows)] > -np.inf).any(axis=1)))
    emptied = np.isin(row_idx, rows[~alive])
    if emptied.any():
        restore = xp.asarray(np.flatnonzero(emptied))
        x[index[0][restore], index[1][restore]] = kept[restore]


def apply_logit_bias(xp, x, row_ids: Sequence[int], biases: Sequence[dict[int, float]]):
    """Add each listed row's bias (token id -> value, OpenAI's logit_bias) to x, in place."""
    flat_rows, cols, values = [], [], []
    for row, bias in zip(row_ids, biases, strict=True):
        flat_rows.extend([row] * len(bias))
        cols.extend(bias)
        values.extend(bias.values())
    # (row, token) pairs are distinct, so a fancy-indexed += adds each bias exactly once.
    x[xp.asarray(flat_rows), xp.asarray(cols)] += xp.asarray(values, dtype=x.dtype)
    return x


def _apply_repetition_penalty(xp, x, rows: list[SamplingRow], repeated: list[int]) -> None:
    """Over prompt and output tokens: divide positive logits by the penalty, multiply negative."""
    tokens = [rows[i].prompt_token_ids for i in repeated] + [
        rows[i].output_token_ids for i in repeated
    ]
    flat = _flat_index(xp, x, repeated + repeated, tokens)
    penalty = column(xp, rows, "repetition_penalty")[flat // x.shape[1]]
    # A token seen twice is written twice with the same value: no need to deduplicate.
    seen = x.reshape(-1)[flat]
    x.reshape(-1)[flat] = xp.where(seen > 0, seen / penalty, seen * penalty)


def _apply_count_penalties(xp, x, rows: list[SamplingRow], counted: list[int]) -> None:
    """Over output tokens: logit -= frequency * count + presence * (count > 0)."""
    tokens = [rows[i].output_token_ids for i in counted]
    flat, counts = xp.unique(_flat_index(xp, x, counted, tokens), return_counts=True)
    row = flat // x.shape[1]
    frequency = column(xp, rows, "frequency_penalty")[row]
    presence = column(xp, rows, "presence_penalty")[row]
    x.reshape(-1)[flat] -= frequency * counts.astype(xp.float32) + presence


def _flat_index(xp, x, row_ids: list[int], tokens: list[Sequence[int]]):
    """Indices into x.reshape(-1) of (row, token) for every token of every listed row."""
    token_ids = [np.asarray(seq, dtype=np.int64) for seq in tokens]
    row_of = np.repeat(np.asarray(row_ids, dtype=np.int64), [len(t) for t in token_ids])
    return xp.asarray(row_of * x.shape[1] + np.concatenate(token_ids))


def _to_host(array) -> np.ndarray:
    return array.get() if hasattr(array, "get") else array


def column(xp, rows: list[SamplingRow], name: str):
    return xp.asarray([getattr(row.params, name) for row in rows], dtype=xp.float32)


def _below_min_tokens(row: SamplingRow) -> bool:
    return len(row.output_token_ids) < row.params.min_tokens


def _has_count_penalty(params: SamplingParams) -> bool:
    return params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
