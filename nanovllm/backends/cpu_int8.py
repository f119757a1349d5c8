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


@dataclass(frozen=True, slots=True)
class Precision:
    """How activation rows are rounded: `bits` a code, and the int32 lanes one 32-value block's
    dot product lands in (vpdpbusd: four byte pairs a lane; vpdpwssd: two 16-bit pairs)."""

    bits: int
    lanes: int
    largest: int  # the largest code
    # Per block, the row record holds its scale, code sum and scaled sum spread over its lanes
    # (loaded as they are: one 512-bit vector holds two Q8 blocks), or once (compact: a 16-bit
    # block fills a vector, and a broadcast is free; the records of 16 rows then stay in L1).
    stored_lanes: int

    def record_bytes(self, k: int) -> int:
        """Bytes of one activation row of k values: codes, then scales, sums and scaled sums."""
        return k * self.bits // 8 + 3 * k * self.stored_lanes // 8


Q8 = Precision(8, 8, 127, 8)  # llama.cpp's: Q8_0 blocks, bit for bit as gguf quantizes
Q16 = Precision(16, 16, 32767, 1)  # 16-bit codes, a float32 scale: ~1e-5 of the block's largest


# ---- LLVM IR ----------------------------------------------------------------------------------
I8, I16, I32, I64, F32 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                          ir.FloatType())  # fmt: skip


def _vec(element: ir.Type, count: int) -> ir.VectorType:
    return ir.VectorType(element, count)


def _indexes(values) -> ir.Constant:
    values = list(values)
    return ir.Constant(_vec(I32, len(values)), values)


class _Emitter:
    """IR for the row dot products: loads at byte addresses and the pieces of one iteration
    over consecutive blocks (1, or 2 with 512-bit vectors)."""

    def __init__(self, builder: ir.IRBuilder, layout: Layout, precision: Precision, vnni: int):
        self.b = builder
        self.layout = layout
        self.precision = precision
        self.vnni = vnni

    def load(self, address: ir.Value, offset: ir.Value, typ: ir.Type) -> ir.Value:
        pointer = self.b.inttoptr(self.b.add(address, offset), ir.PointerType())
        return self.b.load(pointer, typ=typ, align=1)

    def concat(self, parts: list[ir.Value]) -> ir.Value:
        """Vectors of equal length (a power of two of them), one after the other."""
        while len(parts) > 1:
            count = parts[0].type.count
            parts = [self.b.shuffle_vector(a, c, _indexes(range(2 * count)))
                     for a, c in zip(parts[::2], parts[1::2], strict=True)]  # fmt: skip
        return parts[0]

    def pieces(self, vector: ir.Value, size: int) -> list[ir.Value]:
        return [self.b.shuffle_vector(vector, vector, _indexes(range(i, i + size)))
                for i in range(0, vector.type.count, size)]  # fmt: skip

    def per_block(self, blocks: list[ir.Value], offset: int) -> ir.Value:
        """The half at `offset` of each block, repeated over the block's lanes."""
        b, width = self.b, len(blocks)
        values = ir.Constant(_vec(F32, width), ir.Undefined)
        for i, block in enumerate(blocks):
            bits = self.load(block, I64(offset), I16)
            value = b.fpext(b.bitcast(bits, ir.HalfType()), F32)
            values = b.insert_element(values, value, I32(i))
        mask = _indexes(i for i in range(width) for _ in range(self.precision.lanes))
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
        """start + the lane sums of codes times activations: int8 activations meet unsigned
        codes, four pairs a lane (vpdpbusd); int16 ones meet signed 16-bit codes, two pairs a
        lane (vpdpwssd)."""
        b = self.b
        pairs = 4 if self.precision.bits == 8 else 2  # products summed in a lane
        lanes = codes.type.count // pairs
        if self.vnni:
            name = "vpdpbusd" if pairs == 4 else "vpdpwssd"
            per_call = min(16 if self.vnni == 2 else 8, lanes)  # of a 512- or 256-bit vector
            vector = _vec(I32, per_call)
            fn = cgutils.get_or_insert_function(
                b.module, ir.FunctionType(vector, [vector] * 3),
                f"llvm.x86.avx512.{name}.{32 * per_call}",
            )  # fmt: skip
            sums = [b.call(fn, [s, b.bitcast(c, vector), b.bitcast(a, vector)])
                    for s, c, a in zip(self.pieces(start, per_call),
                                       self.pieces(codes, per_call * pairs),
                                       self.pieces(activations, per_call * pairs), strict=True)]  # fmt: skip
            return self.concat(sums)
        wide = _vec(I32, pairs * lanes)
        extend = b.zext if pairs == 4 else b.sext  # unsigned bytes; signed 16-bit codes
        products = b.mul(extend(codes, wide), b.sext(activations, wide))
        total = start
        for k in range(pairs):  # lane i sums products pairs*i .. pairs*i + pairs - 1
            every = _indexes(pairs * i + k for i in range(lanes))
            total = b.add(total, b.shuffle_vector(products, products, every))
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
            low, high = self.pieces(vector, vector.type.count // 2)
            vector = b.fadd(low, high)
        return b.extract_element(vector, I32(0))


def _row_dot(layout: Layout, precision: Precision, rows: int, vnni: int):
    """An intrinsic (row, x, blocks, k) -> `rows` float32 dot products of one stored weight row
    (byte address) with activation rows m = 0..rows-1 of a QuantizedRows at byte address x."""
    width = max(vnni, 1)  # blocks per iteration
    lanes = precision.lanes
    # int8: the codes stay unsigned and -zero * (sum of the activation codes), in each block's
    # first lane, starts the integer sum; int16: the codes are made signed instead.
    shift = {8: 3, 16: 4, 128: 7}.get(layout.zero, 0) if precision.bits == 8 else 0

    @intrinsic
    def row_dot(typingctx, row, x, blocks, k):
        arguments = (row, x, blocks, k)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in arguments):
            return None
        result = types.UniTuple(types.float32, rows) if rows > 1 else types.float32

        def codegen(context, builder, signature, args):
            row, x, blocks, k = args
            e = _Emitter(builder, layout, precision, vnni)
            stored = precision.stored_lanes
            code_bytes = builder.mul(k, I64(precision.bits // 8))
            lane_bytes = builder.udiv(builder.mul(k, I64(stored)), I64(8))  # one lane array
            record = builder.add(code_bytes, builder.mul(lane_bytes, I64(3)))

            def lane_values(address: ir.Value, count: int, typ: ir.Type, first_only: bool):
                """A lane array's values for `count` blocks over their lanes (first_only: in
                each block's first lane, zeros in the others)."""
                if stored == lanes:
                    return e.load(address, I64(0), _vec(typ, lanes * count))
                values = e.load(address, I64(0), _vec(typ, count))
                if not first_only:
                    mask = [i for i in range(count) for _ in range(lanes)]
                    return builder.shuffle_vector(values, values, _indexes(mask))
                mask = [j // lanes if j % lanes == 0 else count for j in range(lanes * count)]
                zeros = ir.Constant(_vec(typ, count), None)
                return builder.shuffle_vector(values, zeros, _indexes(mask))

            def iteration(first: ir.Value, count: int, accs: list) -> None:
                blocks_here = [builder.add(row, builder.mul(builder.add(first, I64(i)),
                                                            I64(layout.block_bytes)))
                               for i in range(count)]  # fmt: skip
                d = e.per_block(blocks_here, layout.d)
                minimum = e.per_block(blocks_here, layout.m) if layout.m is not None else None
                codes = e.codes(blocks_here)
                if precision.bits == 16:
                    codes = builder.sub(builder.zext(codes, _vec(I16, codes.type.count)),
                                        ir.Constant(_vec(I16, codes.type.count), layout.zero))  # fmt: skip
                ints, floats = _vec(I32, lanes * count), _vec(F32, lanes * count)
                code_type = _vec(ir.IntType(precision.bits), BLOCK * count)
                for m, acc in enumerate(accs):
                    base = builder.add(x, builder.mul(I64(m), record))
                    lanes_at = builder.mul(first, I64(4 * stored))
                    scales = builder.add(builder.add(base, code_bytes), lanes_at)
                    activations = e.load(base, builder.mul(first, I64(BLOCK * precision.bits // 8)),
                                         code_type)  # fmt: skip
                    if shift:
                        sums = lane_values(builder.add(scales, lane_bytes), count, I32, True)
                        start = builder.shl(sums, ir.Constant(ints, shift))
                    else:
                        start = ir.Constant(ints, 0)
                    dot = builder.sitofp(e.dot(start, codes, activations), floats)
                    scaled = builder.fmul(dot, lane_values(scales, count, F32, False))
                    value = e.fmuladd(scaled, d, builder.load(acc))
                    if minimum is not None:  # + min * d_x * (sum of the codes)
                        at = builder.add(scales, builder.mul(lane_bytes, I64(2)))
                        value = e.fmuladd(lane_values(at, count, F32, True), minimum, value)
                    builder.store(value, acc)

            totals = []

            def loop(first_block: ir.Value, count: ir.Value, step: int) -> None:
                zero = ir.Constant(_vec(F32, lanes * step), 0.0)
                accs = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]
                with cgutils.for_range(builder, count) as it:
                    first = builder.add(first_block, builder.mul(it.index, I64(step)))
                    iteration(first, step, accs)
                totals.append([e.horizontal_sum(builder.load(a)) for a in accs])

            loop(I64(0), builder.udiv(blocks, I64(width)), width)
            if width > 1:  # the odd last block
                done = builder.mul(builder.udiv(blocks, I64(width)), I64(width))
                loop(done, builder.sub(blocks, done), 1)
            sums = [totals[0][m] if len(totals) == 1 else builder.fadd(totals[0][m], totals[1][m])
                    for m in range(rows)]  # fmt: skip
            if rows == 1:
                return sums[0]
            return context.make_tuple(builder, signature.return_type, sums)

        return result(*arguments), codegen

    return row_dot


VNNI = vector_blocks()


def _pair(qtype: Q, precision: Precision):
    return _row_dot(LAYOUTS[qtype], precision, 1, VNNI), _row_dot(
        LAYOUTS[qtype], precision, ROWS, VNNI
    )


_Q8_0_1, _Q8_0_4 = _pair(Q.Q8_0, Q8)
_Q4_0_1, _Q4_0_4 = _pair(Q.Q4_0, Q8)
_Q4_1_1, _Q4_1_4 = _pair(Q.Q4_1, Q8)
_Q5_0_1, _Q5_0_4 = _pair(Q.Q5_0, Q8)
_Q5_1_1, _Q5_1_4 = _pair(Q.Q5_1, Q8)
_W8_0_1, _W8_0_4 = _pair(Q.Q8_0, Q16)  # the same weights against 16-bit activations
_W4_0_1, _W4_0_4 = _pair(Q.Q4_0, Q16)
_W4_1_1, _W4_1_4 = _pair(Q.Q4_1, Q16)
_W5_0_1, _W5_0_4 = _pair(Q.Q5_0, Q16)
_W5_1_1, _W5_1_4 = _pair(Q.Q5_1, Q16)


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
def quantize_rows(x, codes, scales, sums, scaled_sums, largest):
    """Each row of x in blocks of 32 codes round(x / d) (halves away from zero, gguf's
    np_roundf) with d = max|x| / largest. With largest 127 these are Q8_0 blocks as
    `gguf.quants.quantize(x, Q8_0)` computes them, the scale stored as a half; with 32767 the
    scale stays float32. Per block b, over its lanes: scales[m, b] = d (every lane), sums[m, b]
    = (-sum of the codes, 0, ...), scaled_sums[m, b] = (d * sum of the codes, 0, ...), as the
    row dot products add them to a block's lanes."""
    rows, width = x.shape
    for m in range(rows):
        for b in range(width // BLOCK):
            top = np.float32(0)
            for j in range(BLOCK):
                top = max(top, abs(x[m, b * BLOCK + j]))
            d = top / np.float32(largest)
            inverse = np.float32(1) / d if d != 0 else np.float32(0)
            total = 0
            for j in range(BLOCK):
                v = x[m, b * BLOCK + j] * inverse
                a = abs(v)
                whole = np.floor(a)
                q = int(whole + np.floor(np.float32(2) * (a - whole)))
                code = q if v >= 0 else -q
                codes[m, b * BLOCK + j] = code
                total += code
            if largest == 127:
                d = _to_half_and_back(d)
            scales[m, b, :] = d
            sums[m, b, :] = 0
            sums[m, b, 0] = -total
            scaled_sums[m, b, :] = 0
            scaled_sums[m, b, 0] = d * np.float32(total)


@inline()
def _chunk(dot1, dot4, data, x, k, out, col0, chunks, chunk):
    """out[:, col0 + n] for the weight rows n of one chunk, four activation rows per call."""
    rows, count, blocks = data.shape[0], x.shape[0], k // BLOCK
    per = -(-rows // chunks)
    base, stride, x0, record = data.ctypes.data, data.strides[0], x.ctypes.data, x.strides[0]
    for n in range(chunk * per, min(rows, (chunk + 1) * per)):
        row = base + n * stride
        m = 0
        while m + 4 <= count:
            out[m, col0 + n], out[m + 1, col0 + n], out[m + 2, col0 + n], out[m + 3, col0 + n] = (
                dot4(row, x0 + m * record, blocks, k)
            )
            m += 4
        while m < count:
            out[m, col0 + n] = dot1(row, x0 + m * record, blocks, k)
            m += 1


# One kernel per weight format and activation precision (numba specializes on the intrinsics).
@kernel(parallel=True)
def matmul_q8_0(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q8_0_1, _Q8_0_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q4_0(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q4_0_1, _Q4_0_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q4_1(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q4_1_1, _Q4_1_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q5_0(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q5_0_1, _Q5_0_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q5_1(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q5_1_1, _Q5_1_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q8_0(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W8_0_1, _W8_0_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q4_0(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W4_0_1, _W4_0_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q4_1(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W4_1_1, _W4_1_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q5_0(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W5_0_1, _W5_0_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q5_1(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W5_1_1, _W5_1_4, data, x, k, out, col0, chunks, chunk)


MATMULS: dict[Precision, dict[Q, object]] = {
    Q8: {Q.Q8_0: matmul_q8_0, Q.Q4_0: matmul_q4_0, Q.Q4_1: matmul_q4_1,
         Q.Q5_0: matmul_q5_0, Q.Q5_1: matmul_q5_1},
    Q16: {Q.Q8_0: matmul16_q8_0, Q.Q4_0: matmul16_q4_0, Q.Q4_1: matmul16_q4_1,
          Q.Q5_0: matmul16_q5_0, Q.Q5_1: matmul16_q5_1},
}  # fmt: skip


class QuantizedRows:
    """Activation rows rounded to blocks of integer codes, as the row dot products read them:
    one record a row (Precision.record_bytes)."""

    def __init__(self, x: np.ndarray, precision: Precision) -> None:
        rows, width = x.shape
        self.precision = precision
        self.width = width
        code_bytes, lane_bytes = width * precision.bits // 8, width * precision.stored_lanes // 8
        self.packed = np.empty((rows, precision.record_bytes(width)), np.uint8)
        lanes = (rows, width // BLOCK, precision.stored_lanes)

        def part(start: int, size: int, dtype, shape) -> np.ndarray:
            return self.packed[:, start : start + size].view(dtype).reshape(shape)

        code_type = np.int8 if precision.bits == 8 else np.int16
        self.codes = part(0, code_bytes, code_type, (rows, width))
        self.scales = part(code_bytes, lane_bytes, np.float32, lanes)
        self.sums = part(code_bytes + lane_bytes, lane_bytes, np.int32, lanes)
        scaled_sums = part(code_bytes + 2 * lane_bytes, lane_bytes, np.float32, lanes)
        quantize_rows(x, self.codes, self.scales, self.sums, scaled_sums, precision.largest)

    def matmul(self, kernels: dict, data: np.ndarray, out: np.ndarray, col0: int, chunks: int):
        """out[:, col0 + n] = these rows . weight row n, by the kernel for their precision of
        `kernels` (one format's: `kernels_for`)."""
        kernels[self.precision](data, self.packed, self.width, out, col0, chunks)


def kernels_for(qtype: Q) -> dict[Precision, object]:
    """A format's matmul per activation precision."""
    return {precision: table[qtype] for precision, table in MATMULS.items()}
