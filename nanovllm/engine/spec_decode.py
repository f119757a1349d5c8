"""Speculative decoding's proposers, which guess up to k tokens per decoding sequence, and its
counters. Verification is the sampler's (nanovllm/engine/rejection.py), in the model runner.

- n-gram prompt lookup: find the latest earlier occurrence of the sequence's last n tokens and
  propose what followed it. Deterministic, so its draft distribution is one-hot.
- a draft model (its own ModelRunner and KV arrays, sharing the target's block tables): samples
  k tokens autoregressively and reports the distribution q each was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nanovllm.engine.batch import ForwardItem, sampling_row
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import Proposal, ScheduledSeq


class Proposer(Protocol):
    def propose(self, wanted: list[ScheduledSeq]) -> dict[Sequence, Proposal]:
        """Guesses for decoding sequences, at most item.num_spec_tokens each (none is fine)."""


def ngram_propose(token_ids: Tokens[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens (n_max..n_min)."""
    tokens = np.asarray(token_ids)
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = tokens[length - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, lookup_min: int = 1, lookup_max: int = 4) -> None:
        self.lookup_min, self.lookup_max = lookup_min, lookup_max

    def propose(self, wanted: list[ScheduledSeq]) -> dict[Sequence, Proposal]:
        proposals = {}
        for item in wanted:
            tokens = ngram_propose(
                item.seq.token_ids, item.num_spec_tokens, self.lookup_min, self.lookup_max
            )
            if tokens:
                proposals[item.seq] = Proposal(tokens, None)
        return proposals


class DraftProposer:
    """The draft model computes lazily: before proposing, it runs every token it has not seen
    (the whole prompt after admission or preemption, one or two tokens in steady state). What it
    holds is `seq.draft_computed`; verification rolls that back past rejected guesses."""

    def __init__(self, runner, eos_token_ids: list[int]) -> None:
        self.runner = runner  # a ModelRunner over the draft model: logits() and its sampler
        self.eos_token_ids = eos_token_ids

    def propose(self, wanted: list[ScheduledSeq]) -> dict[Sequence, Proposal]:
        runner, sampler = self.runner, self.runner.sampler
        drafts: dict[Sequence, tuple[list[int], list[np.ndarray]]] = {
            item.seq: ([], []) for item in wanted
        }
        active = [(item.seq, item.num_spec_tokens) for item in wanted]
        items = [self._unseen(seq) for seq, _ in active]
        while active:
            logits = runner.logits(items)
            rows = [sampling_row(seq, self.eos_token_ids, drafts[seq][0]) for seq, _ in active]
            probs = sampler.probs(logits, rows)
            tokens = sampler.sample_from_probs(probs, rows)
            for (seq, _), token, q in zip(active, tokens.tolist(), runner.backend.to_numpy(probs), strict=True):  # fmt: skip
                drafts[seq][0].append(token)
                drafts[seq][1].append(q)
                seq.draft_computed = seq.num_tokens + len(drafts[seq][0]) - 1
            active = [(seq, k) for seq, k in active if len(drafts[seq][0]) < k]
            items = [ForwardItem(seq, seq.draft_computed, drafts[seq][0][-1:], 1) for seq, _ in active]  # fmt: skip
        return {seq: Proposal(ids, np.stack(qs)) for seq, (ids, qs) in drafts.items()}

    @staticmethod
    def _unseen(seq: Sequence) -> ForwardItem:
        return ForwardItem(seq, seq.draft_computed, seq.token_ids[seq.draft_computed :], 1)


def roll_back_draft(seq: Sequence, num_accepted: int) -> None:
    """After verification: the draft's KV beyond the accepted guesses belongs to rejected ones."""
    seq.draft_computed = min(seq.draft_computed, seq.num_tokens + num_accepted)


@dataclass(slots=True)
class SpecStats:
    """Counters named as vLLM's spec_decode metrics."""

    k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.accepted_per_pos:
            self.accepted_per_pos = [0] * self.k

    def snapshot(self) -> SpecStats:
        return SpecStats(
            self.k,
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.accepted_per_pos),
        )

    def record(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
