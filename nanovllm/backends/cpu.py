"""The `cpu` backend: compiled kernels (numba) on weights kept as their file stores them.

Two tiers share the op seam: `cpu-reference` (nanovllm/backends/cpu_reference.py) states every op
in NumPy and dequantizes weights to float32; this backend keeps GGUF blocks and 16-bit matrices
as they are (memory ~ the file) and runs them through nanovllm/backends/cpu_quant.py, and the rest
of the step through nanovllm/backends/cpu_ops.py. Tests check each kernel against the reference.

Matmuls pick their path by batch rows: up to MAX_KERNEL_ROWS rows (decode) the quantized kernel
reads each weight byte once per step. For GGUF block weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q5_K, Q6_K) that is an integer dot product with the activation rows rounded to blocks of
codes (cpu_int8.py): 16-bit codes for one or two rows (logits within ~1e-2 of float32's), or
with `--quantization q8-activations` Q8_0 blocks for every decode batch (llama.cpp's arithmetic:
faster on batches, logits that move by up to ~1); otherwise in float32 (cpu_quant.py). Above
MAX_KERNEL_ROWS (prefill), tiles of weight rows are dequantized into a reused float32 buffer and
multiplied with BLAS, whose cost the many rows amortize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.backends import cpu_ops
from nanovllm.backends.base import AttentionMetadata
from nanovllm.backends.cpu_int8 import Q8, Q16, QuantizedRows
from nanovllm.backends.cpu_jit import ThreadControl
from nanovllm.backends.cpu_quant import FORMATS, HALF_BLOCK, Format, Q
from nanovllm.backends.cpu_reference import ReferenceBackend, Scores, prefill_attention
from nanovllm.models.quantized import FusedWeight, QuantizedTensor, Weight

MAX_KERNEL_ROWS = 64  # batch rows up to which the kernel beats dequantize + BLAS (measured)
# Batch rows up to which integer dot products run, per activation precision: 16-bit codes cost
# twice the instructions of 8-bit ones, and beat the float32 kernel only where the weights'
# reads dominate (measured, docs/benchmarks.md "Integer dot products").
MAX_INTEGER_ROWS = {Q8: MAX_KERNEL_ROWS, Q16: 2}
TILE_VALUES = 1 << 22  # float32 values of the dequantized tile (16 MB)
CHUNKS_PER_THREAD = 4  # weight-row chunks per thread: balance without tiny chunks
MAX_KERNEL_QUERIES = 16  # query tokens of one sequence up to which the attention kernel runs


@dataclass(frozen=True, slots=True)
class Matrix:
    """One stored matrix ready for its kernels: the format's kernels and the data they take;
    `format` names it as the CUDA backend's weights do ("q4_k", "f16", or "dense" for float32)."""

    kernels: Format
    format: str
    data: np.ndarray  # uint8 / uint16 / float32 rows, as the format's kernels read them
    shape: tuple[int, int]
    nbytes: int


@dataclass(frozen=True, slots=True)
class CPUWeight:
    """A prepared weight: its parts (one, or several of different types for a fused weight of
    mixed types) and the first output column of each."""

    parts: tuple[Matrix, ...]
    columns: tuple[int, ...]
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True, slots=True)
class _AttentionPlan:
    """One step's attention work: kernel rows (short query runs) and long runs (prefill)."""

    meta: AttentionMetadata
    rows: np.ndarray  # flat-batch rows of the sequences with <= MAX_KERNEL_QUERIES queries
    long: np.ndarray  # sequences with more
    block_tables: np.ndarray
    query_start: np.ndarray
    context_lens: np.ndarray


class CPUBackend(ReferenceBackend):
    name = "cpu"

    def __init__(self, num_threads: int | None = None, quantization: str = "auto") -> None:
        super().__init__(np.float32)
        self.threads = ThreadControl(num_threads)
        self.dequantize_at_load = quantization == "none"  # float32 rows, as cpu-reference has
        # Decode matmuls round their input rows to blocks of 16-bit codes (float32's top
        # token, logits within ~1e-2), or to llama.cpp's Q8_0 blocks (faster, looser).
        self.activations = Q8 if quantization == "q8-activations" else Q16
        self._tile: np.ndarray | None = None
        self._plan: _AttentionPlan | None = None

    # ---- weights -----------------------------------------------------------------------------
    def weight(self, tensor: np.ndarray | Weight) -> CPUWeight:
        parts = tensor.parts if isinstance(tensor, FusedWeight) else (tensor,)
        if self.dequantize_at_load:
            parts = tuple(np.asarray(part, np.float32) if isinstance(part, np.ndarray)
                          else part.dequantize() for part in parts)  # fmt: skip
        matrices = tuple(_matrix(part) for part in parts)
        columns = tuple(np.cumsum([0] + [m.shape[0] for m in matrices[:-1]]).tolist())
        rows = sum(m.shape[0] for m in matrices)
        return CPUWeight(matrices, columns, (rows, matrices[0].shape[1]))

    def embedding(self, ids: np.ndarray, weight: CPUWeight) -> np.ndarray:
        self.threads.apply()
        out = np.empty((len(ids), weight.shape[1]), dtype=np.float32)
        ids = np.asarray(ids)
        for part, first in zip(weight.parts, weight.columns, strict=True):
            mine = (ids >= first) & (ids < first + part.shape[0])
            out[mine] = _dequantize(part, ids[mine] - first)
        return out

    # ---- ops ---------------------------------------------------------------------------------
    def linear(
        self, x: np.ndarray, weight: CPUWeight | np.ndarray, bias: np.ndarray | None = None
    ) -> np.ndarray:
        self.threads.apply()
        if isinstance(weight, np.ndarray):  # float32 experts of a mixture (models/moe.py)
            return super().linear(x, weight, bias)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
        quantized = None  # x in blocks of integer codes, made once for the parts that take it
        integer = x.shape[0] <= MAX_INTEGER_ROWS[self.activations]
        for part, column in zip(weight.parts, weight.columns, strict=True):
            if x.shape[0] > MAX_KERNEL_ROWS:
                self._tiled_matmul(part, x, out, column)
                continue
            chunks = min(part.shape[0], CHUNKS_PER_THREAD * self.threads.num_threads)
            if integer and part.kernels.integer is not None:
                quantized = quantized or QuantizedRows(x, self.activations)
                quantized.matmul(part.kernels.integer, part.data, out, column, chunks)
            else:
                part.kernels.matmul(part.data, x, out, column, chunks, HALF_BLOCK)
        if bias is not None:
            out += bias
        return out

    def rms_norm(self, x, weight, eps: float, residual=None):
        shape = x.shape
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, shape[-1])
        out = np.empty_like(rows)
        if residual is None:
            cpu_ops.rms_norm(out, rows, weight, np.float32(eps))
            return out.reshape(shape), x
        summed = np.empty_like(rows)
        residual = np.ascontiguousarray(residual, dtype=np.float32).reshape(rows.shape)
        cpu_ops.add_rms_norm(out, summed, rows, residual, weight, np.float32(eps))
        return out.reshape(shape), summed.reshape(shape)

    def rotary(self, q, k, positions, cos_sin):
        q_out = np.empty(q.shape, dtype=np.float32)
        k_out = np.empty(k.shape, dtype=np.float32)
        positions = np.asarray(positions, dtype=np.int64)
        cpu_ops.rotary(q_out, q, positions, cos_sin)
        cpu_ops.rotary(k_out, k, positions, cos_sin)
        return q_out, k_out

    def silu_and_mul(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=np.float32)
        cpu_ops.silu_and_mul(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]))
        return out

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        slots = np.asarray(slot_mapping, dtype=np.int64)
        cpu_ops.write_kv(k_cache, v_cache, k, v, slots)

    def paged_attention(
        self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window=0, soft_cap=0.0
    ):
        """Decodes and short query runs (speculative verification) through the kernel, which
        reads K/V in place; long prefill runs through the reference's BLAS matmuls, which beat
        the kernel's per-query dot products there (docs/benchmarks.md)."""
        self.threads.apply()
        out = np.empty(q.shape, dtype=np.float32)
        plan = self._attention_plan(meta)
        if plan.rows.size:
            cpu_ops.paged_attention(
                out, q, k_cache, v_cache, plan.block_tables, plan.query_start, plan.context_lens,
                np.float32(scale), int(window), np.float32(soft_cap), plan.rows,
            )  # fmt: skip
        if len(plan.long):
            scores = Scores(scale, window, soft_cap)
            starts = meta.query_start_host
            for b in plan.long:
                rows = slice(starts[b], starts[b + 1])
                out[rows] = prefill_attention(q[rows], k_cache, v_cache, meta, b, scores)
        return out

    def _attention_plan(self, meta: AttentionMetadata) -> _AttentionPlan:
        """The kernel's arguments for a step, made at its first layer and reused by the others
        (they were ~25 us of NumPy calls per layer)."""
        if self._plan is None or self._plan.meta is not meta:
            starts, lengths = meta.query_start_host, meta.query_lens_host
            short = np.flatnonzero(lengths <= MAX_KERNEL_QUERIES)
            rows = [np.arange(starts[b], starts[b + 1]) for b in short]
            self._plan = _AttentionPlan(
                meta,
                np.concatenate(rows) if rows else np.empty(0, np.int64),
                np.flatnonzero(lengths > MAX_KERNEL_QUERIES),
                np.asarray(meta.block_tables_host, dtype=np.int32),
                np.asarray(starts, dtype=np.int32),
                np.asarray(meta.context_lens_host, dtype=np.int32),
            )
        return self._plan

    # ---- helpers -----------------------------------------------------------------------------
    def _tiled_matmul(self, part: Matrix, x: np.ndarray, out: np.ndarray, column: int) -> None:
        rows, cols = part.shape
        if part.kernels.dequantize is None:  # float32 rows: BLAS reads them directly
            out[:, column : column + rows] = x @ part.data.T
            return
        step = max(1, TILE_VALUES // cols)
        if self._tile is None or self._tile.size < min(rows, step) * cols:
            self._tile = np.empty(TILE_VALUES + cols, dtype=np.float32)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            tile = self._tile[: (stop - start) * cols].reshape(stop - start, cols)
            rows_of_tile = np.arange(start, stop, dtype=np.int64)
            part.kernels.dequantize(part.data, rows_of_tile, tile, HALF_BLOCK)
            np.matmul(x, tile.T, out=out[:, column + start : column + stop])


def _matrix(tensor: np.ndarray | QuantizedTensor) -> Matrix:
    if isinstance(tensor, np.ndarray):
        tensor = QuantizedTensor.from_array(np.asarray(tensor, dtype=np.float32))
    if tensor.qtype not in FORMATS:  # no kernel for it (Q2_K, Q3_K): float32 rows instead
        tensor = QuantizedTensor.from_array(tensor.dequantize())
    fmt = FORMATS[tensor.qtype]
    data = fmt.view(np.ascontiguousarray(tensor.data))
    data.flags.writeable = False  # as the memory map's views are: one compiled type for both
    name = "dense" if tensor.qtype == Q.F32 else tensor.qtype.name.lower()
    return Matrix(fmt, name, data, tensor.shape, tensor.nbytes)


def _dequantize(part: Matrix, rows: np.ndarray) -> np.ndarray:
    if part.kernels.dequantize is None:
        return part.data[rows]
    out = np.empty((len(rows), part.shape[1]), dtype=np.float32)
    part.kernels.dequantize(part.data, rows.astype(np.int64), out, HALF_BLOCK)
    return out
