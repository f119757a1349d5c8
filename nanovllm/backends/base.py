"""The op seam: everything a model needs from an array library, written once per backend.

Models call only these ops, so the same model code drives NumPy on a CPU and CuPy plus our
CUDA kernels on a GPU. Shapes use T = tokens in the step's flat batch, B = sequences,
Hq/Hkv = query/key-value heads, D = head_dim, H = hidden size, E = experts, K = experts per
token, F = an expert's intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Array = Any  # numpy.ndarray on the cpu backend, cupy.ndarray on cuda


@dataclass(slots=True)
class AttentionInputs:
    """The arrays behind AttentionMetadata, on the host or on the device."""

    slot_mapping: Array  # [T] int64
    block_tables: Array  # [B, max_blocks] int32
    query_start: Array  # [B + 1] int32
    context_lens: Array  # [B] int32

    @classmethod
    def from_lists(cls, slots, tables: np.ndarray, query_start, context_lens) -> AttentionInputs:
        return cls(
            slot_mapping=np.asarray(slots, dtype=np.int64),
            block_tables=np.asarray(tables, dtype=np.int32),
            query_start=np.asarray(query_start, dtype=np.int32),
            context_lens=np.asarray(context_lens, dtype=np.int32),
        )

    def map(self, fn: Callable[[Array], Array]) -> AttentionInputs:
        """Each array through fn (e.g. the backend's asarray: an upload)."""
        return AttentionInputs(
            fn(self.slot_mapping),
            fn(self.block_tables),
            fn(self.query_start),
            fn(self.context_lens),
        )


@dataclass(slots=True)
class AttentionMetadata:
    """Where each query token of the step reads and writes the paged KV cache.

    Sequence b owns query rows query_start[b]:query_start[b+1]; after this step's KV write it has
    context_lens[b] tokens cached, so its i-th query token sits at position
    context_lens[b] - query_len[b] + i and attends to cache positions 0..that position.
    """

    slot_mapping: Array  # [T] int: block_id * block_size + offset for each new token
    block_tables: Array  # [B, max_blocks] int32, padded with 0
    query_start: Array  # [B + 1] int32
    context_lens: Array  # [B] int32
    block_size: int
    # Host copies: launch geometry on a GPU, the whole computation on the CPU.
    query_start_host: np.ndarray
    context_lens_host: np.ndarray
    block_tables_host: np.ndarray

    @classmethod
    def build(
        cls, host: AttentionInputs, block_size: int, device: AttentionInputs | None = None
    ) -> AttentionMetadata:
        """The one builder: from the step's host arrays and their device copies (the host
        arrays themselves on the CPU)."""
        device = device or host
        return cls(
            slot_mapping=device.slot_mapping,
            block_tables=device.block_tables,
            query_start=device.query_start,
            context_lens=device.context_lens,
            block_size=block_size,
            query_start_host=host.query_start,
            context_lens_host=host.context_lens,
            block_tables_host=host.block_tables,
        )

    @property
    def query_lens_host(self) -> np.ndarray:
        return np.diff(self.query_start_host)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)


def slot_of(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The KV-cache slot of a sequence's token at `position`: its block's id times the block size
    plus the offset inside the block."""
    return block_table[position // block_size] * block_size + position % block_size


def slots_of(block_table: Sequence[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    """slot_of for many positions at once."""
    table = np.asarray(block_table, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size


class Backend(Protocol):
    """Array creation and the fused ops of a decoder-only transformer."""

    name: str
    dtype: Any  # the compute dtype of activations, weights and KV cache
    xp: Any  # the array module: numpy, or cupy on a GPU

    supports_decode_graphs: bool  # decode steps can run as captured graphs
    needs_startup_check: bool  # its kernels are checked against the reference before serving

    def check_model(self, config: Any) -> None:
        """Raise NanovllmError, naming the value and the supported ones, for a model (a
        ModelConfig) this backend has no kernel for: checked before any weight is loaded."""

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) device bytes to size the KV cache from, or None."""

    def asarray(self, x: np.ndarray, dtype: Any = None) -> Array: ...
    def to_numpy(self, x: Array) -> np.ndarray: ...
    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Array: ...

    def weight(self, tensor: Any) -> Any:
        """A weight matrix [out, in] as the loader read it (a float array, or a QuantizedTensor /
        FusedWeight of nanovllm/models/quantized.py) prepared for `linear` and `embedding`: the
        reference and CUDA backends dequantize it, the compiled CPU backend keeps it stored."""

    def embedding(self, ids: Array, weight: Any) -> Array:
        """[T] ids, a prepared [V, H] weight -> [T, H]."""

    def linear(self, x: Array, weight: Any, bias: Array | None = None) -> Array:
        """[T, in] @ [out, in].T (+ bias) -> [T, out], with a prepared weight."""

    def rms_norm(
        self, x: Array, weight: Array, eps: float, residual: Array | None = None
    ) -> tuple[Array, Array]:
        """RMSNorm over the last axis. With a residual, normalizes x + residual and also returns
        that sum (the new residual), as fused add-norm kernels do. Returns (normed, residual)."""

    def rotary(self, q: Array, k: Array, positions: Array, cos_sin: Array) -> tuple[Array, Array]:
        """Neox-style rotary on [T, Hq, D] and [T, Hkv, D]; cos_sin is [max_pos, D] (cos | sin)."""

    def silu_and_mul(self, x: Array) -> Array:
        """[T, 2F] (gate | up) -> silu(gate) * up, [T, F]."""

    def gelu_tanh_and_mul(self, x: Array) -> Array:
        """[T, 2F] (gate | up) -> gelu(gate) * up with GELU's tanh approximation (GeGLU), [T, F]."""

    def soft_cap(self, x: Array, cap: float) -> Array:
        """cap * tanh(x / cap): Gemma's bound on logits."""

    def write_kv(
        self, k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array
    ) -> None:
        """Scatter [T, Hkv, D] keys/values into [num_blocks, block_size, Hkv, D] caches."""

    def paged_attention(
        self,
        q: Array,
        k_cache: Array,
        v_cache: Array,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        soft_cap: float = 0.0,
    ) -> Array:
        """Causal attention of each sequence's query tokens over its cached context -> [T, Hq, D].
        One op for prefill, chunked prefill, decode and speculative verification.

        Scores are q.k * scale, then soft_cap * tanh(score / soft_cap) when soft_cap > 0. With a
        window W > 0, the query at position p sees only positions p - W + 1 .. p, and the op
        reads nothing of a sequence before position (its first query's position) - W + 1: not
        its block table entries, keys or values. The engine may free those blocks."""

    def apply_token_bitmask(
        self, logits: Array, bitmask: Array, rows: Array | None = None
    ) -> Array:
        """In place: logits[rows[i], t] = -inf wherever bit t of bitmask[i] is 0 (rows defaults
        to 0, 1, ...). bitmask is int32 [len(rows), ceil(V / 32)]; bit b of word w stands for
        token 32 * w + b (nanovllm/structured/bitmask.py)."""

    def moe_route(self, logits: Array, top_k: int, renormalize: bool) -> tuple[Array, Array]:
        """[T, E] router logits -> (weights [T, K] float32, expert ids [T, K] int32): the K
        largest softmax probabilities, in descending order (ties: the lower expert id), divided
        by their sum when renormalize."""

    def moe_experts(
        self, x: Array, gate_up: Array, down: Array, weights: Array, ids: Array
    ) -> Array:
        """Each token through its K experts, weighted and summed: x [T, H], gate_up [E, 2F, H]
        (gate | up rows), down [E, H, F] -> sum_k weights[t, k] * down_e(silu(gate_e x) * up_e x)."""
