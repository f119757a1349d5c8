// dequantize.cu: rows of a GGUF-quantized matrix as T: the scratch weight of a large-M matmul
// (prefill, then cuBLAS) and the embedding lookup of a quantized token table.
//
// Entry points (FORMAT = q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k;
// SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   dequantize_FORMAT_SUFFIX(out, weight, row_ids, rows, weight_rows, K, row_bytes)
//
// Launch geometry:
//   grid  = (ceil(rows * K / 8 / 256),)  thread i (over the grid) writes values 8 (i % (K / 8))
//           ... + 8 of output row i / (K / 8): 16 (or 32) contiguous bytes, so a warp's stores
//           are one contiguous stretch
//   block = (256,)
//   shared memory: none
//
// Pointers:
//   weight   unsigned char, [weight_rows, row_bytes] contiguous: the file's blocks, K / 32 (or
//            K / 256 for K-quants) per row (gguf_blocks.cuh)
//   row_ids  long long, [rows]: output row r is weight row row_ids[r]; null: weight row r.
//            An id outside [0, weight_rows) gives a row of zeros rather than a wild read.
//   out      T, [rows, K] contiguous, 16-byte aligned
//   rows, weight_rows, K: int; row_bytes: long long
//
// Values are bit-exact with the `gguf` package's dequantization (rounded once more to T).
#include "common.cuh"
#include "gguf_blocks.cuh"

namespace nanovllm {

template <typename T>
__device__ __forceinline__ void store8(T* p, const float v[8]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 raw;
    T* values = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) values[j] = from_float<T>(v[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

template <class Block, typename T>
__device__ void dequantize(T* out, const unsigned char* weight, const long long* row_ids,
                           int rows, int weight_rows, int K, long long row_bytes) {
  constexpr int kGroupsPerUnit = gguf::kUnitValues / 8;
  const int groups_per_row = K / 8;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)rows * groups_per_row) return;
  const int row = i / groups_per_row;
  const int group = i % groups_per_row;
  const long long source = row_ids != nullptr ? row_ids[row] : row;
  float values[8];
  if (0 <= source && source < weight_rows) {
    auto unit = Block::load(weight + source * row_bytes, group / kGroupsPerUnit);
    for (int g = 0; g < group % kGroupsPerUnit; ++g) Block::next_group(unit);
    Block::template values8<true>(unit, values);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) values[j] = 0.0f;
  }
  store8(out + (long long)row * K + 8 * group, values);
}

}  // namespace nanovllm

#define NANOVLLM_DEQUANTIZE_KERNEL(FORMAT, BLOCK, SUFFIX, T)                                    \
  extern "C" __global__ void dequantize_##FORMAT##_##SUFFIX(                                    \
      T* out, const unsigned char* weight, const long long* row_ids, int rows, int weight_rows, \
      int K, long long row_bytes) {                                                             \
    nanovllm::dequantize<nanovllm::gguf::BLOCK, T>(out, weight, row_ids, rows, weight_rows, K,  \
                                                   row_bytes);                                  \
  }

#define NANOVLLM_DEQUANTIZE_FORMATS(SUFFIX, T)      \
  NANOVLLM_DEQUANTIZE_KERNEL(q8_0, Q8_0, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q4_0, Q4_0, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q4_1, Q4_1, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q5_0, Q5_0, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q5_1, Q5_1, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q4_k, Q4_K, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q5_k, Q5_K, SUFFIX, T) \
  NANOVLLM_DEQUANTIZE_KERNEL(q6_k, Q6_K, SUFFIX, T)

NANOVLLM_DEQUANTIZE_FORMATS(f32, float)
NANOVLLM_DEQUANTIZE_FORMATS(f16, __half)
