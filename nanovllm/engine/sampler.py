"""Sampler: turns one step's batch of next-token logits into token ids, as vLLM V1 does.

Per row, in this order: min_tokens mask (stop ids and EOS) -> repetition penalty ->
frequency/presence penalties -> greedy rows take the argmax here -> temperature -> min_p ->
top_k -> top_p -> one inverse-CDF draw with one uniform from the row's generator.
Logprobs come from the raw logits (vLLM V1's default `raw_logprobs`).

Everything is vectorized over the batch; `xp` is the array module (NumPy now, CuPy later).
Random numbers always come from NumPy generators on the host, one uniform per sampled row, so a
seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nanovllm.sampling_params import SamplingParams

# Width of the blocks in the two-level running-sum search (see _search_cdf).
_BLOCK = 256
# How many of a row's best tokens are sorted first when looking for its top_p nucleus.
_NUCLEUS_CANDIDATES = 2048


@dataclass(slots=True)
class SamplingRow:
    """One row of logits: a sequence that needs its next token."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: np.random.Generator | None  # None: the sampler's shared generator
    eos_token_ids: Sequence[int]


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int  # the sampled token
    logprob: float
    rank: int  # 1 = most likely; tokens tied with it count as better (vLLM)
    top: list[tuple[int, float]]  # params.logprobs most likely (id, logprob), best first


@dataclass(slots=True)
class SampleOutput:
    token_ids: np.ndarray  # [B] int64
    logprobs: list[TokenLogprobs | None]


def request_generator(params: SamplingParams) -> np.random.Generator | None:
    """The generator a seeded request keeps for its whole life (None: use the shared one)."""
    return None if params.seed is None else np.random.default_rng(params.seed)


class Sampler:
    def __init__(self, seed: int = 0, xp=np) -> None:
        self.generator = np.random.default_rng(seed)  # for rows without their own
        self.xp = xp

    def __call__(self, logits, rows: list[SamplingRow]) -> SampleOutput:
        xp = self.xp
        x = self._penalized(logits, rows)
        greedy = np.array([row.params.greedy for row in rows], dtype=bool)
        if greedy.all():  # nothing random: no temperature, no sort, no draw
            token_ids = x.argmax(axis=1).astype(xp.int64)
        else:
            token_ids = xp.empty(len(rows), dtype=xp.int64)
            picked = np.flatnonzero(greedy)
            if len(picked):
                token_ids[picked] = x[picked].argmax(axis=1)
            drawn = np.flatnonzero(~greedy)
            sub = [rows[i] for i in drawn]
            token_ids[drawn] = self._draw(self._weights(_take(x, drawn), sub), sub)
        token_ids = _to_host(token_ids)
        return SampleOutput(token_ids, self.logprobs(logits, token_ids, rows))

    def probs(self, logits, rows: list[SamplingRow]):
        """The distribution each row samples from, [B, V] float32; greedy rows are one-hot."""
        xp = self.xp
        x = self._penalized(logits, rows)
        out = xp.zeros(x.shape, dtype=xp.float32)
        greedy = np.array([row.params.greedy for row in rows], dtype=bool)
        picked = np.flatnonzero(greedy)
        if len(picked):
            out[picked, x[picked].argmax(axis=1)] = 1.0
        drawn = np.flatnonzero(~greedy)
        if len(drawn):
            weights = self._weights(_take(x, drawn), [rows[i] for i in drawn])
            out[drawn] = weights / weights.sum(axis=1, keepdims=True)
        return out

    def sample_from_probs(self, probs, rows: list[SamplingRow]) -> np.ndarray:
        """One token per row by inverse CDF, drawing exactly one uniform from each row's generator."""
        return _to_host(self._draw(self.xp.asarray(probs), rows))

    # --- penalties (change the argmax, so they apply to greedy rows too) ---

    def _penalized(self, logits, rows: list[SamplingRow]):
        """float32 logits after min_tokens masking and penalties; a copy only if a row needs one."""
        xp = self.xp
        masked = [i for i, row in enumerate(rows) if _below_min_tokens(row)]
        repeated = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
        counted = [i for i, row in enumerate(rows) if _has_count_penalty(row.params)]
        if not (masked or repeated or counted):
            return xp.asarray(logits, dtype=xp.float32)
        x = xp.array(logits, dtype=xp.float32)  # never write into the caller's logits
        if masked:
            self._mask_stop_tokens(x, rows, masked)
        if repeated:
            self._apply_repetition_penalty(x, rows, repeated)
        if counted:
            self._apply_count_penalties(x, rows, counted)
        return x

    def _mask_stop_tokens(self, x, rows: list[SamplingRow], masked: list[int]) -> None:
        # vLLM masks EOS here even with ignore_eos: its min_tokens set always holds the EOS ids.
        vocab = x.shape[1]
        pairs = [
            (i, t)
            for i in masked
            for t in {*rows[i].params.stop_token_ids, *rows[i].eos_token_ids}
            if t < vocab  # an id outside the vocabulary can never be sampled anyway
        ]
        if pairs:
            row_idx, token_idx = np.array(pairs, dtype=np.int64).T
            x[self.xp.asarray(row_idx), self.xp.asarray(token_idx)] = -np.inf

    def _apply_repetition_penalty(self, x, rows: list[SamplingRow], repeated: list[int]) -> None:
        """Over prompt and output tokens: divide positive logits by the penalty, multiply negative."""
        xp = self.xp
        tokens = [rows[i].prompt_token_ids for i in repeated] + [
            rows[i].output_token_ids for i in repeated
        ]
        flat = self._flat_index(x, repeated + repeated, tokens)
        penalty = self._column(rows, "repetition_penalty")[flat // x.shape[1]]
        # A token seen twice is written twice with the same value: no need to deduplicate.
        seen = x.reshape(-1)[flat]
        x.reshape(-1)[flat] = xp.where(seen > 0, seen / penalty, seen * penalty)

    def _apply_count_penalties(self, x, rows: list[SamplingRow], counted: list[int]) -> None:
        """Over output tokens: logit -= frequency * count + presence * (count > 0)."""
        xp = self.xp
        tokens = [rows[i].output_token_ids for i in counted]
        flat, counts = xp.unique(self._flat_index(x, counted, tokens), return_counts=True)
        row = flat // x.shape[1]
        frequency = self._column(rows, "frequency_penalty")[row]
        presence = self._column(rows, "presence_penalty")[row]
        x.reshape(-1)[flat] -= frequency * counts.astype(xp.float32) + presence

    def _flat_index(self, x, row_ids: list[int], tokens: list[Sequence[int]]):
        """Indices into x.reshape(-1) of (row, token) for every token of every listed row."""
        token_ids = [np.asarray(seq, dtype=np.int64) for seq in tokens]
        row_of = np.repeat(np.asarray(row_ids, dtype=np.int64), [len(t) for t in token_ids])
        return self.xp.asarray(row_of * x.shape[1] + np.concatenate(token_ids))

    def _column(self, rows: list[SamplingRow], name: str):
        return self.xp.asarray([getattr(row.params, name) for row in rows], dtype=self.xp.float32)

    # --- the random path ---

    def _weights(self, x, rows: list[SamplingRow]):
        """Unnormalised probabilities after temperature, min_p, top_k and top_p (zero = removed)."""
        xp = self.xp
        x = x / self._column(rows, "temperature")[:, None]
        top = x.max(axis=1)
        weights = x - top[:, None]
        xp.exp(weights, out=weights)
        floor = self._truncation_floor(x, top, weights, rows)
        if bool(xp.isfinite(floor).any()):
            # A multiply by the mask: a masked assignment mispredicts branches and is 3x slower.
            weights *= x >= floor[:, None]
        return weights

    def _truncation_floor(self, x, top, weights, rows: list[SamplingRow]):
        """Per row, the smallest logit that survives min_p, then top_k, then top_p."""
        xp = self.xp
        vocab = x.shape[1]
        min_p = np.array([row.params.min_p for row in rows])
        log_min_p = np.full(len(rows), -np.inf, dtype=np.float32)
        log_min_p[min_p > 0] = np.log(min_p[min_p > 0])
        # min_p keeps p >= min_p * p_max, i.e. logit >= top + log(min_p).
        floor = top + xp.asarray(log_min_p)
        top_k = np.array([min(row.params.effective_top_k, vocab) for row in rows])
        top_p = np.array([row.params.top_p for row in rows])
        with_k = np.flatnonzero(top_k > 0)
        if len(with_k):
            floor[with_k] = self._top_k_floor(
                _take(x, with_k), top[with_k], floor[with_k], top_k[with_k], top_p[with_k]
            )
        p_only = np.flatnonzero((top_k == 0) & (top_p < 1.0))
        if len(p_only):
            floor[p_only] = self._top_p_floor(
                _take(x, p_only), top[p_only], floor[p_only], top_p[p_only], _take(weights, p_only)
            )
        return floor

    def _top_k_floor(self, x, top, floor, top_k: np.ndarray, top_p: np.ndarray):
        """top_k, then top_p within the k survivors: only each row's k best logits are sorted."""
        xp = self.xp
        best = _largest_sorted(xp, x, int(top_k.max()))
        floor = xp.maximum(floor, best[xp.arange(len(best)), xp.asarray(top_k - 1)])
        if (top_p < 1.0).any():
            cutoff, _ = self._nucleus_cutoff(best, top, floor, top_p, total=None)
            floor = xp.maximum(floor, cutoff)
        return floor

    def _top_p_floor(self, x, top, floor, top_p: np.ndarray, weights):
        """top_p over the whole vocabulary, sorting the full rows only when the nucleus is large.

        The nucleus is nearly always among a row's best few thousand tokens, and finding those
        (a partition) costs a third of a full sort.
        """
        xp = self.xp
        kept = weights * (x >= floor[:, None]) if bool(xp.isfinite(floor).any()) else weights
        total = kept.sum(axis=1, dtype=xp.float64)  # mass of what min_p left, for renormalising
        width = min(x.shape[1], _NUCLEUS_CANDIDATES)
        best = _largest_sorted(xp, x, width)
        cutoff, found = self._nucleus_cutoff(best, top, floor, top_p, total)
        missed = np.flatnonzero(~_to_host(found))
        if len(missed):
            best = _largest_sorted(xp, x[missed], x.shape[1])
            cutoff[missed] = self._nucleus_cutoff(
                best, top[missed], floor[missed], top_p[missed], total[missed]
            )[0]
        return xp.maximum(floor, cutoff)

    def _nucleus_cutoff(self, best, top, floor, top_p: np.ndarray, total):
        """The smallest logit of the smallest set whose mass reaches top_p of total.

        best: each row's largest logits, sorted; total: the row's whole mass (None: that of
        best). Also says per row whether the set lies within best.
        """
        xp = self.xp
        mass = xp.exp(best - top[:, None])
        mass *= best >= floor[:, None]  # top_p sees only what min_p and top_k left
        if total is None:
            total = mass.sum(axis=1, dtype=xp.float64)
        top_p = xp.asarray(top_p)
        # The first index where the running sum is >= top_p * total.
        last = _search_cdf(xp, mass, top_p, strict=False, total=total)
        cutoff = xp.where(top_p < 1.0, best[xp.arange(len(best)), last], -np.inf)
        found = mass.sum(axis=1, dtype=xp.float64) >= top_p * total
        return cutoff.astype(xp.float32), found

    def _draw(self, weights, rows: list[SamplingRow]):
        return _search_cdf(self.xp, weights, self.xp.asarray(self._uniforms(rows)), strict=True)

    def _uniforms(self, rows: list[SamplingRow]) -> np.ndarray:
        """One uniform per row: seeded rows from their own generator, the rest from the shared one."""
        u = np.empty(len(rows))
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        u[shared] = self.generator.random(len(shared))
        for i, row in enumerate(rows):
            if row.generator is not None:
                u[i] = row.generator.random()
        return u

    # --- logprobs ---

    def logprobs(self, logits, token_ids: np.ndarray, rows: list[SamplingRow]):
        """Raw-logit logprobs of the sampled token and of each row's top params.logprobs tokens."""
        want = np.array([i for i, row in enumerate(rows) if row.params.logprobs is not None])
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if not len(want):
            return out
        xp = self.xp
        x = _take(xp.asarray(logits, dtype=xp.float32), want)
        top = x.max(axis=1, keepdims=True)
        log_total = top + xp.log(xp.exp(x - top).sum(axis=1, keepdims=True))
        chosen = x[xp.arange(len(want)), xp.asarray(token_ids[want])]
        # Ranks compare raw logits: same order as logprobs, without rounding that merges values.
        ranks = _to_host((x >= chosen[:, None]).sum(axis=1))  # vLLM counts ties as better
        chosen = _to_host(chosen - log_total[:, 0])
        n = min(max(rows[i].params.logprobs for i in want), x.shape[1])
        top_ids = _largest_ids(xp, x, n)
        top_lp = _to_host(xp.take_along_axis(x, top_ids, axis=1) - log_total)
        top_ids = _to_host(top_ids)
        for j, i in enumerate(want):
            k = rows[i].params.logprobs
            top = [(int(t), float(v)) for t, v in zip(top_ids[j, :k], top_lp[j, :k], strict=True)]
            out[i] = TokenLogprobs(int(token_ids[i]), float(chosen[j]), int(ranks[j]), top)
        return out


def _below_min_tokens(row: SamplingRow) -> bool:
    return len(row.output_token_ids) < row.params.min_tokens


def _has_count_penalty(params: SamplingParams) -> bool:
    return params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _take(x, idx: np.ndarray):
    """x[idx] along rows, without the copy when idx is every row in order."""
    return x if len(idx) == len(x) else x[idx]


def _to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _largest_sorted(xp, x, n: int):
    """Each row's n largest values, largest first."""
    if n < x.shape[1]:
        x = xp.partition(x, x.shape[1] - n, axis=1)[:, x.shape[1] - n :]
    # Contiguous, because the passes that follow are ~3x slower over a reversed view.
    return xp.ascontiguousarray(xp.sort(x, axis=1)[:, ::-1])


def _largest_ids(xp, x, n: int):
    """Each row's n largest ids, largest value first."""
    if n == 0:
        return xp.zeros((len(x), 0), dtype=xp.int64)
    ids = xp.argpartition(x, x.shape[1] - n, axis=1)[:, x.shape[1] - n :]
    order = xp.argsort(-xp.take_along_axis(x, ids, axis=1), axis=1, kind="stable")
    return xp.take_along_axis(ids, order, axis=1)


def _search_cdf(xp, weights, fraction, strict: bool, total=None):
    """Per row, the first index where the running sum of weights passes fraction * total.

    total defaults to the row's own sum. strict: the running sum must exceed the target
    (inverse-CDF sampling; a zero-weight index is never chosen); otherwise reaching it is enough
    (the top_p cutoff). Two levels, block sums and then a running sum inside the one block holding
    the answer, because a full-width cumsum is the slowest pass over a [B, V] array (~8x a sum).
    """
    rows, width = weights.shape
    cum = xp.cumsum(_block_sums(xp, weights), axis=1)
    target = fraction * (cum[:, -1] if total is None else total)
    block = xp.minimum(_count_before(cum, target, strict), cum.shape[1] - 1)
    start = xp.where(block > 0, cum[xp.arange(rows), block - 1], 0.0)
    cols = block[:, None] * _BLOCK + xp.arange(_BLOCK)
    inside = xp.take_along_axis(weights, xp.minimum(cols, width - 1), axis=1) * (cols < width)
    running = start[:, None] + xp.cumsum(inside, axis=1, dtype=xp.float64)
    offset = _count_before(running, target, strict)
    # Rounding between the two levels can put the target past the block's end: take the block's
    # last nonzero weight then, never a zero-weight index.
    last = _BLOCK - 1 - xp.argmax(inside[:, ::-1] > 0, axis=1)
    return xp.minimum(block * _BLOCK + xp.minimum(offset, last), width - 1)


def _block_sums(xp, weights):
    rows, width = weights.shape
    full = width // _BLOCK * _BLOCK
    blocks = weights[:, :full].reshape(rows, full // _BLOCK, _BLOCK)
    sums = [blocks.sum(axis=2, dtype=xp.float64)]
    if full < width:
        sums.append(weights[:, full:].sum(axis=1, keepdims=True, dtype=xp.float64))
    return xp.concatenate(sums, axis=1)


def _count_before(cum, target, strict: bool):
    """How many running sums come before the one that passes target (> if strict, else >=)."""
    target = target[:, None]
    return ((cum <= target) if strict else (cum < target)).sum(axis=1)
