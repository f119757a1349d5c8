"""Rotary position embedding tables, including Llama 3, linear and LongRoPE (Phi-3) scaling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanovllm.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_cos_sin(
    head_dim: int, base: float, max_positions: int, scaling: dict[str, Any] | None
) -> np.ndarray:
    """[max_positions, head_dim] float32 table: cos of each frequency in the first half, sin in the second."""
    if _rope_type(scaling) == "longrope":
        inv_freq, magnitude = _longrope_frequencies(head_dim, base, max_positions, scaling)
    else:
        inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        inv_freq, magnitude = _scale_frequencies(inv_freq.astype(np.float32), scaling), 1.0
    freqs = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq)
    table = np.concatenate((np.cos(freqs), np.sin(freqs)), axis=-1)
    return (table * np.float32(magnitude)).astype(np.float32)


def _rope_type(scaling: dict[str, Any] | None) -> str:
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    return "longrope" if rope_type == "su" else rope_type  # "su": LongRoPE's first name


def _scale_frequencies(inv_freq: np.ndarray, scaling: dict[str, Any] | None) -> np.ndarray:
    rope_type = _rope_type(scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / np.float32(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise ModelLoadError(
        f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_frequencies(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope_frequencies(
    head_dim: int, base: float, max_positions: int, scaling: dict[str, Any]
) -> tuple[np.ndarray, float]:
    """Phi-3's LongRoPE: each frequency divided by its own factor, and cos/sin scaled up.

    The long factors serve contexts past the pretraining length, the short ones shorter
    contexts. transformers switches per forward pass (by the longest position in it), which
    would leave keys of one sequence rotated two ways in a KV cache; like llama.cpp we pick one
    set for the engine's whole context: long when it may exceed the pretraining length.
    """
    original = scaling.get("original_max_position_embeddings")
    if not original:
        raise ModelLoadError("longrope rope scaling needs original_max_position_embeddings")
    long = max_positions > original
    factors = np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float32)
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"longrope factors have {factors.size} entries; head_dim {head_dim} needs {head_dim // 2}"
        )
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = 1.0 / (factors * np.float32(base) ** exponents)
    factor = scaling.get("factor") or scaling.get("max_position_embeddings", original) / original
    magnitude = scaling.get("attention_factor")
    if magnitude is None:
        magnitude = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq.astype(np.float32), float(magnitude)
