"""Device memory: sizing the KV cache vLLM-style (`--num-blocks auto`), and what weights take.

The engine may use `gpu_memory_utilization` of the device's total memory. What is in use once
the weights are loaded (weights, other processes) and a reserve for everything a step allocates
come off first; the rest becomes KV blocks, shared by the target and a draft model (each block
holds both models' keys and values for the same token positions).

The reserve counts what the code allocates (each term below names where):
- an eager step of each model (engine/model_runner.py): a forward over up to
  max_num_batched_tokens tokens, every array of one layer alive at once; its logits rows in the
  compute dtype and in float32 — k + 1 rows per sequence when verifying k guesses; and the
  sampler's float32 [rows, vocab] temporaries (engine/sampler.py, engine/distribution.py);
- with CUDA graphs (engine/cuda_graphs.py), the graphs' private pool, which keeps the arrays of a
  decode step of max_num_seqs rows for good (logits included), and the persistent float32
  [max_num_seqs, vocab] logits buffer every bucket writes;
- the dequantize scratch of GGUF matmuls of many rows (backends/cuda.py), which lives on;
- a fixed allowance for what lives outside CuPy's pool: cuBLAS' workspace, loaded kernel
  modules, the graphs' executables.
Step arrays are counted twice over: CuPy's pool keeps freed blocks of the sizes it has met, and
a later step may need other sizes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from nanovllm.errors import NanovllmError

# Live float32 [rows, vocab] arrays at the sampler's peak: the penalized copy, the
# temperature-scaled logits, the weights, top-p's masked mass, a partition's copy, the int64 ids
# of an argpartition (two), and the logprobs' exp.
SAMPLER_ROW_COPIES = 8
RUNTIME_BYTES = 64 * 2**20  # cuBLAS workspace, kernel modules, graph executables


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
            f"{total_bytes * gpu_memory_utilization / 2**30:.2f} GiB; raise it, lower "
            "--max-num-batched-tokens or --max-requests, or use a smaller model"
        )
    return int(blocks)


def forward_bytes_per_token(c: Any, dtype: Any) -> int:
    """Bytes of one token's activations in one layer of model config `c`, all alive at once:
    residual stream, residual, normed input and output (4 H), qkv and its rotated q and k, the
    attention output, gate_up, the activation, and for experts the routed rows (gate_up
    activations in the dtype, float32 partial outputs, router logits, weights and ids)."""
    item = np.dtype(dtype).itemsize
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    width = 4 * c.hidden_size + 2 * (q + 2 * kv) + q + 3 * c.intermediate_size
    total = width * item
    if c.num_experts:
        k, f = c.num_experts_per_tok, c.moe_intermediate_size or c.intermediate_size
        total += k * (f * item + 4 * c.hidden_size + 8) + c.num_experts * item
        total += 3 * c.shared_expert_intermediate_size * item
    return total


def step_bytes(c: Any, tokens: int, logits_rows: int, dtype: Any, sample: bool = True) -> int:
    """A generous bound on what one forward of `tokens` tokens allocates, with its logits rows
    (in the dtype and in float32) and, when `sample`, the sampler's temporaries."""
    item = np.dtype(dtype).itemsize
    forward = tokens * forward_bytes_per_token(c, dtype)
    if c.num_experts:  # expert tiles padded to 16 rows: at most 16 padding rows per expert
        forward += 16 * c.num_experts * (c.moe_intermediate_size or c.intermediate_size) * item
    logits = logits_rows * c.vocab_size * (item + 4)
    sampler = logits_rows * c.vocab_size * 4 * SAMPLER_ROW_COPIES if sample else 0
    return 2 * (forward + logits) + sampler


@dataclasses.dataclass(slots=True)
class Reserve:
    """Bytes kept out of the KV cache, by what needs them."""

    eager_steps: int
    decode_graphs: int
    scratch: int
    runtime: int

    @property
    def total(self) -> int:
        return self.eager_steps + self.decode_graphs + self.scratch + self.runtime

    def describe(self) -> str:
        parts = {
            "eager steps": self.eager_steps,
            "decode graphs": self.decode_graphs,
            "dequantize scratch": self.scratch,
            "runtime": self.runtime,
        }
        return ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in parts.items() if size)


def activation_reserve(
    config: Any, model_configs: list, dtype: Any, graphs: bool, scratch_bytes: int = 0
) -> Reserve:
    """The reserve for an engine config (EngineConfig), the target's and the draft's model
    configs (target first), the compute dtype, whether decode steps run as CUDA graphs, and the
    dequantize scratch the weights need."""
    k = config.num_speculative_tokens if config.speculative_method else 0
    seqs, tokens = config.max_num_seqs, config.max_num_batched_tokens
    target, drafts = model_configs[0], model_configs[1:]
    eager = step_bytes(target, max(tokens, seqs * (k + 1)), seqs * (k + 1), dtype)
    eager += sum(step_bytes(c, max(tokens, seqs), seqs, dtype) for c in drafts)
    in_graphs = 0
    if graphs:  # the private pool of the largest bucket, and the shared logits buffer
        in_graphs = (
            step_bytes(target, seqs, seqs, dtype, sample=False) + seqs * target.vocab_size * 4
        )
    return Reserve(eager, in_graphs, scratch_bytes, RUNTIME_BYTES)


def kv_blocks_for_memory(
    config: Any,
    model_configs: list,
    dtype: Any,
    free: int,
    total: int,
    graphs: bool = False,
    scratch_bytes: int = 0,
) -> tuple[int, Reserve]:
    """How many KV blocks fit for these models (the target, and the draft if any) under the
    engine config's memory settings, given the device's free and total bytes; and the reserve
    that was kept out."""
    block = sum(
        kv_cache_block_bytes(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, dtype)
        for c in model_configs
    )
    reserve = activation_reserve(config, model_configs, dtype, graphs, scratch_bytes)
    blocks = num_blocks_for_budget(free, total, config.gpu_memory_utilization, block, reserve.total)
    return blocks, reserve


def dequantize_scratch_bytes(models: list, dtype: Any, limit: int) -> int:
    """The dequantize scratch buffer's final size: the largest GGUF matrix in the dtype, or the
    rows of it that fit in `limit` bytes (backends/cuda.py dequantizes larger ones in slices)."""
    item = np.dtype(dtype).itemsize
    largest = 0
    for model in models:
        for weight in _weights(model):
            if hasattr(weight, "format"):
                rows, cols = weight.shape
                chunk = max(1, limit // (cols * item))
                largest = max(largest, min(rows, chunk) * cols * item)
    return largest


# ---- what weights take ----------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class WeightMemory:
    """What a loaded model's weights take: bytes of every array it holds (tied weights once),
    and how many matrices are kept in each GGUF format ("dense" for the rest)."""

    nbytes: int
    matrices: Counter

    def describe(self) -> str:
        kinds = ", ".join(
            f"{n} {fmt if fmt == 'dense' else fmt.upper()}"
            for fmt, n in sorted(self.matrices.items())
        )
        return f"{self.nbytes / 2**20:.1f} MiB ({kinds or 'no matrices'})"


def weight_memory(model: Any) -> WeightMemory:
    """Add up the bytes of every array and stored weight a model holds (layers, embeddings,
    norms, rotary tables), each object once."""
    total = WeightMemory(0, Counter())
    for weight, is_matrix in _arrays(model):
        total.nbytes += int(weight.nbytes)
        if is_matrix:
            total.matrices[getattr(weight, "format", "dense")] += 1
    return total


_TABLES = ("cos_sin", "layer_cos_sin")  # rotary tables: memory, but no weight matrices


def _weights(model: Any) -> list:
    return [weight for weight, is_matrix in _arrays(model) if is_matrix]


def _arrays(model: Any) -> list[tuple[Any, bool]]:
    """(array or stored weight, whether it is a weight matrix) for everything a model holds."""
    seen: set[int] = set()
    found: list[tuple[Any, bool]] = []
    for name, value in vars(model).items():
        if name not in ("config", "backend"):
            _collect(value, seen, found, matrices=name not in _TABLES)
    return found


def _collect(value: Any, seen: set[int], found: list, matrices: bool) -> None:
    if id(value) in seen or value is None or isinstance(value, np.generic | str | int | float):
        return
    seen.add(id(value))
    parts = getattr(value, "parts", None)
    if isinstance(parts, tuple):  # a fused weight of mixed types: each part
        for part in parts:
            _collect(part, seen, found, matrices)
    elif hasattr(value, "nbytes") and hasattr(value, "shape"):
        found.append((value, matrices and len(value.shape) == 2))
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _collect(getattr(value, field.name), seen, found, matrices)
    elif isinstance(value, list | tuple):
        for item in value:
            _collect(item, seen, found, matrices)
