"""Sizing the KV cache from device memory, vLLM-style (`--num-blocks auto`).

The engine may use `gpu_memory_utilization` of the device's total memory. What is in use once
the weights are loaded (weights, other processes) and a reserve for one step's activations come
off first; the rest becomes KV blocks, shared by the target and a draft model (each block holds
both models' keys and values for the same token positions).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from nanovllm.errors import NanovllmError


def kv_cache_block_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: Any
) -> int:
    """Bytes of one block across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * np.dtype(dtype).itemsize


def num_blocks_for_budget(
    free_bytes: int,
    total_bytes: int,
    gpu_memory_utilization: float,
    block_bytes: int,
    reserve_bytes: int = 0,
) -> int:
    """How many KV blocks fit, vLLM-style: the engine may use `gpu_memory_utilization` of the
    GPU's total memory; what is in use now (weights, other processes) and a reserve for
    activations come off first, and the rest is KV cache."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise NanovllmError(
            f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}"
        )
    in_use = total_bytes - free_bytes
    budget = int(total_bytes * gpu_memory_utilization) - in_use - reserve_bytes
    blocks = budget // block_bytes if budget > 0 else 0
    if blocks < 1:
        raise NanovllmError(
            f"no room for the KV cache: {in_use / 2**30:.2f} GiB of {total_bytes / 2**30:.2f} GiB "
            f"in use, {reserve_bytes / 2**30:.2f} GiB reserved for activations, and "
            f"--gpu-memory-utilization {gpu_memory_utilization} allows "
            f"{total_bytes * gpu_memory_utilization / 2**30:.2f} GiB; raise it or use a smaller model"
        )
    return int(blocks)


def activation_reserve_bytes(
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    dtype: Any,
    verify_rows: int = 1,
) -> int:
    """A generous estimate of a step's peak activations: a few hidden-sized buffers, the fused
    qkv and gate/up outputs per batched token, and per sequence `verify_rows` rows of float32
    logits (k + 1 when verifying k guesses) plus as many for the sampler's temporaries, all
    doubled for allocator slack; plus the decode graphs' persistent logits buffer."""
    item = np.dtype(dtype).itemsize
    per_token = (6 * hidden_size + 3 * intermediate_size) * item
    logits = max_num_seqs * verify_rows * vocab_size * 4
    return 2 * (max_num_batched_tokens * per_token + 2 * logits) + max_num_seqs * vocab_size * 4


def kv_blocks_for_memory(config, model_configs: list, dtype: Any, free: int, total: int) -> int:
    """How many KV blocks fit for these models (the target, and the draft if any) under the
    engine config's memory settings, given the device's free and total bytes."""
    block = sum(
        kv_cache_block_bytes(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, dtype)
        for c in model_configs
    )
    verify_rows = 1 + (config.num_speculative_tokens if config.speculative_method else 0)
    reserve = sum(
        activation_reserve_bytes(
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            dtype,
            verify_rows,
        )  # fmt: skip
        for c in model_configs
    )
    return num_blocks_for_budget(free, total, config.gpu_memory_utilization, block, reserve)


@dataclasses.dataclass(slots=True)
class WeightMemory:
    """What a loaded model's weights take: bytes of every array it holds (tied weights once),
    and how many matrices are kept in each GGUF format ("dense" for the rest)."""

    nbytes: int
    matrices: Counter

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {fmt.upper()}" for fmt, n in sorted(self.matrices.items()))
        return f"{self.nbytes / 2**20:.1f} MiB ({kinds or 'no matrices'})"


def weight_memory(model: Any) -> WeightMemory:
    """Walk a model's attributes (layers, embeddings, norms, rotary tables) and add up the bytes
    of every array and stored weight, each object once."""
    seen: set[int] = set()
    total = WeightMemory(0, Counter())
    for name, value in vars(model).items():
        if name not in ("config", "backend"):
            _add(value, seen, total, matrices=name not in _TABLES)
    return total


_TABLES = ("cos_sin", "layer_cos_sin")  # rotary tables: memory, but no weight matrices


def _add(value: Any, seen: set[int], total: WeightMemory, matrices: bool = True) -> None:
    if id(value) in seen or value is None or isinstance(value, np.generic | str | int | float):
        return
    seen.add(id(value))
    parts = getattr(value, "parts", None)
    if isinstance(parts, tuple):  # a fused weight of mixed types: count each part
        for part in parts:
            _add(part, seen, total, matrices)
        return
    if hasattr(value, "nbytes") and hasattr(value, "shape"):
        total.nbytes += int(value.nbytes)
        if matrices and len(value.shape) == 2:
            total.matrices[getattr(value, "format", "dense")] += 1
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _add(getattr(value, field.name), seen, total, matrices)
    elif isinstance(value, list | tuple):
        for item in value:
            _add(item, seen, total, matrices)
