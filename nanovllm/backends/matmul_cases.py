"""Op cases for the matmul and GGUF kernels: random inputs, the CUDA backend's result and the
reference, shared by tests/test_kernels_matmul.py (on the emulator), `nanovllm check` and the
start-up self-check (backends/self_check.py), which runs those of the formats a model uses.

The references are NumPy in float64 on the same rounded inputs, and the `gguf` package's own
dequantization for every quantized format. Quantized blocks come from `gguf.quants.quantize`
where the package can quantize the type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and are random bytes
with finite, moderate float16 scales for the K-quants, which it cannot produce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gguf
import numpy as np

from nanovllm.backends.cuda import CUDABackend, from_storage, to_storage
from nanovllm.backends.kernel_library import GGUF_FORMATS
from nanovllm.models.quantized import QuantizedTensor, concat_rows

Results = tuple[list[np.ndarray], list[np.ndarray]]  # (kernel outputs, reference), float32
QTYPES = {name: gguf.GGMLQuantizationType[name.upper()] for name in GGUF_FORMATS}
# Byte offsets of the float16 scale fields of one block, for the formats built from random bytes.
_K_QUANT_SCALES = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
# M, the row counts a decode step may have: one tile (4 rows), several, and partial tiles.
DECODE_ROWS = (1, 2, 3, 5, 8, 16, 33)
# Row counts on both sides of linear()'s thresholds: our kernel, then cuBLAS (dense) or
# dequantize + cuBLAS (GGUF).
LINEAR_ROWS = (1, 8, 40)
DENSE = "dense"


def random_values(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    """Float32 values exactly representable in dtype, so kernel and reference see one input."""
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    return from_storage(to_storage(values, dtype))


def random_blocks(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes]: a GGUF matrix in format `fmt` with values of order 0.1."""
    qtype = QTYPES[fmt]
    if fmt not in _K_QUANT_SCALES:
        return gguf.quants.quantize(random_values(rng, (rows, cols), "float32", 0.1), qtype)
    block_values, block_bytes = GGUF_FORMATS[fmt]
    blocks = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    for offset in _K_QUANT_SCALES[fmt]:
        # A sub-block value is at most (63 * 31) or (128 * 32) times its scale: keep it ~0.1.
        scales = rng.uniform(2**-16, 2**-14, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def dequantized(fmt: str, blocks: np.ndarray) -> np.ndarray:
    """The oracle: the `gguf` package's dequantization, float32 [rows, cols]."""
    return gguf.quants.dequantize(blocks, QTYPES[fmt])


def _reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    out = x.astype(np.float64) @ weight.astype(np.float64).T
    return (out if bias is None else out + bias).astype(np.float32)


def _decode_rows(backend, x: np.ndarray, dtype: str, offset: int):
    """x on the device, starting `offset` elements into a larger buffer (a misaligned view)."""
    storage = to_storage(x, dtype)
    if not offset:
        return backend.asarray(storage)
    buffer = backend.asarray(np.zeros(storage.size + offset, dtype=storage.dtype))
    view = buffer[offset:].reshape(storage.shape)
    view[...] = backend.asarray(storage)
    return view


def case_matmul(
    backend: CUDABackend,
    dtype: str,
    rng: np.random.Generator,
    rows: Sequence[int] = DECODE_ROWS,
    out_features: int = 19,
    in_features: int = 200,
    bias: bool = True,
    x_offset: int = 0,
) -> Results:
    """Dense x @ W.T + b on the matmul kernel for each row count; x_offset > 0 hands the kernel a
    misaligned x, so it must read element by element."""
    weight = random_values(rng, (out_features, in_features), dtype, in_features**-0.5)
    b = random_values(rng, (out_features,), dtype) if bias else None
    dev_w = backend.asarray(to_storage(weight, dtype))
    dev_b = backend.asarray(to_storage(b, dtype)) if bias else None
    got, want = [], []
    for m in rows:
        x = random_values(rng, (m, in_features), dtype)
        out = backend.matmul_kernel(_decode_rows(backend, x, dtype, x_offset), dev_w, dev_b)
        got.append(from_storage(backend.to_numpy(out)))
        want.append(_reference(x, weight, b))
    return got, want


def case_quantized_matmul(
    backend: CUDABackend,
    dtype: str,
    rng: np.random.Generator,
    fmt: str = "q4_k",
    rows: Sequence[int] = DECODE_ROWS,
    out_features: int = 19,
    in_features: int = 1280,
    bias: bool = True,
    x_offset: int = 0,
) -> Results:
    """x @ dequantize(W).T + b with W in GGUF format `fmt`, on the matmul kernel."""
    blocks = random_blocks(fmt, out_features, in_features, rng)
    weight = dequantized(fmt, blocks)
    b = random_values(rng, (out_features,), dtype) if bias else None
    dev_w = backend.quantized_weight(QTYPES[fmt], (out_features, in_features), blocks)
    dev_b = backend.asarray(to_storage(b, dtype)) if bias else None
    # x scaled so each output is of order 1, where float32 rounding is well inside tolerance.
    x_scale = 1.0 / max(1e-6, float(np.sqrt(np.mean(weight**2) * in_features)))
    got, want = [], []
    for m in rows:
        x = random_values(rng, (m, in_features), dtype, x_scale)
        out = backend.matmul_kernel(_decode_rows(backend, x, dtype, x_offset), dev_w, dev_b)
        got.append(from_storage(backend.to_numpy(out)))
        want.append(_reference(x, weight, b))
    return got, want


def dequantize_exactly(
    backend: CUDABackend,
    dtype: str,
    rng: np.random.Generator,
    fmt: str = "q4_k",
    out_features: int = 19,
    in_features: int = 512,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(what, kernel result, the gguf package's values rounded to dtype) for the whole matrix, a
    range of rows (the chunked prefill path) and an embedding lookup with repeated ids."""
    blocks = random_blocks(fmt, out_features, in_features, rng)
    want = dequantized(fmt, blocks).astype(dtype)
    weight = backend.quantized_weight(QTYPES[fmt], (out_features, in_features), blocks)
    ids = rng.integers(0, out_features, 7)
    ids[-1] = ids[0]
    span = (1, out_features - 2)
    host = backend.to_numpy
    return [
        ("all rows", host(backend.dequantize(weight, dtype)), want),
        ("a range of rows", host(backend.dequantize(weight, dtype, rows=span)), want[1:-2]),
        ("ids", host(backend.dequantize(weight, dtype, backend.asarray(ids))), want[ids]),
    ]


def stored_matrix(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> QuantizedTensor:
    """A random matrix as the loader hands it: GGUF blocks, or float16 rows for DENSE."""
    if fmt == DENSE:
        values = random_values(rng, (rows, cols), "float16", cols**-0.5).astype(np.float16)
        return QuantizedTensor.from_array(values)
    return QuantizedTensor(QTYPES[fmt], (rows, cols), random_blocks(fmt, rows, cols, rng))


def case_linear(
    backend: CUDABackend,
    dtype: str,
    rng: np.random.Generator,
    fmts: Sequence[str] = (DENSE,),
    rows: Sequence[int] = LINEAR_ROWS,
    out_features: int = 19,
    in_features: int = 512,
) -> Results:
    """backend.linear() with a bias, through backend.weight() as the model calls it, at row
    counts on both sides of the kernel/cuBLAS thresholds. Several formats: a fused weight whose
    rows are one part per format (one matmul per part into its columns)."""
    parts = [stored_matrix(fmt, out_features, in_features, rng) for fmt in fmts]
    weight = np.concatenate([p.dequantize() for p in parts])
    device_weight = backend.weight(concat_rows(parts) if len(parts) > 1 else parts[0])
    b = random_values(rng, (len(weight),), dtype)
    dev_b = backend.asarray(to_storage(b, dtype))
    x_scale = 1.0 / max(1e-6, float(np.sqrt(np.mean(weight**2) * in_features)))
    got, want = [], []
    for m in rows:
        x = random_values(rng, (m, in_features), dtype, x_scale)
        out = backend.linear(backend.asarray(to_storage(x, dtype)), device_weight, dev_b)
        got.append(from_storage(backend.to_numpy(out)))
        want.append(_reference(x, weight, b))
    return got, want


def case_embedding(
    backend: CUDABackend, dtype: str, rng: np.random.Generator, fmt: str = DENSE
) -> Results:
    """Rows of a token table (dense, or GGUF blocks dequantized by id), repeated ids included."""
    table = stored_matrix(fmt, 37, 256, rng)
    device_table = backend.weight(table)
    ids = rng.integers(0, 37, 11)
    ids[-1] = ids[0]
    rows = backend.embedding(backend.asarray(ids.astype(np.int64)), device_table)
    want = from_storage(to_storage(table.dequantize(), dtype))[ids]
    return [from_storage(backend.to_numpy(rows))], [want]


def matmul_checks(
    backend: CUDABackend, dtypes: Sequence[str], formats: Sequence[str] | None = None
) -> list[tuple[str, str, Callable]]:
    """(name, dtype, case) triples for `nanovllm check` and the self-check, case(rng) -> Results:
    the decode kernel at every decode row count, linear() on each of its paths, and embedding,
    dense and for each GGUF format in `formats` (default: all); with two or more formats, a
    fused weight of mixed parts."""
    formats = list(GGUF_FORMATS) if formats is None else [f for f in formats if f != DENSE]
    checks = []
    for dtype in dtypes:
        # linear() and embedding() take weights prepared in the backend's own dtype.
        same = (
            backend if backend.dtype == dtype or dtype == "bfloat16" else backend.with_dtype(dtype)
        )

        def add(name: str, case: Callable, d: str = dtype, b=same, **kwargs) -> None:
            checks.append((f"{name} {d}", d, lambda rng: case(b, d, rng, **kwargs)))

        add("matmul", case_matmul)
        if dtype == "bfloat16":
            continue  # the backend computes in float32 or float16; only the kernel takes bf16
        add("linear", case_linear)
        add("embedding", case_embedding)
        for fmt in formats:
            name = fmt.upper()
            add(f"matmul {name}", case_quantized_matmul, fmt=fmt)
            add(f"linear {name}", case_linear, fmts=(fmt,))
            add(f"embedding {name}", case_embedding, fmt=fmt)
        if len(formats) > 1:
            add(f"linear fused {'+'.join(formats[:2]).upper()}", case_linear, fmts=formats[:2])
    return checks
