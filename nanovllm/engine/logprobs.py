"""Log-probabilities of chosen tokens, their ranks and each row's most likely tokens.

One routine serves the sampled tokens (the sampler, vLLM's raw logprobs: before penalties and
temperature) and the prompt's tokens (prompt logprobs: row p of the prompt scores token p + 1).
`xp` arrays stay on the backend (NumPy, or CuPy on a GPU); only the results come to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.engine.distribution import largest_ids


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int  # the sampled (or, for a prompt, the actual next) token
    logprob: float
    rank: int  # 1 = most likely; tokens tied with it count as better (vLLM)
    top: list[tuple[int, float]]  # the `num_top` most likely (id, logprob), best first


def ranked_logprobs(
    backend, logits, token_ids: np.ndarray, num_top: list[int]
) -> list[TokenLogprobs]:
    """Per row of logits [R, V]: the logprob and rank of token_ids[r], and the row's num_top[r]
    most likely tokens."""
    xp = backend.xp
    x = xp.asarray(logits, dtype=xp.float32)
    top = x.max(axis=1, keepdims=True)
    log_total = top + xp.log(xp.exp(x - top).sum(axis=1, keepdims=True))
    chosen = x[xp.arange(len(x)), xp.asarray(token_ids)]
    # Ranks compare raw logits: same order as logprobs, without rounding that merges values.
    ranks = backend.to_numpy((x >= chosen[:, None]).sum(axis=1))  # vLLM counts ties as better
    chosen = backend.to_numpy(chosen - log_total[:, 0])
    n = min(max(num_top, default=0), x.shape[1])
    top_ids = largest_ids(xp, x, n)
    top_lp = backend.to_numpy(xp.take_along_axis(x, top_ids, axis=1) - log_total)
    top_ids = backend.to_numpy(top_ids)
    out = []
    for r, k in enumerate(num_top):
        best = [(int(t), float(v)) for t, v in zip(top_ids[r, :k], top_lp[r, :k], strict=True)]
        out.append(TokenLogprobs(int(token_ids[r]), float(chosen[r]), int(ranks[r]), best))
    return out
