"""The guard against non-finite logits: a step whose logits hold NaN or infinity is stopped and
reported with where it went wrong, instead of sampling garbage.

float16 activations overflow past 65,504: some checkpoints (Qwen2-family models are known
to) produce residual streams beyond it in a few layers, on a GPU, whatever the kernels. The
check is one reduction over the step's logits (on a GPU, a sync of one flag, next to the token
ids the sampler brings back anyway). When it fails, the step's forward runs again eagerly,
looking at the residual stream after the embedding and after every layer, to name the first
place it stops being finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nanovllm.errors import NanovllmError

Array = Any


class NonFiniteLogitsError(NanovllmError):
    """A step's logits are not finite; the message says where and what to do."""


def all_finite(xp: Any, x: Array) -> bool:
    return bool(xp.isfinite(x).all())


def first_nonfinite(forward: Callable[[Callable], Array], xp: Any) -> int | None:
    """Run forward(inspect) once and return the index (-1: the embedding) of the first point
    whose residual stream is not finite, or None if every point is."""
    found: list[int] = []

    def inspect(index: int, hidden: Array, residual: Array | None) -> None:
        if found:
            return
        if not all_finite(xp, hidden) or (residual is not None and not all_finite(xp, residual)):
            found.append(index)

    forward(inspect)
    return found[0] if found else None


def nonfinite_message(
    bad_rows: int, rows: int, where: int | None, num_layers: int, dtype: Any
) -> str:
    if where is None:
        place = "every layer's output is finite, so the LM head's output overflows"
    elif where < 0:
        place = "the embedding of the step's tokens is already not finite"
    else:
        place = (
            f"the residual stream first stops being finite after model.layers.{where} "
            f"(of {num_layers} layers)"
        )
    message = (
        f"the model's logits are not finite (NaN or infinity) in {bad_rows} of {rows} rows; {place}"
    )
    if np.dtype(dtype) == np.float16:
        return (
            f"{message}. float16 activations overflow there (Qwen2-family models are known to "
            "in some layers): restart with --dtype float32"
        )
    return f"{message}. The checkpoint's weights may hold NaN or infinity"
