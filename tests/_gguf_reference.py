"""Reference GGML dequantizers written from the block layouts and scalar loops of ggml-quants.c
(`dequantize_row_*`), one block at a time in plain Python with float32 arithmetic, as the C code
does. Deliberately slow and literal: an independent check of the vectorized dequantizers.

Also: random valid blocks for each type (random quants, finite fp16 scales).
"""

from __future__ import annotations

import numpy as np

f32 = np.float32


def _half(block: bytes, offset: int) -> np.float32:
    return f32(np.frombuffer(block[offset : offset + 2], dtype=np.float16)[0])


def q8_0(block: bytes) -> list[float]:  # half d; int8 qs[32]
    d = _half(block, 0)
    return [d * f32(q) for q in np.frombuffer(block[2:34], dtype=np.int8)]


def q4_0(block: bytes) -> list[float]:  # half d; uint8 qs[16]
    d, qs = _half(block, 0), block[2:18]
    low = [f32((q & 0x0F) - 8) * d for q in qs]
    high = [f32((q >> 4) - 8) * d for q in qs]
    return low + high


def q4_1(block: bytes) -> list[float]:  # half d; half m; uint8 qs[16]
    d, m, qs = _half(block, 0), _half(block, 2), block[4:20]
    return [f32(q & 0x0F) * d + m for q in qs] + [f32(q >> 4) * d + m for q in qs]


def _q5_values(qh: int, qs: bytes) -> list[int]:
    low = [(qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10) for j in range(16)]
    high = [(qs[j] >> 4) | ((qh >> (j + 12)) & 0x10) for j in range(16)]
    return low + high


def q5_0(block: bytes) -> list[float]:  # half d; uint8 qh[4]; uint8 qs[16]
    d, qh = _half(block, 0), int.from_bytes(block[2:6], "little")
    return [f32(x - 16) * d for x in _q5_values(qh, block[6:22])]


def q5_1(block: bytes) -> list[float]:  # half d; half m; uint8 qh[4]; uint8 qs[16]
    d, m, qh = _half(block, 0), _half(block, 2), int.from_bytes(block[4:8], "little")
    return [f32(x) * d + m for x in _q5_values(qh, block[8:24])]


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def q4_k(block: bytes) -> list[float]:  # half d; half dmin; uint8 scales[12]; uint8 qs[128]
    d, dmin, scales, qs = _half(block, 0), _half(block, 2), block[4:16], block[16:144]
    y = []
    for n in range(4):
        q = qs[32 * n : 32 * n + 32]
        sc, m = _scale_min_k4(2 * n, scales)
        d1, m1 = d * f32(sc), dmin * f32(m)
        sc, m = _scale_min_k4(2 * n + 1, scales)
        d2, m2 = d * f32(sc), dmin * f32(m)
        y += [d1 * f32(v & 0xF) - m1 for v in q]
        y += [d2 * f32(v >> 4) - m2 for v in q]
    return y


def q5_k(block: bytes) -> list[float]:  # half d; half dmin; scales[12]; qh[32]; qs[128]
    d, dmin, scales, qh, ql = (
        _half(block, 0),
        _half(block, 2),
        block[4:16],
        block[16:48],
        block[48:176],
    )
    y, u1, u2 = [], 1, 2
    for n in range(4):
        q = ql[32 * n : 32 * n + 32]
        sc, m = _scale_min_k4(2 * n, scales)
        d1, m1 = d * f32(sc), dmin * f32(m)
        sc, m = _scale_min_k4(2 * n + 1, scales)
        d2, m2 = d * f32(sc), dmin * f32(m)
        y += [d1 * f32((q[i] & 0xF) + (16 if qh[i] & u1 else 0)) - m1 for i in range(32)]
        y += [d2 * f32((q[i] >> 4) + (16 if qh[i] & u2 else 0)) - m2 for i in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return y


def q6_k(block: bytes) -> list[float]:  # uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d
    d = _half(block, 208)
    sc = np.frombuffer(block[192:208], dtype=np.int8)
    y = [f32(0)] * 256
    for n in range(2):
        ql, qh, s = (
            block[64 * n : 64 * n + 64],
            block[128 + 32 * n : 160 + 32 * n],
            sc[8 * n : 8 * n + 8],
        )
        for i in range(32):
            k = i // 16
            q1 = ((ql[i] & 0xF) | (((qh[i] >> 0) & 3) << 4)) - 32
            q2 = ((ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4)) - 32
            q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32
            q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32
            base = 128 * n + i
            y[base] = d * f32(s[k]) * f32(q1)
            y[base + 32] = d * f32(s[k + 2]) * f32(q2)
            y[base + 64] = d * f32(s[k + 4]) * f32(q3)
            y[base + 96] = d * f32(s[k + 6]) * f32(q4)
    return y


def bf16(block: bytes) -> list[float]:  # the top 16 bits of a float32
    return list((np.frombuffer(block, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32))


def f16(block: bytes) -> list[float]:
    return list(np.frombuffer(block, dtype=np.float16).astype(np.float32))


# name -> (reference, elements per block, bytes per block, byte offsets of fp16 scale fields)
SPEC = {
    "F16": (f16, 1, 2, ()),
    "BF16": (bf16, 1, 2, ()),
    "Q8_0": (q8_0, 32, 34, (0,)),
    "Q4_0": (q4_0, 32, 18, (0,)),
    "Q4_1": (q4_1, 32, 20, (0, 2)),
    "Q5_0": (q5_0, 32, 22, (0,)),
    "Q5_1": (q5_1, 32, 24, (0, 2)),
    "Q4_K": (q4_k, 256, 144, (0, 2)),
    "Q5_K": (q5_k, 256, 176, (0, 2)),
    "Q6_K": (q6_k, 256, 210, (208,)),
}
# fp16 scale offsets of the types checked against transformers' dequantizer instead
HALF_FIELDS = {"Q2_K": (256, 84, (80, 82)), "Q3_K": (256, 110, (108,))}


def random_blocks(
    rng: np.random.Generator, n_blocks: int, block_bytes: int, halves: tuple[int, ...]
) -> np.ndarray:
    """Random bytes, except that fp16 scale fields hold finite values of a weight's magnitude.
    For F16 and BF16 (no scale fields) the values are random finite numbers instead."""
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in halves:
        scale = (rng.uniform(-1, 1, n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def random_float_bytes(rng: np.random.Generator, count: int, name: str) -> np.ndarray:
    values = rng.normal(0, 2, count).astype(np.float32)
    if name == "F16":
        return values.astype(np.float16).view(np.uint8)
    return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16: truncate


def reference_dequantize(name: str, raw: np.ndarray) -> np.ndarray:
    ref, _, block_bytes, _ = SPEC[name]
    flat = raw.reshape(-1, block_bytes)
    return np.array([v for block in flat for v in ref(block.tobytes())], dtype=np.float32)


def random_matrix_bytes(rng: np.random.Generator, name: str, rows: int, cols: int) -> np.ndarray:
    """uint8 [rows, row_bytes]: a random valid matrix of `name` (a key of SPEC, or F32), stored
    row by row as a GGUF file does."""
    if name == "F32":
        return rng.normal(0, 1, (rows, cols)).astype(np.float32).view(np.uint8)
    if name in ("F16", "BF16"):
        return random_float_bytes(rng, rows * cols, name).reshape(rows, -1)
    _, per_block, block_bytes, halves = SPEC[name]
    blocks = random_blocks(rng, rows * cols // per_block, block_bytes, halves)
    return blocks.reshape(rows, -1)
