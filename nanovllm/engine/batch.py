"""Sequences into model inputs: the flat batch of a step and the sampler's rows.

The batch is flat: the new tokens of every scheduled sequence (prefill chunks, decodes and
speculative verification runs alike) are concatenated; AttentionMetadata tells the attention op
where each sequence's queries start and how long its cached context is. Only the rows that need
a next-token distribution go through the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field

import numpy as np

from nanovllm.backends.base import AttentionInputs, slot_of, slots_of
from nanovllm.engine.logits_processors import SamplingRow
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import Proposal, ScheduledSeq


@dataclass(slots=True)
class ForwardItem:
    """Tokens of one sequence to run from position `start`; the last `num_logits` need logits
    to sample from, the `num_prompt_logits` rows before them score the prompt's next tokens."""

    seq: Sequence
    start: int
    token_ids: list[int]
    num_logits: int
    proposal: Proposal | None = None  # guesses verified in this item (its last len + 1 rows)
    num_prompt_logits: int = 0

    @property
    def prompt_targets(self) -> list[int]:
        """The prompt tokens its prompt rows score: row p predicts the token at p + 1."""
        first = self.start + 1
        return self.seq.token_ids[first : first + self.num_prompt_logits]

    @property
    def num_proposed(self) -> int:
        return 0 if self.proposal is None else len(self.proposal.token_ids)


def forward_item(item: ScheduledSeq, proposal: Proposal | None) -> ForwardItem:
    """What to run for a scheduled sequence: its next known tokens, or with a proposal its last
    token followed by the guesses (each of the k + 1 positions needs logits)."""
    seq, start = item.seq, item.seq.num_computed_tokens
    token_ids = seq.token_ids
    if proposal is not None:
        tokens = [token_ids[-1], *proposal.token_ids]
        return ForwardItem(seq, start, tokens, len(tokens), proposal)
    end = min(start + item.num_tokens, len(token_ids))
    num_logits = 1 if end == len(token_ids) else 0
    # Every other row of a prefill chunk scores a prompt token when the request asked for it.
    scored = end - start - num_logits if seq.wants_prompt_logprobs else 0
    return ForwardItem(seq, start, token_ids[start:end], num_logits, num_prompt_logits=scored)


@dataclass(slots=True)
class StepInputs:
    input_ids: np.ndarray
    positions: np.ndarray
    attention: AttentionInputs
    logits_rows: np.ndarray  # flat-batch rows that go through the LM head to be sampled
    # flat-batch rows whose logits score prompt tokens (requests that asked for prompt_logprobs)
    prompt_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def prepare(items: list[ForwardItem], block_size: int) -> StepInputs:
    """The flat batch of a step, on the host."""
    ids, positions, slots = [], [], []
    query_start, context_lens, logits_rows, prompt_rows = [0], [], [], []
    for item in items:
        start, end = item.start, item.start + len(item.token_ids)
        ids.extend(item.token_ids)
        table = item.seq.block_table
        if end - start == 1:  # a decode: plain ints are far cheaper than tiny arrays
            positions.append(start)
            slots.append(slot_of(table, start, block_size))
        else:
            pos = np.arange(start, end)
            positions.extend(pos.tolist())
            slots.extend(slots_of(table, pos, block_size).tolist())
        query_start.append(query_start[-1] + end - start)
        context_lens.append(end)
        logits_rows.extend(range(query_start[-1] - item.num_logits, query_start[-1]))
        prompt_rows.extend(range(query_start[-2], query_start[-2] + item.num_prompt_logits))
    return StepInputs(
        input_ids=np.asarray(ids, dtype=np.int64),
        positions=np.asarray(positions, dtype=np.int64),
        attention=AttentionInputs.from_lists(
            slots, block_tables([item.seq.block_table for item in items]), query_start, context_lens
        ),
        logits_rows=np.asarray(logits_rows, dtype=np.int64),
        prompt_rows=np.asarray(prompt_rows, dtype=np.int64),
    )


def block_tables(tables: list[list[int]]) -> np.ndarray:
    """[B, longest] int32, padded with block 0."""
    out = np.zeros((len(tables), max(map(len, tables), default=0)), dtype=np.int32)
    for row, table in enumerate(tables):
        out[row, : len(table)] = table
    return out


def sampling_row(seq: Sequence, eos_token_ids: Tokens[int], extra: Tokens[int] = ()) -> SamplingRow:
    """The sampler's row for seq's next token, as if `extra` (proposed tokens) were appended."""
    params = seq.params
    # Only penalties and min_tokens read the output so far; skip copying it otherwise.
    needs_output = (
        params.min_tokens or params.repetition_penalty != 1.0
        or params.frequency_penalty or params.presence_penalty
    )  # fmt: skip
    output = seq.output_token_ids if needs_output else []
    return SamplingRow(
        params=params,
        prompt_token_ids=seq.request.prompt_token_ids,
        output_token_ids=output + list(extra) if extra else output,
        generator=seq.generator,
        eos_token_ids=eos_token_ids,
    )
