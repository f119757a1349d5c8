"""Integer dot products for decode matmuls on GGUF block weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q5_K, Q6_K), the way llama.cpp computes them: each activation row is rounded to blocks of
32 integer codes and a scale (`Precision`: llama.cpp's Q8_0 blocks, bit for bit as the `gguf`
package quantizes, or 16-bit codes with a float32 scale), and a weight block (or a K-quant's
32-value sub-block) meets an activation block as one integer dot product, scaled once:

    w . x = sum over blocks b of  s_w * d_x * sum_j u[j] * q[j]  +  m_w * d_x * sum_j q[j]

where u is the block's code, s_w its scale (Q6_K: one per 16 values) and m_w its min (Q4_1,
Q5_1, Q4_K, Q5_K). Codes are unsigned (0..15, 0..31, 0..63, or 0..255 for Q8_0 read as q + 128):
with 8-bit activations (`vpdpbusd` multiplies unsigned by signed bytes) the zero point of the
others (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q8_0: 128) comes off as -zero * sum_j q[j], precomputed
per 16 activation codes; with 16-bit activations (`vpdpwssd`, signed words) the codes are made
signed first.

The row dot product is written in LLVM IR (a numba intrinsic per format, precision and row
count): a loop over blocks (two at a time in 512-bit vectors where the CPU has AVX512-VNNI, one
with AVX-VNNI, widening multiplies that every target has otherwise) that unpacks a block's
codes once, multiplies them with up to four activation rows, and accumulates float lanes per
row; one horizontal sum per row at the end. numba cannot express a vector register or those
instructions, and its integer arithmetic widens to 64 bits: the same loop written in Python
compiled to `vpmuldq` on 64-bit lanes, a quarter of the float kernels' speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import llvmlite.binding as llvm
import numba
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
    """A simple block of 32 values: where its parts are (byte offsets, ggml-common.h) and how
    its code becomes a value."""

    block_bytes: int
    bits: int  # 4, 5 (4 + one bit from qh) or 8
    qs: int
    d: int = 0
    m: int | None = None  # value = d * code + m; None: value = d * (code - zero)
    qh: int | None = None
    zero: int = 0


@dataclass(frozen=True, slots=True)
class KLayout:
    """A K-quant super-block of 256 values: eight 32-value sub-blocks (see `_Emitter.k_block`)."""

    block_bytes: int
    name: str  # "q4_k", "q5_k" or "q6_k"
    zero: int = 0


LAYOUTS: dict[Q, Layout | KLayout] = {
    Q.Q8_0: Layout(34, 8, qs=2, zero=128),
    Q.Q4_0: Layout(18, 4, qs=2, zero=8),
    Q.Q4_1: Layout(20, 4, qs=4, m=2),
    Q.Q5_0: Layout(22, 5, qs=6, qh=2, zero=16),
    Q.Q5_1: Layout(24, 5, qs=8, m=2, qh=4),
    Q.Q4_K: KLayout(144, "q4_k"),
    Q.Q5_K: KLayout(176, "q5_k"),
    Q.Q6_K: KLayout(210, "q6_k", zero=32),
}


def vector_blocks() -> int:
    """Blocks per vector for the CPU numba compiles for: 2 (512 bits, AVX512-VNNI), 1 (256
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
    # Per block, the row record holds its scale, code sums and scaled sum spread over its lanes
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


@dataclass(frozen=True, slots=True)
class _Block:
    """One 32-value weight block as the dot product needs it: its unsigned codes, the scale of
    its first and last 16 values, and its min (None: a zero point instead)."""

    codes: ir.Value  # <32 x i8>
    scale_low: ir.Value
    scale_high: ir.Value
    minimum: ir.Value | None


class _Emitter:
    """IR for the row dot products: loads at byte addresses, weight blocks, dot products."""

    def __init__(self, builder: ir.IRBuilder, precision: Precision, vnni: int) -> None:
        self.b = builder
        self.precision = precision
        self.vnni = vnni

    def load(self, address: ir.Value, offset: int | ir.Value, typ: ir.Type) -> ir.Value:
        offset = I64(offset) if isinstance(offset, int) else offset
        pointer = self.b.inttoptr(self.b.add(address, offset), ir.PointerType())
        return self.b.load(pointer, typ=typ, align=1)

    def half(self, address: ir.Value, offset: int) -> ir.Value:
        return self.b.fpext(self.b.bitcast(self.load(address, offset, I16), ir.HalfType()), F32)

    def byte(self, address: ir.Value, offset: int) -> ir.Value:
        return self.load(address, offset, I8)

    def splat8(self, value: int) -> ir.Constant:
        return ir.Constant(_vec(I8, 32), value)

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

    # ---- weight blocks ----------------------------------------------------------------------
    def simple_block(self, block: ir.Value, layout: Layout) -> _Block:
        b = self.b
        d = self.half(block, layout.d)
        minimum = self.half(block, layout.m) if layout.m is not None else None
        if layout.bits == 8:  # int8 q -> q + 128 as uint8
            codes = b.xor(self.load(block, layout.qs, _vec(I8, 32)), self.splat8(0x80))
            return _Block(codes, d, d, minimum)
        packed = self.load(block, layout.qs, _vec(I8, 16))  # values j and j + 16 share byte j
        low = b.and_(packed, ir.Constant(packed.type, 15))
        high = b.lshr(packed, ir.Constant(packed.type, 4))
        codes = b.shuffle_vector(low, high, _indexes(range(32)))
        if layout.bits == 5:  # bit j of qh is the fifth bit of value j
            fifth = b.bitcast(self.load(block, layout.qh, I32), _vec(ir.IntType(1), 32))
            codes = b.or_(codes, b.shl(b.zext(fifth, codes.type), self.splat8(4)))
        return _Block(codes, d, d, minimum)

    def k_block(self, block: ir.Value, layout: KLayout, j: int) -> _Block:
        """Sub-block j (0..7) of a K-quant super-block (ggml-common.h, dequantize_row_*):
        Q4_K / Q5_K: half d, dmin; 12 bytes of 6-bit scales and mins; (Q5_K: qh[32], bit j of
        qh[l] the fifth bit of value l); qs[128], sub-blocks 2c and 2c + 1 the low and high
        nibbles of qs[32c:32c + 32]. Q6_K: ql[128]; qh[64]; int8 scales[16], one per 16
        values; half d: value l of sub-block j = 4n + g (n = 0, 1) takes ql[64n + 32(g % 2) + l]'s
        low (g < 2) or high nibble, and bits 2g, 2g + 1 of qh[32n + l] above them."""
        b = self.b
        if layout.name == "q6_k":
            n, g = divmod(j, 4)
            ql = self.load(block, 64 * n + 32 * (g % 2), _vec(I8, 32))
            low = b.and_(ql, self.splat8(15)) if g < 2 else b.lshr(ql, self.splat8(4))
            qh = self.load(block, 128 + 32 * n, _vec(I8, 32))
            top = b.and_(b.lshr(qh, self.splat8(2 * g)), self.splat8(3))
            codes = b.or_(low, b.shl(top, self.splat8(4)))
            d = self.half(block, 208)
            scales = [b.fmul(d, b.sitofp(self.byte(block, 192 + 8 * n + 2 * g + i), F32))
                      for i in range(2)]  # fmt: skip
            return _Block(codes, scales[0], scales[1], None)
        d, dmin, scales = self.half(block, 0), self.half(block, 2), 4
        six = ir.Constant(I8, 63)
        if j < 4:
            scale = b.and_(self.byte(block, scales + j), six)
            low_min = b.and_(self.byte(block, scales + j + 4), six)
        else:  # low 4 bits in bytes 8-11, top 2 bits in the top of bytes 0-7
            packed = self.byte(block, scales + j + 4)
            scale = b.or_(b.and_(packed, ir.Constant(I8, 15)),
                          b.shl(b.lshr(self.byte(block, scales + j - 4), I8(6)), I8(4)))  # fmt: skip
            low_min = b.or_(b.lshr(packed, I8(4)),
                            b.shl(b.lshr(self.byte(block, scales + j), I8(6)), I8(4)))  # fmt: skip
        scale = b.fmul(d, b.uitofp(scale, F32))
        minimum = b.fneg(b.fmul(dmin, b.uitofp(low_min, F32)))
        qs = 16 + (32 if layout.name == "q5_k" else 0) + 32 * (j // 2)
        nibbles = self.load(block, qs, _vec(I8, 32))
        codes = b.and_(nibbles, self.splat8(15)) if j % 2 == 0 else b.lshr(nibbles, self.splat8(4))
        if layout.name == "q5_k":
            qh = self.load(block, 16, _vec(I8, 32))
            fifth = b.and_(b.lshr(qh, self.splat8(j)), self.splat8(1))
            codes = b.or_(codes, b.shl(fifth, self.splat8(4)))
        return _Block(codes, scale, scale, minimum)

    def spread(self, blocks: list[_Block], low_high: bool) -> ir.Value:
        """Per-lane float vector of the blocks' scales (low_high) or mins: each value over its
        block's lanes (a scale over the lanes of its 16 values)."""
        b, lanes = self.b, self.precision.lanes
        values = []
        for block in blocks:
            values += [block.scale_low, block.scale_high] if low_high else [block.minimum] * 2
        vector = ir.Constant(_vec(F32, len(values)), ir.Undefined)
        for i, value in enumerate(values):
            vector = b.insert_element(vector, value, I32(i))
        mask = [i for i in range(len(values)) for _ in range(lanes // 2)]
        return b.shuffle_vector(vector, vector, _indexes(mask))

    # ---- dot products -----------------------------------------------------------------------
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


class _RowRecords:
    """Where activation row m's parts are (QuantizedRows: one record a row)."""

    def __init__(self, e: _Emitter, x: ir.Value, k: ir.Value) -> None:
        b, p = e.b, e.precision
        self.e, self.x = e, x
        self.code_bytes = b.mul(k, I64(p.bits // 8))
        self.lane_bytes = b.udiv(b.mul(k, I64(p.stored_lanes)), I64(8))  # one lane array
        self.record = b.add(self.code_bytes, b.mul(self.lane_bytes, I64(3)))

    def codes(self, m: int, first: ir.Value, count: int) -> ir.Value:
        b, bits = self.e.b, self.e.precision.bits
        at = b.add(b.mul(I64(m), self.record), b.mul(first, I64(BLOCK * bits // 8)))
        return self.e.load(self.x, at, _vec(ir.IntType(bits), BLOCK * count))

    def lanes(self, m: int, array: int, first: ir.Value, count: int, typ, first_only: bool):
        """Lane array `array` (0: scales, 1: code sums, 2: scaled sums) of `count` blocks over
        their lanes; first_only: its values stored once a block go to the block's first lane
        (the code sums: the first lane of each half-block), zeros to the others."""
        e, b = self.e, self.e.b
        lanes, stored = e.precision.lanes, e.precision.stored_lanes
        at = b.add(b.add(b.mul(I64(m), self.record), self.code_bytes),
                   b.add(b.mul(self.lane_bytes, I64(array)), b.mul(first, I64(4 * stored))))  # fmt: skip
        if stored == lanes:
            return e.load(self.x, at, _vec(typ, lanes * count))
        values = e.load(self.x, at, _vec(typ, count))
        if not first_only:
            mask = [i for i in range(count) for _ in range(lanes)]
            return b.shuffle_vector(values, values, _indexes(mask))
        mask = [j // lanes if j % lanes == 0 else count for j in range(lanes * count)]
        return b.shuffle_vector(values, ir.Constant(_vec(typ, count), None), _indexes(mask))


def _row_dot(layout: Layout | KLayout, precision: Precision, rows: int, vnni: int):
    """An intrinsic (row, x, blocks, k) -> `rows` float32 dot products of one stored weight row
    (byte address) with activation rows m = 0..rows-1 of a QuantizedRows at byte address x;
    blocks: 32-value blocks of the row."""
    width = max(vnni, 1)  # blocks per vector
    lanes = precision.lanes
    # int8: the codes stay unsigned, and -zero * (sum of the activation codes) starts each
    # half-block's integer sum; int16: the codes are made signed instead.
    shift = {8: 3, 16: 4, 32: 5, 128: 7}.get(layout.zero, 0) if precision.bits == 8 else 0
    if isinstance(layout, KLayout):
        has_min = layout.name != "q6_k"
    else:
        has_min = layout.m is not None

    @intrinsic
    def row_dot(typingctx, row, x, blocks, k):
        arguments = (row, x, blocks, k)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in arguments):
            return None
        result = types.UniTuple(types.float32, rows) if rows > 1 else types.float32

        def codegen(context, builder, signature, args):
            row, x, blocks, k = args
            e = _Emitter(builder, precision, vnni)
            records = _RowRecords(e, x, k)

            def accumulate(first: ir.Value, weights: list[_Block], accs: list) -> None:
                """Blocks first .. first + len(weights) - 1 of every row into its accumulator."""
                count = len(weights)
                codes = e.concat([w.codes for w in weights])
                if precision.bits == 16:
                    wide = _vec(I16, codes.type.count)
                    codes = builder.sub(builder.zext(codes, wide), ir.Constant(wide, layout.zero))
                scale = e.spread(weights, True)
                minimum = e.spread(weights, False) if has_min else None
                ints, floats = _vec(I32, lanes * count), _vec(F32, lanes * count)
                for m, acc in enumerate(accs):
                    if shift:
                        sums = records.lanes(m, 1, first, count, I32, True)
                        start = builder.shl(sums, ir.Constant(ints, shift))
                    else:
                        start = ir.Constant(ints, 0)
                    dot = e.dot(start, codes, records.codes(m, first, count))
                    dx = records.lanes(m, 0, first, count, F32, False)
                    value = e.fmuladd(builder.fmul(builder.sitofp(dot, floats), dx), scale,
                                      builder.load(acc))  # fmt: skip
                    if minimum is not None:  # + min * d_x * (sum of the codes)
                        scaled_sums = records.lanes(m, 2, first, count, F32, True)
                        value = e.fmuladd(scaled_sums, minimum, value)
                    builder.store(value, acc)

            def accumulators(step: int) -> list:
                zero = ir.Constant(_vec(F32, lanes * step), 0.0)
                return [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]

            def block_at(index: ir.Value) -> ir.Value:
                return builder.add(row, builder.mul(index, I64(layout.block_bytes)))

            totals = []
            accs = accumulators(width)
            if isinstance(layout, KLayout):  # eight sub-blocks a super-block, `width` at a time
                with cgutils.for_range(builder, builder.udiv(blocks, I64(8))) as it:
                    block = block_at(it.index)
                    for j in range(0, 8, width):
                        weights = [e.k_block(block, layout, j + i) for i in range(width)]
                        first = builder.add(builder.mul(it.index, I64(8)), I64(j))
                        accumulate(first, weights, accs)
                totals.append([e.horizontal_sum(builder.load(a)) for a in accs])
            else:
                with cgutils.for_range(builder, builder.udiv(blocks, I64(width))) as it:
                    first = builder.mul(it.index, I64(width))
                    weights = [e.simple_block(block_at(builder.add(first, I64(i))), layout)
                               for i in range(width)]  # fmt: skip
                    accumulate(first, weights, accs)
                totals.append([e.horizontal_sum(builder.load(a)) for a in accs])
                if width > 1:  # the odd last block
                    tail = accumulators(1)
                    done = builder.mul(builder.udiv(blocks, I64(width)), I64(width))
                    with cgutils.for_range(builder, builder.sub(blocks, done)) as it:
                        first = builder.add(done, it.index)
                        accumulate(first, [e.simple_block(block_at(first), layout)], tail)
                    totals.append([e.horizontal_sum(builder.load(a)) for a in tail])
            sums = [totals[0][m] if len(totals) == 1 else builder.fadd(totals[0][m], totals[1][m])
                    for m in range(rows)]  # fmt: skip
            if rows == 1:
                return sums[0]
            return context.make_tuple(builder, signature.return_type, sums)

        return result(*arguments), codegen

    return row_dot


VNNI = vector_blocks()


def _pair(qtype: Q, precision: Precision):
    layout = LAYOUTS[qtype]
    return _row_dot(layout, precision, 1, VNNI), _row_dot(layout, precision, ROWS, VNNI)


_Q8_0_1, _Q8_0_4 = _pair(Q.Q8_0, Q8)
_Q4_0_1, _Q4_0_4 = _pair(Q.Q4_0, Q8)
_Q4_1_1, _Q4_1_4 = _pair(Q.Q4_1, Q8)
_Q5_0_1, _Q5_0_4 = _pair(Q.Q5_0, Q8)
_Q5_1_1, _Q5_1_4 = _pair(Q.Q5_1, Q8)
_Q4_K_1, _Q4_K_4 = _pair(Q.Q4_K, Q8)
_Q5_K_1, _Q5_K_4 = _pair(Q.Q5_K, Q8)
_Q6_K_1, _Q6_K_4 = _pair(Q.Q6_K, Q8)
_W8_0_1, _W8_0_4 = _pair(Q.Q8_0, Q16)  # the same weights against 16-bit activations
_W4_0_1, _W4_0_4 = _pair(Q.Q4_0, Q16)
_W4_1_1, _W4_1_4 = _pair(Q.Q4_1, Q16)
_W5_0_1, _W5_0_4 = _pair(Q.Q5_0, Q16)
_W5_1_1, _W5_1_4 = _pair(Q.Q5_1, Q16)
_W4_K_1, _W4_K_4 = _pair(Q.Q4_K, Q16)
_W5_K_1, _W5_K_4 = _pair(Q.Q5_K, Q16)
_W6_K_1, _W6_K_4 = _pair(Q.Q6_K, Q16)


# ---- activations ------------------------------------------------------------------------------
@intrinsic
def _to_half_and_back(typingctx, value):
    """float32 -> the nearest IEEE half (round to nearest even) -> float32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), F32)

    return types.float32(types.float32), codegen


@numba.njit(cache=True)  # strict IEEE: a NaN or inf in x must be seen, not assumed away
def quantize_rows(x, packed, largest, stored):
    """Each row of x in blocks of 32 codes round(x / d) (halves away from zero, gguf's
    np_roundf) with d = max|x| / largest, into its record of packed (QuantizedRows). With
    largest 127 these are Q8_0 blocks as `gguf.quants.quantize(x, Q8_0)` computes them (int8
    codes, the scale stored as a half); with 32767 int16 codes and a float32 scale. Per block,
    `stored` lanes each: the scale d (every lane); minus the sums of its first and last 16
    codes in the first lane of each half (zeros elsewhere; with one lane, unused); d times the
    sum of its codes in the first lane (zeros elsewhere). A block holding a NaN or an infinity
    gets a NaN scale, so that the row's dot products are NaN, as float32 arithmetic's would be
    (the engine's non-finite check then names the layer)."""
    rows, width = x.shape
    blocks, half = width // BLOCK, stored // 2
    code_bytes = width if largest == 127 else 2 * width
    lane_bytes = 4 * blocks * stored
    for m in range(rows):
        record = packed[m]
        codes8, codes16 = record[:code_bytes].view(np.int8), record[:code_bytes].view(np.int16)
        scales = record[code_bytes : code_bytes + lane_bytes].view(np.float32)
        sums = record[code_bytes + lane_bytes : code_bytes + 2 * lane_bytes].view(np.int32)
        scaled_sums = record[code_bytes + 2 * lane_bytes : code_bytes + 3 * lane_bytes].view(
            np.float32
        )
        for b in range(blocks):
            top, finite = np.float32(0), True
            for j in range(BLOCK):
                value = x[m, b * BLOCK + j]
                finite = finite and np.isfinite(value)
                top = max(top, abs(value))
            d = top / np.float32(largest) if finite else np.float32(np.nan)
            inverse = np.float32(1) / d if finite and d != 0 else np.float32(0)
            first = total = 0
            for j in range(BLOCK):
                v = x[m, b * BLOCK + j] * inverse
                a = abs(v)
                whole = np.floor(a)
                q = int(whole + np.floor(np.float32(2) * (a - whole)))
                code = q if v >= 0 else -q
                if largest == 127:
                    codes8[b * BLOCK + j] = code
                else:
                    codes16[b * BLOCK + j] = code
                total += code
                if j < BLOCK // 2:
                    first += code
            if largest == 127:
                d = _to_half_and_back(d)
            lanes = b * stored
            for lane in range(stored):
                scales[lanes + lane] = d
                sums[lanes + lane] = 0
                scaled_sums[lanes + lane] = 0
            if half:
                sums[lanes], sums[lanes + half] = -first, first - total
            scaled_sums[lanes] = d * np.float32(total)


@intrinsic
def _prefetch(typingctx, address):
    """A hint to bring the cache line at a byte address into the caches (no fault if invalid)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(), I32, I32, I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        pointer = builder.inttoptr(args[0], ir.PointerType())
        builder.call(fn, [pointer, I32(0), I32(3), I32(1)])  # read, keep, data cache
        return context.get_dummy_value()

    return types.none(address), codegen


PREFETCH_BYTES = 2048  # how far ahead of the row being read its chunk's rows are prefetched


@inline()
def _chunk(dot1, dot4, data, x, k, out, col0, chunks, chunk):
    """out[:, col0 + n] for the weight rows n of one chunk, four activation rows per call."""
    rows, count, blocks = data.shape[0], x.shape[0], k // BLOCK
    per = -(-rows // chunks)
    base, stride, x0, record = data.ctypes.data, data.strides[0], x.ctypes.data, x.strides[0]
    stop = min(rows, (chunk + 1) * per)
    ahead = max(1, PREFETCH_BYTES // stride)
    for n in range(chunk * per, stop):
        row = base + n * stride
        if n + ahead < stop:
            for line in range(0, stride, 64):
                _prefetch(row + ahead * stride + line)
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
def matmul_q4_k(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q4_K_1, _Q4_K_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q5_k(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q5_K_1, _Q5_K_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul_q6_k(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_Q6_K_1, _Q6_K_4, data, x, k, out, col0, chunks, chunk)


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


@kernel(parallel=True)
def matmul16_q4_k(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W4_K_1, _W4_K_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q5_k(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W5_K_1, _W5_K_4, data, x, k, out, col0, chunks, chunk)


@kernel(parallel=True)
def matmul16_q6_k(data, x, k, out, col0, chunks):
    for chunk in prange(chunks):
        _chunk(_W6_K_1, _W6_K_4, data, x, k, out, col0, chunks, chunk)


MATMULS: dict[Precision, dict[Q, object]] = {
    Q8: {Q.Q8_0: matmul_q8_0, Q.Q4_0: matmul_q4_0, Q.Q4_1: matmul_q4_1, Q.Q5_0: matmul_q5_0,
         Q.Q5_1: matmul_q5_1, Q.Q4_K: matmul_q4_k, Q.Q5_K: matmul_q5_k, Q.Q6_K: matmul_q6_k},
    Q16: {Q.Q8_0: matmul16_q8_0, Q.Q4_0: matmul16_q4_0, Q.Q4_1: matmul16_q4_1,
          Q.Q5_0: matmul16_q5_0, Q.Q5_1: matmul16_q5_1, Q.Q4_K: matmul16_q4_k,
          Q.Q5_K: matmul16_q5_k, Q.Q6_K: matmul16_q6_k},
}  # fmt: skip


def kernels_for(qtype: Q) -> dict[Precision, object]:
    """A format's matmul per activation precision."""
    return {precision: table[qtype] for precision, table in MATMULS.items()}


class QuantizedRows:
    """Activation rows rounded to blocks of integer codes, as the row dot products read them:
    one record a row (Precision.record_bytes): codes, then per block its scales, code sums and
    scaled sums (`stored_lanes` 4-byte values each)."""

    def __init__(self, x: np.ndarray, precision: Precision) -> None:
        self.precision = precision
        self.width = x.shape[1]
        self.packed = np.empty((x.shape[0], precision.record_bytes(self.width)), np.uint8)
        quantize_rows(x, self.packed, precision.largest, precision.stored_lanes)

    def _part(self, index: int, dtype) -> np.ndarray:
        p, rows, width = self.precision, self.packed.shape[0], self.width
        code_bytes, lane_bytes = width * p.bits // 8, width * p.stored_lanes // 8
        if index < 0:
            return self.packed[:, :code_bytes].view(dtype)
        start = code_bytes + index * lane_bytes
        lanes = self.packed[:, start : start + lane_bytes].view(dtype)
        return lanes.reshape(rows, width // BLOCK, p.stored_lanes)

    @property
    def codes(self) -> np.ndarray:  # [rows, width] int8 / int16
        return self._part(-1, np.int8 if self.precision.bits == 8 else np.int16)

    @property
    def scales(self) -> np.ndarray:  # [rows, blocks, stored lanes] float32
        return self._part(0, np.float32)

    @property
    def sums(self) -> np.ndarray:  # [rows, blocks, stored lanes] int32
        return self._part(1, np.int32)

    def matmul(self, kernels: dict, data: np.ndarray, out: np.ndarray, col0: int, chunks: int):
        """out[:, col0 + n] = these rows . weight row n, by the kernel for their precision of
        `kernels` (one format's: `kernels_for`)."""
        kernels[self.precision](data, self.packed, self.width, out, col0, chunks)
