"""Speculative decoding: proposers that guess k tokens, and the rejection sampler that keeps
exactly the target model's distribution (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", algorithm 1).

Proposers:
- n-gram prompt lookup: find the latest earlier occurrence of the sequence's last n tokens and
  propose what followed it. Deterministic, so its draft distribution is one-hot.
- a draft model (driven by the engine through its own ModelRunner): samples k tokens
  autoregressively and reports the distribution q each was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def ngram_propose(token_ids: Sequence[int], k: int, n_min: int, n_max: int) -> list[int]:
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


@dataclass(slots=True)
class Verdict:
    """The tokens one sequence gains from one speculative step."""

    token_ids: list[int]  # accepted draft tokens, then the correction or bonus token
    num_accepted: int


def rejection_sample(
    target_probs: np.ndarray,  # [k + 1, V]: p at each draft position, then the bonus position
    draft_token_ids: Sequence[int],  # [k]
    draft_probs: np.ndarray | None,  # [k, V], or None for a deterministic (one-hot) proposer
    generator: np.random.Generator,
) -> Verdict:
    """Accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    sample from normalize(max(0, p_i - q_i)) and stop; if all k pass, sample a bonus from p_{k+1}."""
    accepted: list[int] = []
    for i, token in enumerate(draft_token_ids):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if q_token > 0 and generator.random() * q_token < p[token]:
            accepted.append(int(token))
            continue
        residual = np.maximum(p - _draft_row(draft_probs, i, token, p.shape[0]), 0.0)
        if residual.sum() <= 0:  # p == q exactly: any rejection is measure-zero; fall back to p
            residual = p
        return Verdict(accepted + [_sample(residual, generator)], len(accepted))
    return Verdict(accepted + [_sample(target_probs[len(accepted)], generator)], len(accepted))


def _host(x) -> np.ndarray:
    """A NumPy copy of a CuPy array (rejection sampling walks k rows on the host); NumPy as is."""
    return x.get() if hasattr(x, "get") else x


def _draft_row(draft_probs: np.ndarray | None, i: int, token: int, vocab: int) -> np.ndarray:
    if draft_probs is not None:
        return draft_probs[i]
    one_hot = np.zeros(vocab, dtype=np.float32)
    one_hot[token] = 1.0
    return one_hot


def _sample(weights: np.ndarray, generator: np.random.Generator) -> int:
    cdf = np.cumsum(weights, dtype=np.float64)
    return int(min(np.searchsorted(cdf, generator.random() * cdf[-1], side="right"), len(cdf) - 1))


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


@dataclass(slots=True)
class Proposal:
    token_ids: list[int]
    probs: np.ndarray | None  # [k, V] draft distributions; None for a deterministic proposer


class SpecDecoder:
    """Proposes drafts for decoding sequences and verifies them against the target's logits.

    The draft model shares the target's block tables (same block ids, its own KV arrays), so its
    cache is allocated, preempted and freed with the target's. It computes lazily: before
    proposing, it runs every token it has not seen (the whole prompt after admission or
    preemption, one or two tokens in steady state).
    """

    def __init__(
        self,
        method: str,
        num_tokens: int,
        max_model_len: int,
        draft_runner=None,
        lookup_min: int = 1,
        lookup_max: int = 4,
    ) -> None:
        self.method = method
        self.k = num_tokens
        self.max_model_len = max_model_len
        self.draft_runner = draft_runner
        self.lookup_min, self.lookup_max = lookup_min, lookup_max
        self.stats = SpecStats(num_tokens)

    def lookahead(self, seq) -> int:
        """Draft slots for seq this step: no more than it may still generate or the model holds."""
        remaining = seq.params.max_tokens - seq.num_output_tokens - 1
        return max(0, min(self.k, remaining, self.max_model_len - seq.num_tokens))

    def propose(self, batch) -> dict:
        wanted = [
            (seq, num_new - 1)
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True)
            if seq.is_decoding and num_new > 1
        ]
        if not wanted:
            return {}
        if self.method == "ngram":
            return self._ngram(wanted)
        return self._draft(wanted)

    def _ngram(self, wanted) -> dict:
        proposals = {}
        for seq, k in wanted:
            tokens = ngram_propose(seq.token_ids, k, self.lookup_min, self.lookup_max)
            if tokens:
                proposals[seq] = Proposal(tokens, None)
        return proposals

    def _draft(self, wanted) -> dict:
        from nanovllm.engine.model_runner import ForwardItem

        runner = self.draft_runner
        drafts = {seq: ([], []) for seq, _ in wanted}
        items = [
            ForwardItem(seq, seq.draft_computed, seq.token_ids[seq.draft_computed :], 1)
            for seq, _ in wanted
        ]
        active = wanted
        while active:
            logits = runner.logits(items)
            rows = [runner.sampling_row(seq, drafts[seq][0]) for seq, _ in active]
            probs = runner.sampler.probs(logits, rows)
            tokens = runner.sampler.sample_from_probs(probs, rows)
            probs = _host(probs)
            for (seq, _), token, q in zip(active, tokens.tolist(), probs, strict=True):
                drafts[seq][0].append(token)
                drafts[seq][1].append(q)
                seq.draft_computed = seq.num_tokens + len(drafts[seq][0]) - 1
            active = [(seq, k) for seq, k in active if len(drafts[seq][0]) < k]
            items = [
                ForwardItem(seq, seq.draft_computed, drafts[seq][0][-1:], 1) for seq, _ in active
            ]
        return {seq: Proposal(ids, np.stack(qs)) for seq, (ids, qs) in drafts.items()}

    def verify(
        self, seq, proposal: Proposal, logits: np.ndarray, runner
    ) -> tuple[list[int], list, int]:
        """Accepted drafts plus one target token; their logprobs; how many inputs were valid."""
        k = len(proposal.token_ids)
        rows = [runner.sampling_row(seq, proposal.token_ids[:i]) for i in range(k + 1)]
        target_probs = _host(runner.sampler.probs(logits, rows))
        generator = seq.generator or runner.sampler.generator
        verdict = rejection_sample(target_probs, proposal.token_ids, proposal.probs, generator)
        self.stats.record(k, verdict.num_accepted)
        kept = len(verdict.token_ids)
        logprobs = runner.sampler.logprobs(
            logits[:kept], np.asarray(verdict.token_ids), rows[:kept]
        )
        # The draft's KV beyond the accepted tokens belongs to rejected guesses: roll it back.
        seq.draft_computed = min(seq.draft_computed, seq.num_tokens + verdict.num_accepted)
        return verdict.token_ids, logprobs, 1 + verdict.num_accepted
