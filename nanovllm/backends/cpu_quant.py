"""Compiled CPU kernels on weights as their file stores them: GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K, Q6_K) and F16 / BF16 / F32 rows.

Each format has one row decoder, `_row_<format>(row, w, h)`: the row's blocks -> float32 values
in w, rounding exactly like the `gguf` package (no fused multiply-add; tests check bit for bit).
Two kernels per format are built on it:

- `matmul_<format>(data, x, out, col0, chunks, h)`: out[:, col0 + n] = x @ row n, for the few rows of
  x of a decode step. Threads take chunks of weight rows; each row is decoded once into a
  buffer in L1 and multiplied with every row of x, so each weight byte is read from memory once
  per step whatever the batch.
- `dequantize_<format>(data, rows, out, h)`: out[i] = row rows[i] in float32, for embeddings and
  for large batches (prefill), which multiply tiles of dequantized rows with BLAS (see cpu.py).

Kernels see one array type per argument (read-only C-contiguous weight rows, float32 activations,
int64 row indexes), so each compiles once per format.

`h` is always HALF_BLOCK (16), passed in at run time on purpose (a module constant would be
folded in): with a compile-time trip count LLVM unrolls the 16- and 32-value inner loops and then
vectorizes across blocks with gathers, 10-20x slower (measured). Inner loops run `min(h, 16)` (or
twice that) times: a run-time count that LLVM knows is small, so it vectorizes them as loops with
vectors that fit (a plain run-time count gets 32-wide vector code that 16 iterations never enter:
2.3x slower, measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from numba import prange

from nanovllm.backends import cpu_int8
from nanovllm.backends.cpu_jit import f16_bits_to_f32, inline, kernel, u32_bits_to_f32

Q = gguf.GGMLQuantizationType
F32 = np.float32
U8 = np.uint8
U16 = np.uint16
U32 = np.uint32
IX = np.uint64  # an index numba need not check for negative values
HALF_BLOCK = 16  # the `h` every kernel takes


# ---- shared pieces --------------------------------------------------------------------------
@inline(exact=True)
def _half(row, offset):
    """The IEEE half stored little-endian at row[offset:offset + 2], as float32."""
    return f16_bits_to_f32(U16(U16(row[offset]) | U16(U16(row[offset + 1]) << U16(8))))


@inline(exact=True)
def _u32(row, offset):
    return (
        np.uint32(row[offset])
        | np.uint32(row[offset + 1]) << np.uint32(8)
        | np.uint32(row[offset + 2]) << np.uint32(16)
        | np.uint32(row[offset + 3]) << np.uint32(24)
    )


@inline(exact=True)
def _k_scale_min(row, offset, j):
    """6-bit scale and min of sub-block j of a Q4_K / Q5_K block (12 packed bytes at offset)."""
    if j < 4:
        return np.int32(row[offset + j] & U8(63)), np.int32(row[offset + j + 4] & U8(63))
    scale = (row[offset + j + 4] & U8(15)) | ((row[offset + j - 4] >> U8(6)) << U8(4))
    low = (row[offset + j + 4] >> U8(4)) | ((row[offset + j] >> U8(6)) << U8(4))
    return np.int32(scale), np.int32(low)


@inline()
def _dot_two_rows(w0, w1, x, out, col):
    """out[m, col] = w0 . x[m] and out[m, col + 1] = w1 . x[m]: eight sums share each load."""
    rows, width = x.shape
    m = 0
    while m + 4 <= rows:
        x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = F32(0)
        for k in range(width):
            u, v = w0[k], w1[k]
            a0 += u * x0[k]
            a1 += u * x1[k]
            a2 += u * x2[k]
            a3 += u * x3[k]
            b0 += v * x0[k]
            b1 += v * x1[k]
            b2 += v * x2[k]
            b3 += v * x3[k]
        out[m, col], out[m + 1, col], out[m + 2, col], out[m + 3, col] = a0, a1, a2, a3
        out[m, col + 1], out[m + 1, col + 1], out[m + 2, col + 1] = b0, b1, b2
        out[m + 3, col + 1] = b3
        m += 4
    while m < rows:
        xm = x[m]
        a = b = F32(0)
        for k in range(width):
            a += w0[k] * xm[k]
            b += w1[k] * xm[k]
        out[m, col], out[m, col + 1] = a, b
        m += 1


@inline()
def _dot_rows(w, x, out, col):
    """out[m, col] = w . x[m] for every row of x; four rows share each load of w."""
    rows, width = x.shape
    m = 0
    while m + 4 <= rows:
        x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
        s0 = s1 = s2 = s3 = F32(0)
        for k in range(width):
            wk = w[k]
            s0 += wk * x0[k]
            s1 += wk * x1[k]
            s2 += wk * x2[k]
            s3 += wk * x3[k]
        out[m, col], out[m + 1, col], out[m + 2, col], out[m + 3, col] = s0, s1, s2, s3
        m += 4
    while m < rows:
        xm = x[m]
        s = F32(0)
        for k in range(width):
            s += w[k] * xm[k]
        out[m, col] = s
        m += 1


# ---- row decoders, one per format (layouts: ggml-common.h) ----------------------------------
# Indexes are cast to unsigned (IX) in inner loops: a signed index makes numba handle negative
# indexes, a select per access that stops LLVM from vectorizing the loop (6-9x slower, measured).
# Where a block byte feeds two output runs (low and high nibbles), two loops each write one
# contiguous run: one loop writing both was 1.5x slower. Offsets such as "q - 16" are subtracted
# after the conversion to float32 (exact for these small integers): numba widens integer
# arithmetic to 64 bits, and 64-bit lanes halve the vector width.


@inline(exact=True)
def _row_q8_0(row, w, h):  # 34 bytes: half d; int8 q[32]
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 32):
        o, base = b * 34, b * 32
        d = _half(row, o)
        for j in range(2 * n):
            w[IX(base + j)] = F32(np.int8(row[IX(o + 2 + j)])) * d


@inline(exact=True)
def _row_q4_0(row, w, h):  # 18 bytes: half d; uint8 qs[16] (low nibbles: values 0-15)
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 32):
        o, base = b * 18, b * 32
        d = _half(row, o)
        for j in range(n):
            w[IX(base + j)] = d * (F32(row[IX(o + 2 + j)] & U8(15)) - F32(8))
        for j in range(n):
            w[IX(base + 16 + j)] = d * (F32(row[IX(o + 2 + j)] >> U8(4)) - F32(8))


@inline(exact=True)
def _row_q4_1(row, w, h):  # 20 bytes: half d; half m; uint8 qs[16]
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 32):
        o, base = b * 20, b * 32
        d, m = _half(row, o), _half(row, o + 2)
        for j in range(n):
            w[IX(base + j)] = d * F32(row[IX(o + 4 + j)] & U8(15)) + m
        for j in range(n):
            w[IX(base + 16 + j)] = d * F32(row[IX(o + 4 + j)] >> U8(4)) + m


@inline(exact=True)
def _fifth_bit(qh, j):
    """16.0 where bit j of a Q5 block's 32 fifth bits is set: a select on a bit test, which LLVM
    keeps in 32-bit lanes (extracting the bit with a shift made it widen to 64: 1.2x slower)."""
    return F32(16) if qh & U32(U32(1) << U32(j)) else F32(0)


@inline(exact=True)
def _row_q5_0(row, w, h):  # 22 bytes: half d; uint32 qh (fifth bits); uint8 qs[16]
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 32):
        o, base = b * 22, b * 32
        d, qh = _half(row, o), _u32(row, o + 2)
        for j in range(n):
            low = F32(row[IX(o + 6 + j)] & U8(15)) + _fifth_bit(qh, j)
            w[IX(base + j)] = d * (low - F32(16))
        for j in range(n):
            high = F32(row[IX(o + 6 + j)] >> U8(4)) + _fifth_bit(qh, j + 16)
            w[IX(base + 16 + j)] = d * (high - F32(16))


@inline(exact=True)
def _row_q5_1(row, w, h):  # 24 bytes: half d; half m; uint32 qh; uint8 qs[16]
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 32):
        o, base = b * 24, b * 32
        d, m, qh = _half(row, o), _half(row, o + 2), _u32(row, o + 4)
        for j in range(n):
            low = F32(row[IX(o + 8 + j)] & U8(15)) + _fifth_bit(qh, j)
            w[IX(base + j)] = d * low + m
        for j in range(n):
            high = F32(row[IX(o + 8 + j)] >> U8(4)) + _fifth_bit(qh, j + 16)
            w[IX(base + 16 + j)] = d * high + m


@inline(exact=True)
def _row_q4_k(row, w, h):  # 144 bytes: half d, dmin; uint8 scales[12]; uint8 qs[128]
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 256):
        o, base = b * 144, b * 256
        d, dmin = _half(row, o), _half(row, o + 2)
        for chunk in range(4):  # 64 values: low nibbles of 32 bytes, then their high nibbles
            sc0, mn0 = _k_scale_min(row, o + 4, 2 * chunk)
            sc1, mn1 = _k_scale_min(row, o + 4, 2 * chunk + 1)
            d0, m0, d1, m1 = d * F32(sc0), dmin * F32(mn0), d * F32(sc1), dmin * F32(mn1)
            qs, out = o + 16 + 32 * chunk, base + 64 * chunk
            for j in range(2 * n):
                w[IX(out + j)] = d0 * F32(row[IX(qs + j)] & U8(15)) - m0
            for j in range(2 * n):
                w[IX(out + 32 + j)] = d1 * F32(row[IX(qs + j)] >> U8(4)) - m1


@inline(exact=True)
def _row_q5_k(row, w, h):  # 176 bytes: half d, dmin; scales[12]; uint8 qh[32]; uint8 qs[128]
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 256):
        o, base = b * 176, b * 256
        d, dmin = _half(row, o), _half(row, o + 2)
        for chunk in range(4):  # sub-block 2 * chunk: low nibbles and bit 2 * chunk of qh
            sc0, mn0 = _k_scale_min(row, o + 4, 2 * chunk)
            sc1, mn1 = _k_scale_min(row, o + 4, 2 * chunk + 1)
            d0, m0, d1, m1 = d * F32(sc0), dmin * F32(mn0), d * F32(sc1), dmin * F32(mn1)
            qs, qh, out = o + 48 + 32 * chunk, o + 16, base + 64 * chunk
            low_bit, high_bit = U8(1 << (2 * chunk)), U8(2 << (2 * chunk))
            for j in range(2 * n):
                fifth = F32(16) if row[IX(qh + j)] & low_bit else F32(0)
                w[IX(out + j)] = d0 * (F32(row[IX(qs + j)] & U8(15)) + fifth) - m0
            for j in range(2 * n):
                fifth = F32(16) if row[IX(qh + j)] & high_bit else F32(0)
                w[IX(out + 32 + j)] = d1 * (F32(row[IX(qs + j)] >> U8(4)) + fifth) - m1


@inline(exact=True)
def _q6_run(row, w, out, ql, qh, scale, nibble_shift, high_shift, n):
    """16 Q6_K values: 4 bits of ql bytes and 2 of qh bytes, minus 32, times their scale. The
    shifts are literals at every call: a byte shift by a variable has no vector instruction."""
    for j in range(n):
        low = F32((row[IX(ql + j)] >> U8(nibble_shift)) & U8(15))
        top = F32((row[IX(qh + j)] >> U8(high_shift)) & U8(3))
        w[IX(out + j)] = scale * (low + F32(16) * top - F32(32))


@inline(exact=True)
def _row_q6_k(row, w, h):  # 210 bytes: uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d
    n = min(h, HALF_BLOCK)  # a bound LLVM sees: it vectorizes for <= 16 iterations
    for b in range(w.size // 256):
        o, base = b * 210, b * 256
        d = _half(row, o + 208)
        for half in range(2):  # 128 values from 64 ql bytes and 32 qh bytes; a scale per 16
            ql, qh, out, sc = o + 64 * half, o + 128 + 32 * half, base + 128 * half, 8 * half
            for sub in range(2):
                at, scale = 16 * sub, o + 192 + sc + sub  # scales of the four 32-value groups
                s0, s1 = F32(np.int8(row[scale])), F32(np.int8(row[scale + 2]))
                s2, s3 = F32(np.int8(row[scale + 4])), F32(np.int8(row[scale + 6]))
                _q6_run(row, w, out + at, ql + at, qh + at, d * s0, 0, 0, n)
                _q6_run(row, w, out + 32 + at, ql + 32 + at, qh + at, d * s1, 0, 2, n)
                _q6_run(row, w, out + 64 + at, ql + at, qh + at, d * s2, 4, 4, n)
                _q6_run(row, w, out + 96 + at, ql + 32 + at, qh + at, d * s3, 4, 6, n)


@inline(exact=True)
def _row_f16(row, w, h):  # uint16 halves
    for k in range(w.size):
        w[k] = f16_bits_to_f32(row[k])


@inline(exact=True)
def _row_bf16(row, w, h):  # uint16: the top half of a float32
    for k in range(w.size):
        w[k] = u32_bits_to_f32(np.uint32(np.uint32(row[k]) << np.uint32(16)))


@inline(exact=True)
def _row_f32(row, w, h):
    for k in range(w.size):
        w[k] = row[k]


# ---- kernels: the same two per format -------------------------------------------------------
@inline()
def _matmul_chunk(row_fn, data, x, out, col0, chunks, h, chunk):
    """Weight rows of one chunk, decoded two at a time when x has several rows (2 x 4 register
    blocking: 1.2-1.4x faster dot products, measured), one at a time for a single row."""
    rows = data.shape[0]
    per = -(-rows // chunks)
    w = np.empty((2, x.shape[1]), np.float32)
    n, stop = chunk * per, min(rows, (chunk + 1) * per)
    while x.shape[0] > 1 and n + 2 <= stop:
        row_fn(data[n], w[0], h)
        row_fn(data[n + 1], w[1], h)
        _dot_two_rows(w[0], w[1], x, out, col0 + n)
        n += 2
    while n < stop:
        row_fn(data[n], w[0], h)
        _dot_rows(w[0], x, out, col0 + n)
        n += 1


@kernel(parallel=True)
def matmul_q8_0(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q8_0, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q4_0(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q4_0, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q4_1(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q4_1, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q5_0(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q5_0, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q5_1(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q5_1, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q4_k(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q4_k, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q5_k(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q5_k, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_q6_k(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_q6_k, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_f16(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_f16, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_bf16(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_bf16, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True)
def matmul_f32(data, x, out, col0, chunks, h):
    for chunk in prange(chunks):
        _matmul_chunk(_row_f32, data, x, out, col0, chunks, h, chunk)


@kernel(parallel=True, exact=True)
def dequantize_q8_0(data, rows, out, h):
    for i in prange(rows.size):
        _row_q8_0(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q4_0(data, rows, out, h):
    for i in prange(rows.size):
        _row_q4_0(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q4_1(data, rows, out, h):
    for i in prange(rows.size):
        _row_q4_1(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q5_0(data, rows, out, h):
    for i in prange(rows.size):
        _row_q5_0(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q5_1(data, rows, out, h):
    for i in prange(rows.size):
        _row_q5_1(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q4_k(data, rows, out, h):
    for i in prange(rows.size):
        _row_q4_k(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q5_k(data, rows, out, h):
    for i in prange(rows.size):
        _row_q5_k(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_q6_k(data, rows, out, h):
    for i in prange(rows.size):
        _row_q6_k(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_f16(data, rows, out, h):
    for i in prange(rows.size):
        _row_f16(data[rows[i]], out[i], h)


@kernel(parallel=True, exact=True)
def dequantize_bf16(data, rows, out, h):
    for i in prange(rows.size):
        _row_bf16(data[rows[i]], out[i], h)


# ---- the table the backend dispatches on -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Format:
    matmul: Any
    dequantize: Any | None  # None: F32 rows are their own float32 values
    view: Any  # uint8 [rows, row_bytes] -> the array the kernels take
    # matmuls on activation rows of integer codes, per precision (cpu_int8.py), where they exist
    integer: dict | None = None


def _bytes(data: np.ndarray) -> np.ndarray:
    return data.view()


def _halves(data: np.ndarray) -> np.ndarray:
    return data.view(np.uint16)


def _floats(data: np.ndarray) -> np.ndarray:
    return data.view(np.float32)


FORMATS: dict[Q, Format] = {
    Q.Q8_0: Format(matmul_q8_0, dequantize_q8_0, _bytes, cpu_int8.kernels_for(Q.Q8_0)),
    Q.Q4_0: Format(matmul_q4_0, dequantize_q4_0, _bytes, cpu_int8.kernels_for(Q.Q4_0)),
    Q.Q4_1: Format(matmul_q4_1, dequantize_q4_1, _bytes, cpu_int8.kernels_for(Q.Q4_1)),
    Q.Q5_0: Format(matmul_q5_0, dequantize_q5_0, _bytes, cpu_int8.kernels_for(Q.Q5_0)),
    Q.Q5_1: Format(matmul_q5_1, dequantize_q5_1, _bytes, cpu_int8.kernels_for(Q.Q5_1)),
    Q.Q4_K: Format(matmul_q4_k, dequantize_q4_k, _bytes, cpu_int8.kernels_for(Q.Q4_K)),
    Q.Q5_K: Format(matmul_q5_k, dequantize_q5_k, _bytes, cpu_int8.kernels_for(Q.Q5_K)),
    Q.Q6_K: Format(matmul_q6_k, dequantize_q6_k, _bytes, cpu_int8.kernels_for(Q.Q6_K)),
    Q.F16: Format(matmul_f16, dequantize_f16, _halves),
    Q.BF16: Format(matmul_bf16, dequantize_bf16, _halves),
    Q.F32: Format(matmul_f32, None, _floats),
}
