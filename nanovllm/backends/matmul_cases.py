"""Op cases for the matmul and GGUF kernels: random inputs, the CUDA backend's result and the
reference, shared by tests/test_kernels_matmul.py (on the emulator) and `nanovllm check`.

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

Results = tuple[list[np.ndarray], list[np.ndarray]]  # (kernel outputs, reference), float32
QTYPES = {name: gguf.GGMLQuantizationType[name.upper()] for name in GGUF_FORMATS}
# Byte offsets of the float16 scale fields of one block, for the formats built from random bytes.
_K_QUANT_SCALES = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
# M, the row counts a decode step may have: one tile (4 rows), several, and partial tiles.
DECODE_ROWS = (1, 2, 3, 5, 8, 16, 33)


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


def matmul_checks(backend: CUDABackend, dtypes: Sequence[str]) -> list[tuple[str, Callable]]:
    """(name, case) pairs for `nanovllm check`: each case(rng) returns Results in its dtype."""
    checks = []
    for dtype in dtypes:
        checks.append((f"matmul {dtype}", lambda rng, d=dtype: case_matmul(backend, d, rng)))
        if dtype == "bfloat16":
            continue  # the GGUF kernels take the dtypes the backend computes in
        for fmt in GGUF_FORMATS:
            checks.append(
                (
                    f"matmul {fmt.upper()} {dtype}",
                    lambda rng, d=dtype, f=fmt: case_quantized_matmul(backend, d, rng, f),
                )
            )
    return checks
