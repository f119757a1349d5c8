"""Rotary position embedding tables, including Llama 3 and linear frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanovllm.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_cos_sin(
    head_dim: int, base: float, max_positions: int, scaling: dict[str, Any] | None
) -> np.ndarray:
    """[max_positions, head_dim] float32 table: cos of each frequency in the first half, sin in the second."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = _scale_frequencies(inv_freq.astype(np.float32), scaling)
    freqs = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq)
    return np.concatenate((np.cos(freqs), np.sin(freqs)), axis=-1).astype(np.float32)


def _scale_frequencies(inv_freq: np.ndarray, scaling: dict[str, Any] | None) -> np.ndarray:
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
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
