// gguf_blocks.cuh: the GGUF block formats, decoded in registers, 32 values at a time.
//
// A quantized matrix is the file's bytes as they are: row n of a [N, K] weight is K / 32 (or
// K / 256 for the K-quants) blocks, `row_bytes` bytes in all. Each format below reads one
// *unit* of 32 consecutive values of a row into registers (`load`) and expands 8 of them at a
// time into floats (`values8`, then `next_group` moves the next 8 to the front). A unit is a
// whole block for the 32-value formats and one 32-value sub-block of a 256-value super-block
// for Q4_K, Q5_K and Q6_K. Layouts follow llama.cpp's ggml-common.h (block_q4_0 ...
// block_q6_K); the arithmetic follows the `gguf` package's dequantize_blocks, the tests' oracle:
//
//   Q8_0  34 B: d (f16), qs[32] int8                           w = q * d
//   Q4_0  18 B: d, qs[16] (value j: low nibble of qs[j % 16] for j < 16, high nibble above)
//                                                              w = d * (q - 8)
//   Q4_1  20 B: d, m, qs[16]                                   w = d * q + m
//   Q5_0  22 B: d, qh (u32: bit j is value j's fifth bit), qs[16]    w = d * (q - 16)
//   Q5_1  24 B: d, m, qh, qs[16]                               w = d * q + m
//   Q4_K 144 B: d, dmin, scales[12] (8 six-bit scales and mins), qs[128]: sub-block s uses
//               the low (s even) or high (s odd) nibbles of qs[32 (s / 2) ... + 32]
//                                                              w = (d sc_s) q - (dmin m_s)
//   Q5_K 176 B: d, dmin, scales[12], qh[32] (bit s of qh[l]: sub-block s, value l), qs[128]
//                                                              w = (d sc_s) q - (dmin m_s)
//   Q6_K 210 B: ql[128], qh[64], scales[16] int8, d: value v = 128 h + 32 j + l (h < 2, j < 4)
//               has low bits in nibble j / 2 of ql[64 h + 32 (j % 2) + l], high bits
//               2j..2j+1 of qh[32 h + l], scale scales[v / 16]     w = (d sc) (q - 32)
//
// values8<true> rounds after every operation, in the reference's order (__fmul_rn & co. are
// never contracted into an FMA), so the dequantize kernels are bit-exact with the `gguf`
// package on a GPU and on the emulator alike. The matmul kernels use values8<false>, which
// NVRTC may contract: within an ulp, and one instruction fewer per weight.
//
// Every block size is even, so every field sits at an even address of a row: loads are 16-bit
// (pairs of them make the 32-bit words). Small integers become floats by the exponent trick
// (1.0 * 2^23 + q, minus 2^23): exact, and two full-rate instructions instead of an I2F,
// which runs at a quarter of the FMA rate on sm_80/sm_90.
#ifndef NANOVLLM_GGUF_BLOCKS_CUH
#define NANOVLLM_GGUF_BLOCKS_CUH

#include "common.cuh"

namespace nanovllm {
namespace gguf {

constexpr int kUnitValues = 32;

__device__ __forceinline__ unsigned load_u16(const unsigned char* p) {
  return *reinterpret_cast<const unsigned short*>(p);
}

// A 32-bit word at an address that is only 2-byte aligned.
__device__ __forceinline__ unsigned load_u32(const unsigned char* p) {
  return load_u16(p) | (load_u16(p + 2) << 16);
}

__device__ __forceinline__ float load_f16(const unsigned char* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(load_u16(p))));
}

// 8 words of 4 bytes each (32 bytes), each shifted right and masked: a nibble or bit plane.
__device__ __forceinline__ void load_words(const unsigned char* p, int shift, unsigned mask,
                                           unsigned words[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) words[i] = (load_u32(p + 4 * i) >> shift) & mask;
}

// 4 words (16 bytes) of nibbles: low nibbles of all 16 bytes, then high nibbles.
__device__ __forceinline__ void load_nibbles16(const unsigned char* p, unsigned words[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned w = load_u32(p + 4 * i);
    words[i] = w & 0x0F0F0F0Fu;
    words[i + 4] = (w >> 4) & 0x0F0F0F0Fu;
  }
}

// Byte j (0..7) of the first two words: a unit's current group of 8 values.
__device__ __forceinline__ unsigned byte_of(const unsigned words[8], int j) {
  return (words[j / 4] >> (8 * (j % 4))) & 0xFFu;
}

// Moves the next group's two words to the front (constant indices: registers, no local memory).
__device__ __forceinline__ void shift_words(unsigned words[8]) {
#pragma unroll
  for (int i = 0; i < 6; ++i) words[i] = words[i + 2];
}

// q in [0, 2^23) as a float, exactly.
__device__ __forceinline__ float small_to_float(unsigned q) {
  return __int_as_float(0x4B000000 | q) - 8388608.0f;
}

template <bool kExact>
__device__ __forceinline__ float mul(float a, float b) {
  if constexpr (kExact) return __fmul_rn(a, b);
  return a * b;
}

template <bool kExact>
__device__ __forceinline__ float mul_add(float a, float b, float c) {  // (a * b) + c
  if constexpr (kExact) return __fadd_rn(__fmul_rn(a, b), c);
  return a * b + c;
}

// ---- 32-value blocks ---------------------------------------------------------------------
// Each Unit holds one unit's 32 values in registers; values8 expands the current group of 8
// (values 0..7 after load, 8..15 after one next_group, ...), so callers loop over groups
// without indexing register arrays at run time.
struct Q8_0 {
  static constexpr int kBlockValues = 32, kBlockBytes = 34;
  struct Unit {
    float d;
    unsigned qs[8];  // the 32 int8 values, each biased by 128
  };
  __device__ static Unit load(const unsigned char* row, int unit) {
    const unsigned char* b = row + (long long)unit * kBlockBytes;
    Unit u;
    u.d = load_f16(b);
    load_words(b + 2, 0, 0xFFFFFFFFu, u.qs);
#pragma unroll
    for (int i = 0; i < 8; ++i) u.qs[i] ^= 0x80808080u;
    return u;
  }
  template <bool kExact>
  __device__ static void values8(const Unit& u, float w[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = mul<kExact>(small_to_float(byte_of(u.qs, j)) - 128.0f, u.d);
  }
  __device__ static void next_group(Unit& u) { shift_words(u.qs); }
};

// Q4_0 and Q4_1: value j is nibble j of the 32 nibbles as load_nibbles16 lays them out.
template <bool kHasMin>
struct Q4Block {
  static constexpr int kBlockValues = 32, kBlockBytes = kHasMin ? 20 : 18;
  struct Unit {
    float d, m;
    unsigned qs[8];
  };
  __device__ static Unit load(const unsigned char* row, int unit) {
    const unsigned char* b = row + (long long)unit * kBlockBytes;
    Unit u;
    u.d = load_f16(b);
    u.m = kHasMin ? load_f16(b + 2) : 0.0f;
    load_nibbles16(b + (kHasMin ? 4 : 2), u.qs);
    return u;
  }
  template <bool kExact>
  __device__ static void values8(const Unit& u, float w[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float q = small_to_float(byte_of(u.qs, j));
      w[j] = kHasMin ? mul_add<kExact>(u.d, q, u.m) : mul<kExact>(u.d, q - 8.0f);
    }
  }
  __device__ static void next_group(Unit& u) { shift_words(u.qs); }
};
using Q4_0 = Q4Block<false>;
using Q4_1 = Q4Block<true>;

// Q5_0 and Q5_1: Q4_0 / Q4_1 plus a fifth bit per value from the 32-bit qh.
template <bool kHasMin>
struct Q5Block {
  static constexpr int kBlockValues = 32, kBlockBytes = kHasMin ? 24 : 22;
  struct Unit {
    float d, m;
    unsigned qh;  // bit j: the fifth bit of the current group's value j
    unsigned qs[8];
  };
  __device__ static Unit load(const unsigned char* row, int unit) {
    const unsigned char* b = row + (long long)unit * kBlockBytes;
    const int qh_at = kHasMin ? 4 : 2;
    Unit u;
    u.d = load_f16(b);
    u.m = kHasMin ? load_f16(b + 2) : 0.0f;
    u.qh = load_u32(b + qh_at);
    load_nibbles16(b + qh_at + 4, u.qs);
    return u;
  }
  template <bool kExact>
  __device__ static void values8(const Unit& u, float w[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float q = small_to_float(byte_of(u.qs, j) | (((u.qh >> j) & 1u) << 4));
      w[j] = kHasMin ? mul_add<kExact>(u.d, q, u.m) : mul<kExact>(u.d, q - 16.0f);
    }
  }
  __device__ static void next_group(Unit& u) {
    shift_words(u.qs);
    u.qh >>= 8;
  }
};
using Q5_0 = Q5Block<false>;
using Q5_1 = Q5Block<true>;

// ---- 256-value super-blocks: a unit is one 32-value sub-block ----------------------------
// Scale and min of sub-block s from the 12 packed bytes (llama.cpp's get_scale_min_k4).
__device__ __forceinline__ void k_scale_min(const unsigned char* scales, int s, unsigned* sc,
                                            unsigned* m) {
  if (s < 4) {
    *sc = scales[s] & 63u;
    *m = scales[s + 4] & 63u;
  } else {
    *sc = (scales[s + 4] & 0x0Fu) | ((scales[s - 4] >> 6) << 4);
    *m = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4);
  }
}

// Q4_K and Q5_K: w = (d * sc) * q - (dmin * m), q the nibble (plus a fifth bit for Q5_K).
template <bool kFifthBit>
struct QKBlock {
  static constexpr int kBlockValues = 256, kBlockBytes = kFifthBit ? 176 : 144;
  struct Unit {
    float scale, min;  // d * sc and dmin * m of the sub-block, each rounded once
    unsigned qs[8];    // the sub-block's 32 nibbles, one per byte
    unsigned qh[8];    // its fifth bits, one per byte (Q5_K only)
  };
  __device__ static Unit load(const unsigned char* row, int unit) {
    const unsigned char* b = row + (long long)(unit / 8) * kBlockBytes;
    const int s = unit % 8;
    unsigned sc, m;
    k_scale_min(b + 4, s, &sc, &m);
    Unit u;
    u.scale = __fmul_rn(load_f16(b), small_to_float(sc));
    u.min = __fmul_rn(load_f16(b + 2), small_to_float(m));
    load_words(b + (kFifthBit ? 48 : 16) + 32 * (s / 2), 4 * (s % 2), 0x0F0F0F0Fu, u.qs);
    if constexpr (kFifthBit) load_words(b + 16, s, 0x01010101u, u.qh);
    return u;
  }
  template <bool kExact>
  __device__ static void values8(const Unit& u, float w[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      unsigned q = byte_of(u.qs, j);
      if constexpr (kFifthBit) q |= byte_of(u.qh, j) << 4;
      w[j] = mul_add<kExact>(u.scale, small_to_float(q), -u.min);
    }
  }
  __device__ static void next_group(Unit& u) {
    shift_words(u.qs);
    if constexpr (kFifthBit) shift_words(u.qh);
  }
};
using Q4_K = QKBlock<false>;
using Q5_K = QKBlock<true>;

struct Q6_K {
  static constexpr int kBlockValues = 256, kBlockBytes = 210;
  struct Unit {
    float scale[4];  // d * (int8 scale) of each group: groups 0-1 share one, groups 2-3 one
    unsigned ql[8];  // low 4 bits of the unit's 32 values, one per byte
    unsigned qh[8];  // high 2 bits, one per byte
  };
  __device__ static Unit load(const unsigned char* row, int unit) {
    const unsigned char* b = row + (long long)(unit / 8) * kBlockBytes;
    const int h = (unit % 8) / 4;
    const int j = unit % 4;
    const float d = load_f16(b + 208);
    const unsigned scales = load_u16(b + 192 + 8 * h + 2 * j);
    Unit u;
    // (d * scale) rounded once, then times q: the reference's order.
    u.scale[0] = u.scale[1] = __fmul_rn(d, small_to_float((scales & 0xFFu) ^ 0x80u) - 128.0f);
    u.scale[2] = u.scale[3] = __fmul_rn(d, small_to_float((scales >> 8) ^ 0x80u) - 128.0f);
    load_words(b + 64 * h + 32 * (j % 2), 4 * (j / 2), 0x0F0F0F0Fu, u.ql);
    load_words(b + 128 + 32 * h, 2 * j, 0x03030303u, u.qh);
    return u;
  }
  template <bool kExact>
  __device__ static void values8(const Unit& u, float w[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float q = small_to_float(byte_of(u.ql, j) | (byte_of(u.qh, j) << 4)) - 32.0f;
      w[j] = mul<kExact>(u.scale[0], q);
    }
  }
  __device__ static void next_group(Unit& u) {
    shift_words(u.ql);
    shift_words(u.qh);
#pragma unroll
    for (int i = 0; i < 3; ++i) u.scale[i] = u.scale[i + 1];
  }
};

}  // namespace gguf
}  // namespace nanovllm

#endif  // NANOVLLM_GGUF_BLOCKS_CUH
