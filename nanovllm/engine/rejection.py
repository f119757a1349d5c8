"""Rejection sampling: verify a proposer's k guesses against the target model so that the tokens
kept follow exactly the target's distribution (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", algorithm 1). With k = 0 it is plain sampling from p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Verdict:
    """The tokens one sequence gains from one verification."""

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


def _draft_row(draft_probs: np.ndarray | None, i: int, token: int, vocab: int) -> np.ndarray:
    if draft_probs is not None:
        return draft_probs[i]
    one_hot = np.zeros(vocab, dtype=np.float32)
    one_hot[token] = 1.0
    return one_hot


def _sample(weights: np.ndarray, generator: np.random.Generator) -> int:
    cdf = np.cumsum(weights, dtype=np.float64)
    return int(min(np.searchsorted(cdf, generator.random() * cdf[-1], side="right"), len(cdf) - 1))
