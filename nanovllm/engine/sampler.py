"""Sampler: turns one step's batch of next-token logits into token ids, as vLLM V1 does.

Per row, in this order: min_tokens mask (stop ids and EOS) -> repetition penalty ->
frequency/presence penalties -> greedy rows take the argmax here -> temperature -> min_p ->
top_k -> top_p -> one inverse-CDF draw with one uniform from the row's generator.
Logprobs come from the raw logits (vLLM V1's default `raw_logprobs`).

Everything is vectorized over the batch, on the backend's arrays (NumPy, or CuPy on a GPU).
Random numbers always come from NumPy generators on the host, one uniform per sampled row, so a
seeded sequence draws from its own stream whatever else shares its batch.

`verify` is the one entry point of a step: a sequence either samples its next token (k = 0) or
verifies k proposed tokens by rejection sampling (nanovllm/engine/rejection.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.engine.distribution import largest_sorted, search_cdf
from nanovllm.engine.logits_processors import SamplingRow, column, penalized
from nanovllm.engine.logprobs import TokenLogprobs, ranked_logprobs
from nanovllm.engine.rejection import rejection_sample

__all__ = ["Sampler", "SamplingRow", "TokenLogprobs", "SampleOutput", "VerifyGroup"]

# How many of a row's best tokens are sorted first when looking for its top_p nucleus.
_NUCLEUS_CANDIDATES = 2048


@dataclass(slots=True)
class SampleOutput:
    token_ids: np.ndarray  # [B] int64
    logprobs: list[TokenLogprobs | None]


@dataclass(slots=True)
class VerifyGroup:
    """One sequence's logits rows in a step: k + 1 rows when verifying k proposed tokens (row i
    assumes proposed[:i] were accepted), one row when it simply samples (k = 0)."""

    rows: list[SamplingRow]
    draft_token_ids: list[int]
    draft_probs: np.ndarray | None  # [k, V]; None for a deterministic proposer (or k = 0)


@dataclass(slots=True)
class SampledTokens:
    token_ids: list[int]  # accepted proposals, then one sampled token
    num_accepted: int
    logprobs: list[TokenLogprobs | None]


class _HostArrays:
    """NumPy as the backend's arrays, when the sampler is used on its own."""

    xp = np

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return np.asarray(x)


class Sampler:
    def __init__(self, seed: int = 0, backend=None) -> None:
        self.generator = np.random.default_rng(seed)  # for rows without their own
        self.backend = backend or _HostArrays()
        self.xp = self.backend.xp

    def verify(self, logits, groups: list[VerifyGroup]) -> list[SampledTokens]:
        """The tokens each group keeps. logits holds the groups' rows in order."""
        if len(groups) == len(logits):  # one row each: nobody verifies, all sample at once
            sampled = self(logits, [group.rows[0] for group in groups])
            return [
                SampledTokens([token], 0, [logprobs])
                for token, logprobs in zip(
                    sampled.token_ids.tolist(), sampled.logprobs, strict=True
                )
            ]
        starts = np.cumsum([0] + [len(g.rows) for g in groups])
        plain = [i for i, g in enumerate(groups) if not g.draft_token_ids]
        out: list[SampledTokens | None] = [None] * len(groups)
        if plain:
            rows = logits if len(plain) == len(logits) else logits[starts[plain]]
            sampled = self(rows, [groups[i].rows[0] for i in plain])
            for i, token, logprobs in zip(
                plain, sampled.token_ids.tolist(), sampled.logprobs, strict=True
            ):
                out[i] = SampledTokens([token], 0, [logprobs])
        for i, group in enumerate(groups):
            if group.draft_token_ids:
                out[i] = self._verify_one(logits[starts[i] : starts[i + 1]], group)
        return out

    def _verify_one(self, logits, group: VerifyGroup) -> SampledTokens:
        probs = self.backend.to_numpy(self.probs(logits, group.rows))
        generator = group.rows[0].generator or self.generator
        verdict = rejection_sample(probs, group.draft_token_ids, group.draft_probs, generator)
        kept = len(verdict.token_ids)
        logprobs = self.logprobs(logits[:kept], np.asarray(verdict.token_ids), group.rows[:kept])
        return SampledTokens(verdict.token_ids, verdict.num_accepted, logprobs)

    def __call__(self, logits, rows: list[SamplingRow]) -> SampleOutput:
        xp = self.xp
        x = penalized(self.xp, logits, rows)
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
        token_ids = self.backend.to_numpy(token_ids)
        return SampleOutput(token_ids, self.logprobs(logits, token_ids, rows))

    def probs(self, logits, rows: list[SamplingRow]):
        """The distribution each row samples from, [B, V] float32; greedy rows are one-hot."""
        xp = self.xp
        x = penalized(self.xp, logits, rows)
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
        return self.backend.to_numpy(self._draw(self.xp.asarray(probs), rows))

    # --- the random path ---

    def _weights(self, x, rows: list[SamplingRow]):
        """Unnormalised probabilities after temperature, min_p, top_k and top_p (zero = removed)."""
        xp = self.xp
        x = x / column(self.xp, rows, "temperature")[:, None]
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
        best = largest_sorted(xp, x, int(top_k.max()))
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
        best = largest_sorted(xp, x, width)
        cutoff, found = self._nucleus_cutoff(best, top, floor, top_p, total)
        missed = np.flatnonzero(~self.backend.to_numpy(found))
        if len(missed):
            best = largest_sorted(xp, x[missed], x.shape[1])
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
        last = search_cdf(xp, mass, top_p, strict=False, total=total)
        cutoff = xp.where(top_p < 1.0, best[xp.arange(len(best)), last], -np.inf)
        found = mass.sum(axis=1, dtype=xp.float64) >= top_p * total
        return cutoff.astype(xp.float32), found

    def _draw(self, weights, rows: list[SamplingRow]):
        return search_cdf(self.xp, weights, self.xp.asarray(self._uniforms(rows)), strict=True)

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
        counts = [rows[i].params.logprobs for i in want]
        found = ranked_logprobs(self.backend, _take(logits, want), token_ids[want], counts)
        for i, entry in zip(want, found, strict=True):
            out[i] = entry
        return out


def _take(x, idx: np.ndarray):
    """x[idx] along rows, without the copy when idx is every row in order."""
    return x if len(idx) == len(x) else x[idx]
