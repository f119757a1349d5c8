"""Integer dot products for decode matmuls on the simple GGUF block formats (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1), the way llama.cpp computes them: each activation row is quantized to Q8_0 blocks
(32 int8 values and a scale, bit for bit as the `gguf` package quantizes), and a weight block
meets an activation block as one integer dot product of 32 bytes, scaled once:

    w . x = sum over blocks b of  d_w[b] * d_x[b] * sum_j u[j] * q[j]  +  offset[b] * d_x[b] * sum_j q[j]

where u is the block's unsigned code (0..15, 0..31, or 0..255 for Q8_0 read as q + 128) and
offset is the block's min (Q4_1, Q5_1) or -zero * d_w (Q4_0: 8, Q5_0: 16, Q8_0: 128). The sums of
q per block are computed once per activation row.

The row dot product is written in LLVM IR (a numba intrinsic per format and row count): a loop
over blocks that unpacks 32 codes into one 256-bit vector, multiplies it with the activation
block (`vpdpbusd` where the CPU has AVX-VNNI / AVX512-VNNI, else widening multiplies that every
target has), and accumulates eight float lanes per activation row; one horizontal sum per row at
the end. numba cannot express a vector register or that instruction, and its integer arithmetic
widens to 64 bits, so the same loop written in Python ran at a quarter of the float kernels' speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from nanovllm.backends.cpu_jit import inline, kernel

Q = gguf.GGMLQuantizationType
BLOCK = 32
ROWS = 4  # activation rows that share one unpacked weight block


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a block's parts are (byte offsets, ggml-common.h) and how its code becomes a value."""

    block_bytes: int
    bits: int  # 4, 5 (4 + one bit from qh) or 8
    qs: int
    d: int = 0
    m: int | None = None  # value = d * code + m; None: value = d * (code - zero)
    qh: int | None = None
    zero: int = 0


LAYOUTS: dict[Q, Layout] = {
    Q.Q8_0: Layout(34, 8, qs=2, zero=128),
    Q.Q4_0: Layout(18, 4, qs=2, zero=8),
    Q.Q4_1: Layout(20, 4, qs=4, m=2),
    Q.Q5_0: Layout(22, 5, qs=6, qh=2, zero=16),
    Q.Q5_1: Layout(24, 5, qs=8, m=2, qh=4),
}


def vector_blocks() -> int:
    """Blocks per vpdpbusd for the CPU numba compiles for: 2 (512 bits, AVX512-VNNI), 1 (256
    bits, AVX-VNNI), or 0: no VNNI, widening multiplies instead (one block at a time)."""
    if config.CPU_FEATURES:  # NUMBA_CPU_FEATURES: what numba targets instead of the host
        has = {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    elif config.CPU_NAME and config.CPU_NAME != "host":
        has = set()  # a named generic target: assume nothing
    else:
        features = llvm.get_host_cpu_features()
        has = {name for name in features if features[name]}
    if {"avx512vnni", "avx512vl", "avx512bw"} <= has:
        return 2
    return 1 if "avxvnni" in has else 0


# ---- LLVM IR ----------------------------------------------------------------------------------
I8, I32, I64, F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
LANES = 8  # int32 / float32 lanes per block: 32 codes, 4 to a lane


def _vec(element: ir.Type, count: int) -> ir.VectorType:
    return ir.VectorType(element, count)


def _indexes(values) -> ir.Constant:
    values = list(values)
    return ir.Constant(_vec(I32, len(values)), values)


class _Emitter:
    """IR for the row dot products: loads at byte addresses and one iteration over `width`
    consecutive blocks (1, or 2 with 512-bit vectors)."""

    def __init__(self, builder: ir.IRBuilder, layout: Layout, vnni: int) -> None:
        self.b = builder
        self.layout = layout
        self.vnni = vnni

    def load(self, address: ir.Value, offset: ir.Value, typ: ir.Type) -> ir.Value:
        pointer = self.b.inttoptr(self.b.add(address, offset), ir.PointerType())
        return self.b.load(pointer, typ=typ, align=1)

    def concat(self, parts: list[ir.Value]) -> ir.Value:
        """Vectors of equal length, one after the other (one or two of them)."""
        if len(parts) == 1:
            return parts[0]
        count = parts[0].type.count
        return self.b.shuffle_vector(parts[0], parts[1], _indexes(range(2 * count)))

    def per_block(self, blocks: list[ir.Value], offset: int) -> ir.Value:
        """The half at `offset` of each block, each repeated over the block's eight lanes."""
        b, width = self.b, len(blocks)
        values = ir.Constant(_vec(F32, width), ir.Undefined)
        for i, block in enumerate(blocks):
            bits = self.load(block, I64(offset), ir.IntType(16))
            value = b.fpext(b.bitcast(bits, ir.HalfType()), F32)
            values = b.insert_element(values, value, I32(i))
        mask = _indexes(i for i in range(width) for _ in range(LANES))
        return b.shuffle_vector(values, values, mask)

    def codes(self, blocks: list[ir.Value]) -> ir.Value:
        """The blocks' unsigned codes, 32 a block in value order, as <32 * width x i8>."""
        b, layout, width = self.b, self.layout, len(blocks)
        if layout.bits == 8:  # int8 q -> q + 128 as uint8
            raw = self.concat([self.load(k, I64(layout.qs), _vec(I8, 32)) for k in blocks])
            return b.xor(raw, ir.Constant(raw.type, 0x80))
        packed = self.concat([self.load(k, I64(layout.qs), _vec(I8, 16)) for k in blocks])
        low = b.and_(packed, ir.Constant(packed.type, 15))  # value j of block i: byte j's low
        high = b.lshr(packed, ir.Constant(packed.type, 4))  # value j + 16: its high nibble
        order = [base + j for i in range(width) for base in (16 * i, 16 * (width + i))
                 for j in range(16)]  # fmt: skip
        codes = b.shuffle_vector(low, high, _indexes(order))
        if layout.bits == 5:  # bit j of qh is the fifth bit of value j
            bits = [b.bitcast(self.load(k, I64(layout.qh), I32), _vec(ir.IntType(1), 32))
                    for k in blocks]  # fmt: skip
            fifth = b.zext(self.concat(bits), codes.type)
            codes = b.or_(codes, b.shl(fifth, ir.Constant(codes.type, 4)))
        return codes

    def dot(self, start: ir.Value, codes: ir.Value, activations: ir.Value) -> ir.Value:
        """start + lane sums of codes (unsigned) times activations (signed), four pairs a lane."""
        b, lanes = self.b, codes.type.count // 4
        vector = _vec(I32, lanes)
        if self.vnni:
            name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
            fn = cgutils.get_or_insert_function(
                b.module, ir.FunctionType(vector, [vector] * 3), name
            )
            return b.call(fn, [start, b.bitcast(codes, vector), b.bitcast(activations, vector)])
        wide = _vec(I32, 4 * lanes)
        products = b.mul(b.zext(codes, wide), b.sext(activations, wide))
        total = start
        for k in range(4):  # lane i sums products 4i .. 4i + 3, as vpdpbusd does
            total = b.add(total, b.shuffle_vector(products, products,
                                                  _indexes(4 * i + k for i in range(lanes))))  # fmt: skip
        return total

    def fmuladd(self, a: ir.Value, c: ir.Value, acc: ir.Value) -> ir.Value:
        name = f"llvm.fmuladd.v{a.type.count}f32"
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(a.type, [a.type] * 3), name
        )
        return self.b.call(fn, [a, c, acc])

    def horizontal_sum(self, vector: ir.Value) -> ir.Value:
        b = self.b
        while vector.type.count > 1:
            half = vector.type.count // 2
            vector = b.fadd(b.shuffle_vector(vector, vector, _indexes(range(half))),
                            b.shuffle_vector(vector, vector, _indexes(range(half, 2 * half))))  # fmt: skip
        return b.extract_element(vector, I32(0))


def _row_dot(layout: Layout, rows: int, vnni: int):
    """An intrinsic (row, x, blocks, k) -> `rows` float32 dot products of one stored weight row
    (byte address) with activation rows m = 0..rows-1 of a QuantizedRows at byte address x."""
    width = max(vnni, 1)  # blocks per iteration
    shift = {8: 3, 16: 4, 128: 7}.get(layout.zero, 0)

    @intrinsic
    def row_dot(typingctx, row, x, blocks, k):
        arguments = (row, x, blocks, k)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in arguments):
            return None
        result = types.UniTuple(types.float32, rows) if rows > 1 else types.float32

        def codegen(context, builder, signature, args):
            row, x, blocks, k = args
            e = _Emitter(builder, layout, vnni)

            def iteration(first: ir.Value, count: int, accs: list) -> None:
                blocks_here = [builder.add(row, builder.mul(builder.add(first, I64(i)),
                                                            I64(layout.block_bytes)))
                               for i in range(count)]  # fmt: skip
                d = e.per_block(blocks_here, layout.d)
                minimum = e.per_block(blocks_here, layout.m) if layout.m is not None else None
                codes = e.codes(blocks_here)
                ints, floats = _vec(I32, LANES * count), _vec(F32, LANES * count)
                for m, acc in enumerate(accs):
                    # activation row m: codes, scales, sums, scaled sums; k bytes each
                    at = builder.add(builder.mul(I64(m), builder.mul(k, I64(4))),
                                     builder.mul(first, I64(BLOCK)))  # fmt: skip
                    activations = e.load(x, at, _vec(I8, BLOCK * count))
                    if shift:  # -zero * (sum of the codes) in each block's first lane
                        sums = e.load(x, builder.add(at, builder.mul(k, I64(2))), ints)
                        start = builder.shl(sums, ir.Constant(ints, shift))
                    else:
                        start = ir.Constant(ints, 0)
                    dot = builder.sitofp(e.dot(start, codes, activations), floats)
                    scaled = builder.fmul(dot, e.load(x, builder.add(at, k), floats))
                    value = e.fmuladd(scaled, d, builder.load(acc))
                    if minimum is not None:  # + min * d_x * (sum of the codes)
                        scaled_sums = e.load(x, builder.add(at, builder.mul(k, I64(3))), floats)
                        value = e.fmuladd(scaled_sums, minimum, value)
                    builder.store(value, acc)

            totals = []

            def loop(first_block: ir.Value, count: ir.Value, step: int) -> None:
                accs = [cgutils.alloca_once_value(builder, ir.Constant(_vec(F32, LANES * step), 0.0))
                        for _ in range(rows)]  # fmt: skip
                with cgutils.for_range(builder, count) as it:
                    iteration(
                        builder.add(first_block, builder.mul(it.index, I64(step))), step, accs
                    )
                totals.append([e.horizontal_sum(builder.load(a)) for a in accs])

            loop(I64(0), builder.udiv(blocks, I64(width)), width)
            if width > 1:  # the odd last block
                done = builder.mul(builder.udiv(blocks, I64(width)), I64(width))
                loop(done, builder.sub(blocks, done), 1)
            sums_ = [totals[0][m] if len(totals) == 1 else builder.fadd(totals[0][m], totals[1][m])
                     for m in range(rows)]  # fmt: skip
            if rows == 1:
                return sums_[0]
            return context.make_tuple(builder, signature.return_type, sums_)

        return result(*arguments), codegen

    return row_dot


VNNI = vector_blocks()
_Q8_0_1, _Q8_0_4 = _row_dot(LAYOUTS[Q.Q8_0], 1, VNNI), _row_dot(LAYOUTS[Q.Q8_0], ROWS, VNNI)
_Q4_0_1, _Q4_0_4 = _row_dot(LAYOUTS[Q.Q4_0], 1, VNNI), _row_dot(LAYOUTS[Q.Q4_0], ROWS, VNNI)
_Q4_1_1, _Q4_1_4 = _row_dot(LAYOUTS[Q.Q4_1], 1, VNNI), _row_dot(LAYOUTS[Q.Q4_1], ROWS, VNNI)
_Q5_0_1, _Q5_0_4 = _row_dot(LAYOUTS[Q.Q5_0], 1, VNNI), _row_dot(LAYOUTS[Q.Q5_0], ROWS, VNNI)
_Q5_1_1, _Q5_1_4 = _row_dot(LAYOUTS[Q.Q5_1], 1, VNNI), _row_dot(LAYOUTS[Q.Q5_1], ROWS, VNNI)


# ---- activations ------------------------------------------------------------------------------
@intrinsic
def _to_half_and_back(typingctx, value):
    """float32 -> the nearest IEEE half (round to nearest even) -> float32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), F32)

    return types.float32(types.float32), codegen


@kernel(exact=True)
def quantize_rows(x, codes, scales, sums, scaled_sums):
    """Each row of x in Q8_0 blocks, as `gguf.quants.quantize(x, Q8_0)` computes them: codes
    round(x / d) (halves away from zero) with d = max|x| / 127, the scale stored as a half. Per
    block b, eight lanes each: scales[m, b] = d (every lane), sums[m, b] = (-sum of the codes,
    0, ...), scaled_sums[m, b] = (d * sum of the codes, 0, ...), as the row dot products add
    them to a block's lanes."""
    rows, width = x.shape
    for m in range(rows):
        for b in range(width // BLOCK):
            top = np.float32(0)
            for j in range(BLOCK):
                top = max(top, abs(x[m, b * BLOCK + j]))
            d = top / np.float32(127)
            inverse = np.float32(1) / d if d != 0 else np.float32(0)
            total = 0
            for j in range(BLOCK):
                v = x[m, b * BLOCK + j] * inverse
                a = abs(v)
                whole = np.floor(a)
                q = whole + np.floor(np.float32(2) * (a - whole))  # gguf's np_roundf
                code = np.int8(q if v >= 0 else -q)
                codes[m, b * BLOCK + j] = code
                total += code
            d = _to_half_and_back(d)
            scales[m, b, :] = d
            sums[m, b, :] = 0
            sums[m, b, 0] = -total
            scaled_sums[m, b, :] = 0
            scaled_sums[m, b, 0] = d * np.float32(total)


@inline()
def _chunk(dot1, dot4, data, x, out, col0, chunks, chunk):
    """out[:, col0 + n] for the weight rows n of one chunk, four activation rows per call."""
    rows, count, width = data.shape[0], x.shape[0], x.shape[1] // 4
    per = -(-rows // chunks)
    base, stride, x0, x_stride = data.ctypes.data, data.strides[0], x.ctypes.data, x.strides[0]
    blocks = width // BLOCK
    for n in range(chunk * per, min(rows, (chunk + 1) * per)):
        row = base + n * stride
        m = 0
        while m + 4 <= count:
            out[m, col0 + n], out[m + 1, col0 + n], out[m + 2, col0 + n], out[m + 3, col0 + n] = (
                dot4(row, x0 + m * x_stride, blocks, width)
            )
            m += 4
        while m < count:
            out[m, col0 + n] = dot1(row, x0 + m * x_stride, blocks, width)
            m += 1


@kernel(parallel=True)
def matmul_q8_0(data, x, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q8_0_1, _Q8_0_4, data, x, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q4_0(data, x, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q4_0_1, _Q4_0_4, data, x, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q4_1(data, x, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q4_1_1, _Q4_1_4, data, x, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q5_0(data, x, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q5_0_1, _Q5_0_4, data, x, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q5_1(data, x, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q5_1_1, _Q5_1_4, data, x, out, col0, chunks, chunk)


MATMULS = {
    Q.Q8_0: matmul_q8_0,
    Q.Q4_0: matmul_q4_0,
    Q.Q4_1: matmul_q4_1,
    Q.Q5_0: matmul_q5_0,
    Q.Q5_1: matmul_q5_1,
}


class QuantizedRows:
    """Activation rows in Q8_0 blocks as the int8 matmuls read them: per row, k bytes each of
    codes (int8), per-block scales, sums and scaled sums (eight 4-byte lanes a block)."""

    def __init__(self, x: np.ndarray) -> None:
        rows, width = x.shape
        self.packed = np.empty((rows, 4 * width), np.uint8)
        lanes = (rows, width // BLOCK, 8)
        self.codes = self.packed[:, :width].view(np.int8)
        self.scales = self.packed[:, width : 2 * width].view(np.float32).reshape(lanes)
        self.sums = self.packed[:, 2 * width : 3 * width].view(np.int32).reshape(lanes)
        scaled_sums = self.packed[:, 3 * width :].view(np.float32).reshape(lanes)
        quantize_rows(x, self.codes, self.scales, self.sums, scaled_sums)

    def matmul(self, kernel, data: np.ndarray, out: np.ndarray, col0: int, chunks: int) -> None:
        """out[:, col0 + n] = these rows . weight row n, by one of the matmuls above."""
        kernel(data, self.packed, out, col0, chunks)
