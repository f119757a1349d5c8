"""The CUDA backend: CuPy arrays, every op a kernel of kernels/, cuBLAS (through CuPy) for large matmuls.

The same class runs on the emulated device ("cuda-emulated"): NumPy arrays stand in for CuPy
arrays and the CPU emulator's modules for CuPy's RawModules, so the launch code below (grid,
block, argument order and types) is exactly what a GPU gets.

Kernels are picked by the dtype of their inputs: float32, float16, or bfloat16 stored as uint16
(neither NumPy nor CuPy has a bfloat16 dtype). The backend computes in float16 by default or in
float32; bfloat16 checkpoints are converted at load. Kernel scalars are passed as NumPy scalars
of the width the kernel declares (CuPy would pass a Python int as a 64-bit integer).

Matmuls: a decode step's few rows run on kernels/matmul.cu, which reads each weight byte once
(and is what a CUDA graph may hold: CuPy refuses cuBLAS while a stream is capturing); more rows
go to cuBLAS. GGUF weights stay in their file's blocks (`weight`, `quantized_weight`): decoded
in registers for few rows, dequantized into a reused scratch buffer for cuBLAS otherwise; with
quantization "none" they are dequantized to the compute dtype at load instead.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from nanovllm.backends.base import AttentionMetadata
from nanovllm.backends.kernel_library import (
    ATTENTION_HEAD_DIMS,
    ATTENTION_QUERY_VECTORS,
    ATTENTION_THREADS,
    DEQUANTIZE_THREADS,
    GGUF_FORMATS,
    MATMUL_THREADS,
    MOE_ALIGN_THREADS,
    MOE_MAX_EXPERTS,
    MOE_THREADS,
    MOE_TILE_COLS,
    MOE_TILE_ROWS,
    KernelLibrary,
    attention_shared_bytes,
    matmul_geometry,
)
from nanovllm.backends.quantized import (
    FusedQuantizedWeight,
    QuantizedWeight,
    gguf_format,
    row_bytes,
)
from nanovllm.errors import NanovllmError
from nanovllm.models.quantized import FusedWeight, QuantizedTensor

QUANTIZATIONS = ("auto", "none")
Array = Any
COMPUTE_DTYPES = {"auto": np.float16, "float16": np.float16, "float32": np.float32}
FLOAT16_MAX = float(np.finfo(np.float16).max)
_MASK_THREADS = 256  # tokens per block of apply_token_bitmask
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}

# Rows up to which an eager linear() runs on our matmul kernels rather than cuBLAS (a captured
# decode graph uses them at every row count). Up to 8 rows a float16 weight costs at most 4
# FMAs per byte, which CUDA cores sustain at full memory bandwidth; past that cuBLAS' tensor
# cores win. A GGUF weight read by cuBLAS must first be dequantized (about 4.5 bytes moved per
# value instead of ~0.6), so our kernel stays ahead to about 16 rows. docs/kernels.md has the
# arithmetic.
DENSE_KERNEL_MAX_ROWS = 8
QUANTIZED_KERNEL_MAX_ROWS = 16
# The dequantized weight of a large-M GGUF matmul goes into one reused buffer of at most this
# size; a larger matrix (an LM head) is dequantized and multiplied a slice of rows at a time.
DEQUANTIZE_SCRATCH_BYTES = 64 * 2**20


class CUDABackend:
    """Ops of the Backend protocol (nanovllm/backends/base.py) on a GPU or the emulated device."""

    def __init__(
        self,
        dtype: str = "float16",
        emulated: bool = False,
        emulator_options: dict[str, Any] | None = None,
        quantization: str = "auto",
    ) -> None:
        if quantization not in QUANTIZATIONS:
            raise NanovllmError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}"
            )
        if dtype not in COMPUTE_DTYPES:
            raise NanovllmError(
                f"the CUDA backend computes in float16 or float32, not {dtype}; bfloat16 "
                "checkpoints are converted to float16 at load (use --dtype float16 or float32)"
            )
        self.name = "cuda-emulated" if emulated else "cuda"
        self.dtype = np.dtype(COMPUTE_DTYPES[dtype])
        self.emulated = emulated
        self.keep_quantized = quantization == "auto"
        self.xp = np if emulated else _cupy()
        self.kernels = KernelLibrary(emulated, emulator_options)
        self._scratch: Array | None = None  # dequantized rows for cuBLAS, reused
        self._kernels_only = False  # inside decode_matmuls()

    def with_dtype(self, dtype: str) -> CUDABackend:
        """The same device and kernels (compiled once) computing in another dtype."""
        if dtype not in COMPUTE_DTYPES:
            raise NanovllmError(f"the CUDA backend computes in float16 or float32, not {dtype}")
        other = copy.copy(self)
        other.dtype = np.dtype(COMPUTE_DTYPES[dtype])
        other._scratch = None
        return other

    # ---- capabilities ------------------------------------------------------------------------
    supports_decode_graphs = True  # decode steps replay CUDA graphs (padded eagerly if emulated)

    @property
    def captures_graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs: when the array module is CuPy (or,
        in tests, a stand-in for it that enforces CuPy's rules); plain NumPy on the emulated
        device runs the same padded steps eagerly."""
        return hasattr(self.xp, "cuda")

    def check_model(self, config) -> None:
        """Refuse, before any weight is loaded, a model these kernels cannot run."""
        if config.head_dim not in ATTENTION_HEAD_DIMS:
            raise NanovllmError(
                f"head_dim {config.head_dim} of this model has no paged-attention kernel on "
                f"--device {self.name}; kernels/paged_attention.cu is built for head_dim "
                f"{', '.join(map(str, ATTENTION_HEAD_DIMS))} (use --device cpu for others)"
            )

    @property
    def needs_startup_check(self) -> bool:
        """A GPU's kernels are checked against the NumPy reference before serving
        (nanovllm/backends/self_check.py); the emulator runs the sources the tests check."""
        return not self.emulated

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) device bytes for sizing the KV cache; None on the emulated device (unless
        a test gave it a stand-in for CuPy with a device behind it)."""
        if not hasattr(self.xp, "cuda"):
            return None
        free, total = self.xp.cuda.runtime.memGetInfo()
        # Memory CuPy's pool holds but no array uses is free for the cache too.
        return free + self.xp.get_default_memory_pool().free_bytes(), total

    # ---- arrays ------------------------------------------------------------------------------
    def asarray(self, x: np.ndarray, dtype: Any = None) -> Array:
        if dtype is not None and np.dtype(dtype) == np.float16:
            _warn_if_overflows_float16(x)
        with np.errstate(over="ignore"):  # warned about above, with the weight's shape
            return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_numpy(self, x: Array) -> np.ndarray:
        return x.get() if hasattr(x, "get") else np.asarray(x)

    def weight(self, tensor: Any) -> Array | QuantizedWeight | FusedQuantizedWeight:
        """A weight matrix as the loader read it, prepared for linear() and embedding(): GGUF
        blocks of a format kernels/ decodes are uploaded as they are (unless quantization is
        "none"); everything else becomes a dense array in the compute dtype. A fused matrix of
        mixed types keeps each part in its own form."""
        if isinstance(tensor, QuantizedTensor):
            return self._stored_weight(tensor)
        if isinstance(tensor, FusedWeight):
            parts = tuple(self._stored_weight(part) for part in tensor.parts)
            if any(isinstance(part, QuantizedWeight) for part in parts):
                return FusedQuantizedWeight(parts)
            return self.xp.concatenate(parts)
        return self.asarray(np.asarray(tensor), self.dtype)

    def _stored_weight(self, tensor: QuantizedTensor) -> Array | QuantizedWeight:
        name = tensor.qtype.name.lower()
        if self.keep_quantized and name in GGUF_FORMATS:
            return self.quantized_weight(tensor.qtype, tensor.shape, tensor.data)
        if name == "f16" and self.dtype == np.float16:  # the file's bytes, no float32 detour
            return self.asarray(tensor.data.view(np.float16))
        # F32, BF16, the GGUF types without kernels (Q2_K, Q3_K), or quantization "none".
        return self.asarray(tensor.dequantize(), self.dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Array:
        return self.xp.zeros(shape, dtype=dtype or self.dtype)

    # ---- embedding and matmuls ---------------------------------------------------------------
    def quantized_weight(
        self, qtype: Any, shape: tuple[int, int], data: np.ndarray
    ) -> QuantizedWeight:
        """A GGUF matrix for linear() and embedding(): `data` holds its rows exactly as the file
        stores them, uint8 [rows, row_bytes], and is uploaded unchanged."""
        fmt = gguf_format(qtype)
        rows, cols = (int(n) for n in shape)
        expected = (rows, row_bytes(fmt, cols))
        if data.dtype != np.uint8 or tuple(data.shape) != expected:
            raise NanovllmError(
                f"a {fmt.upper()} matrix of shape {(rows, cols)} is uint8 {expected}, got "
                f"{data.dtype} {tuple(data.shape)}"
            )
        return QuantizedWeight(fmt, (rows, cols), self.xp.ascontiguousarray(self.xp.asarray(data)))

    def embedding(self, ids: Array, weight: Array | QuantizedWeight) -> Array:
        if isinstance(weight, FusedQuantizedWeight):
            raise NanovllmError("an embedding table cannot be a fused weight")
        if isinstance(weight, QuantizedWeight):
            rows = self.dequantize(weight, self.dtype, ids)
            return rows.reshape(*ids.shape, weight.shape[1])
        return self.xp.take(weight, ids, axis=0)

    def linear(self, x: Array, weight: Array | QuantizedWeight, bias: Array | None = None) -> Array:
        in_features = weight.shape[1]
        if x.shape[-1] != in_features:
            raise NanovllmError(
                f"linear: input has {x.shape[-1]} features, the weight {tuple(weight.shape)} "
                f"takes {in_features}"
            )
        rows = x.reshape(-1, in_features)
        if isinstance(weight, FusedQuantizedWeight):
            out = self._fused_linear(rows, weight, bias)
        else:
            out = self._linear(rows, weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def _linear(self, x: Array, weight: Array | QuantizedWeight, bias: Array | None) -> Array:
        if isinstance(weight, QuantizedWeight):
            return self._quantized_linear(x, weight, bias)
        if self._kernel_rows(len(x), weight):
            return self.matmul_kernel(x, weight, bias)
        return self._cublas_linear(x, weight, bias)

    def _fused_linear(self, x: Array, weight: FusedQuantizedWeight, bias: Array | None) -> Array:
        """One matmul per part, each into its columns of one output: the kernel writes there
        directly (rows of `out` are N apart, wider than the part); the cuBLAS paths, which run
        only eagerly for many rows, copy their result in."""
        out = self.xp.empty((len(x), weight.shape[0]), dtype=x.dtype)
        start = 0
        for part in weight.parts:
            stop = start + part.shape[0]
            columns = out[:, start:stop]
            part_bias = None if bias is None else bias[start:stop]
            if self._kernel_rows(len(x), part):
                self.matmul_kernel(x, part, part_bias, out=columns)
            else:
                columns[...] = self._linear(x, part, part_bias)
            start = stop
        return out

    def _kernel_rows(self, rows: int, weight: Array | QuantizedWeight) -> bool:
        """Whether linear() runs a matmul of this many rows on kernels/matmul.cu."""
        quantized = isinstance(weight, QuantizedWeight)
        limit = QUANTIZED_KERNEL_MAX_ROWS if quantized else DENSE_KERNEL_MAX_ROWS
        return rows <= limit or self._kernels_only or self._capturing()

    def _quantized_linear(self, x: Array, weight: QuantizedWeight, bias: Array | None) -> Array:
        _check_gguf_dtype(x.dtype)
        if self._kernel_rows(len(x), weight):
            return self.matmul_kernel(x, weight, bias)
        rows, cols = weight.shape
        chunk = max(1, DEQUANTIZE_SCRATCH_BYTES // (cols * x.itemsize))
        if rows <= chunk:
            return self._cublas_linear(x, self.dequantize(weight, x.dtype, scratch=True), bias)
        out = self.xp.empty((len(x), rows), dtype=x.dtype)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            part = self.dequantize(weight, x.dtype, rows=(start, stop), scratch=True)
            out[:, start:stop] = self._cublas_linear(x, part, None)
        if bias is not None:
            out += bias
        return out

    def _cublas_linear(self, x: Array, weight: Array, bias: Array | None) -> Array:
        """x @ weight.T through CuPy (cuBLAS: float32 accumulation, output rounded to the dtype),
        then the bias added in the dtype, as CuPy does on a GPU."""
        if self.emulated and x.dtype == np.float16:
            # NumPy has no float16 GEMM with a float32 accumulator; cuBLAS (through CuPy) has.
            out = (x.astype(np.float32) @ weight.T.astype(np.float32)).astype(np.float16)
        else:
            out = x @ weight.T
        if bias is not None:
            out += bias
        return out

    def matmul_kernel(
        self,
        x: Array,
        weight: Array | QuantizedWeight,
        bias: Array | None = None,
        out: Array | None = None,
    ) -> Array:
        """[M, K] @ weight.T (+ bias) on kernels/matmul.cu, whatever M: what linear() runs for
        few rows and inside a graph capture. Float32 sums; the bias is added before the one
        rounding to the dtype. `out`, if given, is an [M, N] array of x's dtype whose rows may
        be further apart than N (columns of a wider output)."""
        quantized = isinstance(weight, QuantizedWeight)
        if quantized:
            _check_gguf_dtype(x.dtype)
        x = self.xp.ascontiguousarray(x)
        if quantized and _address(x) % 16:
            x = x.copy()  # the GGUF kernels read x 16 bytes at a time; a new array is aligned
        m, k = x.shape
        n = weight.shape[0]
        out = self.xp.empty((m, n), dtype=x.dtype) if out is None else out
        stride = _row_stride(out, (m, n), x.dtype)
        if m == 0 or n == 0:
            return out
        if bias is not None:
            bias = self._contiguous(bias, x.dtype)
        sizes = (np.int32(m), np.int32(n), np.int32(k))
        target = self._span(out, stride)
        if quantized:
            blocks, split = matmul_geometry(m, n, k // 32)
            fn = self.kernels.function("matmul", f"matmul_{weight.format}_{_SUFFIX[x.dtype]}")
            row_bytes = np.int64(weight.data.shape[1])
            args = (target, x, weight.data, bias, *sizes, row_bytes, np.int32(split))
        else:
            _check_same_dtype(x, weight)
            weight = self._contiguous(weight, x.dtype)
            blocks, split = matmul_geometry(m, n, -(-k // 8))
            vec = k % 8 == 0 and _address(x) % 16 == 0 and _address(weight) % 16 == 0
            fn = self._kernel("matmul", "matmul", x.dtype)
            args = (target, x, weight, bias, *sizes, np.int32(split), np.int32(vec))
        fn((blocks,), (MATMUL_THREADS,), (*args, np.int64(stride)))
        return out

    def dequantize(
        self,
        weight: QuantizedWeight,
        dtype: Any,
        ids: Array | None = None,
        rows: tuple[int, int] | None = None,
        scratch: bool = False,
    ) -> Array:
        """Rows of a GGUF matrix as dtype (bit-exact with the `gguf` package): those named by
        `ids` (an embedding lookup; an id out of range gives zeros), or the range `rows`
        (default all); written into the reused scratch buffer when `scratch`, which the next
        scratch use overwrites."""
        dtype = _check_gguf_dtype(dtype)
        start, stop = rows or (0, weight.shape[0])
        if not 0 <= start <= stop <= weight.shape[0]:
            raise NanovllmError(f"rows {start}..{stop} of a matrix of {weight.shape[0]} rows")
        data = weight.data[start:stop]
        if ids is not None:
            ids = self._contiguous(ids, np.int64).reshape(-1)
        count = len(ids) if ids is not None else stop - start
        cols = weight.shape[1]
        out = self._scratch_rows(count, cols, dtype) if scratch else None
        if out is None:
            out = self.xp.empty((count, cols), dtype=dtype)
        if count:
            fn = self.kernels.function("dequantize", f"dequantize_{weight.format}_{_SUFFIX[dtype]}")
            threads = count * cols // 8
            args = (
                out, data, ids, np.int32(count), np.int32(len(data)), np.int32(cols),
                np.int64(data.shape[1]),
            )  # fmt: skip
            fn((-(-threads // DEQUANTIZE_THREADS),), (DEQUANTIZE_THREADS,), args)
        return out

    def _scratch_rows(self, count: int, cols: int, dtype: Any) -> Array:
        """A [count, cols] view of the reused scratch buffer, grown when too small. Work on one
        stream runs in order, so a matmul is done with it before the next dequantize writes."""
        size = count * cols * np.dtype(dtype).itemsize
        if self._scratch is None or self._scratch.nbytes < size:
            self._scratch = None  # let the pool reuse the old buffer's memory
            self._scratch = self.xp.empty(size, dtype=np.uint8)
        return self._scratch[:size].view(dtype).reshape(count, cols)

    @contextlib.contextmanager
    def decode_matmuls(self) -> Iterator[None]:
        """Inside, linear() runs every matmul on kernels/matmul.cu whatever its row count: the
        padded decode step a CUDA graph holds, so its warm-up before capture (and its eager run
        on the emulated device) is the same computation as the graph, and allocates what the
        graph will (no dequantize scratch, no cuBLAS workspace in the graphs' pool)."""
        previous, self._kernels_only = self._kernels_only, True
        try:
            yield
        finally:
            self._kernels_only = previous

    def _capturing(self) -> bool:
        """Whether the current stream is being captured into a CUDA graph, where CuPy refuses
        cuBLAS (so every matmul must run on our kernels). Asked of `xp`, so a test stand-in for
        CuPy can answer on the emulated device too."""
        cuda = getattr(self.xp, "cuda", None)
        return cuda is not None and bool(cuda.get_current_stream().is_capturing())

    # ---- ops through kernels/ ---------------------------------------------------------------
    def rms_norm(
        self, x: Array, weight: Array, eps: float, residual: Array | None = None
    ) -> tuple[Array, Array]:
        if x.ndim == 1:  # a single vector: one row
            out, new_residual = self.rms_norm(x[None], weight, eps, residual)
            return out[0], new_residual.reshape(x.shape)
        x, token_stride = self._token_rows(x)
        hidden = x.shape[-1]
        heads = math.prod(x.shape[1:-1])  # > 1 for a [tokens, heads, head_dim] view
        rows = x.shape[0] * heads
        out = self.xp.empty(x.shape, dtype=x.dtype)
        if rows == 0:
            return out, x if residual is None else residual
        common = (np.int64(token_stride), np.int32(heads))
        x_span = self._span(x, token_stride)
        tail = (self._contiguous(weight, x.dtype), np.float32(eps), np.int32(hidden))
        block = (_threads(hidden, limit=256),)
        if residual is None:
            fn = self._kernel("norm", "rms_norm", x.dtype)
            fn((rows,), block, (out, x_span, *common, *tail))
            return out, x
        residual_out = self.xp.empty(x.shape, dtype=x.dtype)
        residual = self._contiguous(residual, x.dtype)
        fn = self._kernel("norm", "add_rms_norm", x.dtype)
        fn((rows,), block, (out, residual_out, x_span, *common, residual, *tail))
        return out, residual_out

    def rotary(self, q: Array, k: Array, positions: Array, cos_sin: Array) -> tuple[Array, Array]:
        q, q_stride = self._token_rows(q)
        k, k_stride = self._token_rows(k)
        num_tokens, num_heads, head_dim = q.shape
        _check_same_dtype(q, k)
        q_out = self.xp.empty(q.shape, dtype=q.dtype)
        k_out = self.xp.empty(k.shape, dtype=q.dtype)
        if num_tokens == 0:
            return q_out, k_out
        pairs = (num_heads + k.shape[1]) * head_dim // 2
        args = (
            q_out, k_out, self._span(q, q_stride), np.int64(q_stride),
            self._span(k, k_stride), np.int64(k_stride),
            self._contiguous(positions, np.int64), self._contiguous(cos_sin, np.float32),
            np.int32(num_heads), np.int32(k.shape[1]), np.int32(head_dim),
        )  # fmt: skip
        self._kernel("rotary", "rotary", q.dtype)((num_tokens,), (_threads(pairs),), args)
        return q_out, k_out

    def silu_and_mul(self, x: Array) -> Array:
        return self._gated(x, "silu_and_mul")

    def _gated(self, x: Array, op: str) -> Array:
        """act(gate) * up over [..., 2F] (gate | up): one block per row."""
        width = x.shape[-1] // 2
        x = self.xp.ascontiguousarray(x)
        out = self.xp.empty((*x.shape[:-1], width), dtype=x.dtype)
        rows = math.prod(x.shape[:-1])
        if rows:
            fn = self._kernel("activation", op, x.dtype)
            fn((rows,), (_threads(width),), (out, x, np.int32(width)))
        return out

    def gelu_tanh_and_mul(self, x: Array) -> Array:
        return self._gated(x, "gelu_tanh_and_mul")

    def soft_cap(self, x: Array, cap: float) -> Array:
        # CuPy elementwise kernels, in float32 whatever the logits' dtype.
        cap = np.float32(cap)
        return (self.xp.tanh(x.astype(np.float32) / cap) * cap).astype(x.dtype)

    def moe_route(self, logits: Array, top_k: int, renormalize: bool) -> tuple[Array, Array]:
        logits = self.xp.ascontiguousarray(logits)
        tokens, experts = logits.shape
        if not 0 < top_k <= experts <= MOE_MAX_EXPERTS:
            raise NanovllmError(
                f"moe_route takes 1 <= top_k <= experts <= {MOE_MAX_EXPERTS}, got top_k {top_k} "
                f"of {experts} experts"
            )
        weights = self.xp.empty((tokens, top_k), dtype=np.float32)
        ids = self.xp.empty((tokens, top_k), dtype=np.int32)
        if tokens:
            fn = self._kernel("moe", "moe_route", logits.dtype)
            args = (weights, ids, logits, np.int32(experts), np.int32(top_k), np.int32(renormalize))
            fn((tokens,), (32,), args)
        return weights, ids

    def moe_experts(self, x: Array, gate_up: Array, down: Array, weights: Array, ids: Array):
        """Sorted by expert into 16-row tiles on the device, then one grouped launch per
        projection (kernels/moe.cu); the grid is sized from an upper bound on the tiles, so
        nothing waits for the routing."""
        xp = self.xp
        x = xp.ascontiguousarray(x)
        tokens, hidden = x.shape
        experts, width = gate_up.shape[0], gate_up.shape[1] // 2
        top_k = ids.shape[1]
        out = xp.empty((tokens, hidden), dtype=x.dtype)
        if tokens == 0:
            return out
        _check_same_dtype(x, gate_up)
        _check_same_dtype(x, down)
        assignments = tokens * top_k
        max_tiles = -(-assignments // MOE_TILE_ROWS) + min(experts, assignments)
        sorted_rows = xp.empty((max_tiles * MOE_TILE_ROWS,), dtype=np.int32)
        tile_experts = xp.empty((max_tiles,), dtype=np.int32)
        num_tiles = xp.empty((1,), dtype=np.int32)
        ids = self._contiguous(ids, np.int32)
        align = self.kernels.function("moe", "moe_align")
        align(
            (1,), (MOE_ALIGN_THREADS,),
            (sorted_rows, tile_experts, num_tiles, ids, np.int32(assignments),
             np.int32(experts), np.int32(max_tiles)),
        )  # fmt: skip
        tiles = (sorted_rows, tile_experts, num_tiles)
        act = xp.empty((max_tiles * MOE_TILE_ROWS, width), dtype=x.dtype)
        fn = self._kernel("moe", "moe_gate_up", x.dtype)
        grid = (max_tiles, -(-width // MOE_TILE_COLS))
        args = (act, x, self._contiguous(gate_up, x.dtype), *tiles, np.int32(top_k))
        fn(grid, (MOE_THREADS,), (*args, np.int32(hidden), np.int32(width)))
        partial = xp.empty((assignments, hidden), dtype=np.float32)
        fn = self._kernel("moe", "moe_down", x.dtype)
        grid = (max_tiles, -(-hidden // MOE_TILE_COLS))
        args = (partial, act, self._contiguous(down, x.dtype), *tiles)
        weights = self._contiguous(weights, np.float32)
        fn(grid, (MOE_THREADS,), (*args, weights, np.int32(hidden), np.int32(width)))
        fn = self._kernel("moe", "moe_sum", x.dtype)
        fn(
            (tokens,),
            (_threads(hidden, limit=256),),
            (out, partial, np.int32(top_k), np.int32(hidden)),
        )
        return out

    def write_kv(
        self, k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array
    ) -> None:
        k, k_stride = self._token_rows(k)
        v, v_stride = self._token_rows(v)
        if k.shape[0] == 0:
            return
        _check_same_dtype(k, v)
        _check_cache(k_cache, v_cache, k.dtype)
        row_size = k.shape[1] * k.shape[2]
        args = (
            k_cache, v_cache, self._span(k, k_stride), np.int64(k_stride),
            self._span(v, v_stride), np.int64(v_stride),
            self._contiguous(slot_mapping, np.int64), np.int32(row_size),
        )  # fmt: skip
        self._kernel("cache", "write_kv", k.dtype)((k.shape[0],), (_threads(row_size),), args)

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
        q = self.xp.ascontiguousarray(q)
        num_tokens, num_heads, head_dim = q.shape
        out = self.xp.empty(q.shape, dtype=q.dtype)
        if num_tokens == 0:
            return out
        _check_cache(k_cache, v_cache, q.dtype)
        if k_cache.shape[3] != head_dim:
            raise NanovllmError(
                f"KV cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}"
            )
        if head_dim not in ATTENTION_HEAD_DIMS:
            raise NanovllmError(
                f"head_dim {head_dim} has no paged-attention kernel; kernels/paged_attention.cu "
                f"is built for {', '.join(map(str, ATTENTION_HEAD_DIMS))}"
            )
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        max_query_len = int(meta.query_lens_host.max())
        grid = (-(-max_query_len * group // ATTENTION_QUERY_VECTORS), meta.num_seqs, num_kv_heads)
        tables = self._contiguous(meta.block_tables, np.int32)
        args = (
            out, q, k_cache, v_cache, tables,
            self._contiguous(meta.query_start, np.int32),
            self._contiguous(meta.context_lens, np.int32),
            np.float32(scale), np.int32(num_heads), np.int32(num_kv_heads),
            np.int32(meta.block_size), np.int32(tables.shape[1]),
            np.int32(window), np.float32(soft_cap),
        )  # fmt: skip
        name = f"paged_attention_{_SUFFIX[q.dtype]}_d{head_dim}"
        fn = self.kernels.function("paged_attention", name)
        fn(grid, (ATTENTION_THREADS,), args, shared_mem=attention_shared_bytes(head_dim))
        return out

    def apply_token_bitmask(
        self, logits: Array, bitmask: Array, rows: Array | None = None
    ) -> Array:
        """-inf on the logits [rows, vocab] of every token a bitmask row forbids, in place; mask row
        i applies to logits row rows[i] (default i). See kernels/token_bitmask.cu."""
        num_masks = len(bitmask)
        if num_masks == 0:
            return logits
        if logits.ndim != 2 or logits.strides[1] != logits.itemsize:
            raise NanovllmError("logits must be [rows, vocab] with contiguous rows")
        if num_masks > 65535:
            raise NanovllmError(f"{num_masks} bitmask rows in one step; at most 65535")
        rows = self.xp.arange(num_masks, dtype=np.int32) if rows is None else rows
        vocab, words = logits.shape[1], bitmask.shape[1]
        stride = logits.strides[0] // logits.itemsize
        args = (
            self._span(logits, stride), self.asarray(bitmask, np.int32),
            self.asarray(rows, np.int32), np.int64(stride), np.int32(vocab), np.int32(words),
        )  # fmt: skip
        fn = self._kernel("token_bitmask", "apply_token_bitmask", logits.dtype)
        fn((-(-vocab // _MASK_THREADS), num_masks), (_MASK_THREADS,), args)
        return logits

    # ---- helpers ----------------------------------------------------------------------------
    def _kernel(self, family: str, op: str, dtype: Any):
        suffix = _SUFFIX.get(np.dtype(dtype))
        if suffix is None:
            raise NanovllmError(f"no {op} kernel for dtype {dtype}")
        return self.kernels.function(family, f"{op}_{suffix}")

    def _contiguous(self, x: Array, dtype: Any) -> Array:
        """x as a C-contiguous array of dtype, copying only when it is not one already."""
        return self.xp.ascontiguousarray(x, dtype=dtype)

    def _token_rows(self, x: Array) -> tuple[Array, int]:
        """x with contiguous inner dims, and its token (first-axis) stride in elements.

        The model slices q, k and v out of the fused qkv output: [tokens, heads, head_dim] views
        whose tokens are further apart than heads * head_dim. Kernels take that stride, so such
        views need no copy; anything else is made contiguous.
        """
        item, row = x.itemsize, math.prod(x.shape[1:])
        inner_contiguous = all(
            x.strides[axis] == math.prod(x.shape[axis + 1 :]) * item
            for axis in range(1, x.ndim)
            if x.shape[axis] > 1
        )
        stride = x.strides[0] // item if x.shape[0] > 1 else row
        if not inner_contiguous or x.strides[0] % item or stride < row:
            return self.xp.ascontiguousarray(x), row
        return x, stride

    def _span(self, x: Array, token_stride: int) -> Array:
        """The memory a [tokens, ...] view with this token stride covers, as one contiguous 1-D
        array starting at its first element: what a kernel taking (pointer, token stride) reads.
        The emulator, like a careful reviewer, accepts only contiguous arrays as pointers."""
        if x.flags.c_contiguous:
            return x
        size = (x.shape[0] - 1) * token_stride + math.prod(x.shape[1:])
        return self.xp.lib.stride_tricks.as_strided(x, shape=(size,), strides=(x.itemsize,))


def _cupy():
    try:
        import cupy
    except ImportError:
        raise NanovllmError(
            "--device cuda needs CuPy: pip install 'nanovllm[cuda]' (cupy-cuda12x and the NVRTC "
            "and CUDA runtime wheels)"
        ) from None
    try:
        available = bool(cupy.cuda.is_available())
    except Exception:
        available = False
    if not available:
        raise NanovllmError(
            "no usable CUDA GPU (cupy.cuda.is_available() is False); use --device cpu, or "
            "--device cuda-emulated to run the CUDA kernels on the CPU emulator"
        )
    return cupy


def _address(x: Array) -> int:
    """The device (or host, on the emulated device) address of an array's first element."""
    data = x.data
    return data.ptr if hasattr(data, "ptr") else x.ctypes.data


def _row_stride(out: Array, shape: tuple[int, int], dtype: Any) -> int:
    """The distance in elements between rows of a matmul's output, which must be `shape`, of
    `dtype`, with contiguous rows."""
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise NanovllmError(
            f"matmul output must be {dtype} {shape}, got {out.dtype} {tuple(out.shape)}"
        )
    if shape[1] > 1 and out.strides[1] != out.itemsize:
        raise NanovllmError("matmul output rows must be contiguous")
    return out.strides[0] // out.itemsize if shape[0] > 1 else shape[1]


def _threads(work: int, limit: int = 1024) -> int:
    """Threads per block for `work` independent items: a multiple of 32, at most `limit`."""
    return max(32, min(limit, -(-work // 32) * 32))


def _check_gguf_dtype(dtype: Any) -> np.dtype:
    """The GGUF kernels take and give the dtypes the backend computes in."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise NanovllmError(f"GGUF kernels work in float32 or float16, not {dtype}")
    return dtype


def _check_same_dtype(a: Array, b: Array) -> None:
    if a.dtype != b.dtype:
        raise NanovllmError(f"mixed dtypes {a.dtype} and {b.dtype} in one kernel call")


def _check_cache(k_cache: Array, v_cache: Array, dtype: Any) -> None:
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise NanovllmError(
            f"KV cache dtype {k_cache.dtype}/{v_cache.dtype} does not match activations {dtype}"
        )
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise NanovllmError("KV caches must be contiguous [num_blocks, block_size, heads, dim]")


def _warn_if_overflows_float16(x: Any) -> None:
    """Warn when converting a wider float host array to float16 turns values into inf."""
    if type(x) is not np.ndarray or x.dtype.kind != "f" or x.dtype.itemsize <= 2 or not x.size:
        return
    peak = float(np.abs(x).max())
    if peak > FLOAT16_MAX:
        warnings.warn(
            f"a weight of shape {x.shape} reaches {peak:.4g}, beyond float16's range "
            f"({FLOAT16_MAX:g}); it becomes inf. Use --dtype float32.",
            stacklevel=3,
        )


def bf16_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even like __float2bfloat16_rn."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def float32_from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 host array in the layout the kernels take for dtype: float32, float16, or
    bfloat16 as uint16 bits."""
    if dtype == "bfloat16":
        return bf16_from_float32(x)
    return np.asarray(x, dtype=dtype)


def from_storage(x: np.ndarray) -> np.ndarray:
    """The inverse of to_storage: float32 values of a float32, float16 or bfloat16 array."""
    if x.dtype == np.uint16:
        return float32_from_bf16(x)
    return np.asarray(x, dtype=np.float32)
