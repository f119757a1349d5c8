// matmul.cu: y = x @ W^T (+ bias) for the few rows of a decode step, W dense or GGUF-quantized.
// Memory-bound by design: a block owns up to 8 rows of W and up to 4 rows of x, so every weight
// byte comes from DRAM once per step (for M > 4 the other row tiles' re-reads come from L2);
// float32 accumulators; no tensor cores, so it runs on the CPU emulator, and inside a CUDA graph
// where CuPy refuses cuBLAS.
//
// Entry points (T = float | __half | __nv_bfloat16 for SUFFIX = f32 | f16 | bf16; the GGUF
// kernels only f32 | f16, the dtypes the CUDA backend computes in;
// FORMAT = q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k):
//   matmul_SUFFIX(out, x, weight, bias, M, N, K, split, vec, out_stride)        W dense, of type T
//   matmul_FORMAT_SUFFIX(out, x, weight, bias, M, N, K, row_bytes, split, out_stride)  W GGUF
//
// Launch geometry (split = 1, 2 or 4 warps per pair of weight rows; the glue picks it from K):
//   grid  = (ceil(M / 4) * ceil(N / (8 / split)),)  block b computes rows m0 = 4 (b % ceil(M /
//           4)) ... m0 + 3 of x against 8 / split rows of W from n = (8 / split) (b / ceil(M /
//           4)): consecutive blocks share a weight tile, so its re-reads hit L2.
//   block = (128,)  four warps; `split` of them share each pair of weight rows, each taking
//           every (32 split)-th unit of K (8 values of a dense W; one 32-value GGUF block or
//           K-quant sub-block): a short wide matrix (N = 1024, K = 3072) still puts enough
//           loads in flight. Each lane keeps 4 x 2 sums, added up through shared memory.
//   shared memory: 4.5 KB, static (the lanes' sums, then quarter sums)
//
// Pointers:
//   x       T, [M, K] contiguous; for the GGUF kernels 16-byte aligned (K is a multiple of 32,
//           so every row is)
//   weight  dense: T, [N, K] contiguous; GGUF: unsigned char, [N, row_bytes] contiguous, each
//           row K / 32 (K / 256 for the K-quants) blocks as stored in the file (gguf_blocks.cuh)
//   bias    T, [N], or null
//   out     T, [M, N] rows out_stride >= N elements apart: the float32 sum over K of x * w, plus
//           bias, rounded to T once. out_stride > N writes columns of a wider output: a fused
//           weight whose parts have different GGUF types runs one launch per part into its slice.
//   M, N, K, split: int; row_bytes, out_stride: long long; vec: int, nonzero when x and W may be
//           read 16 bytes at a time (K % 8 == 0, both 16-byte aligned), else the dense kernel
//           reads element-wise.
#include "common.cuh"
#include "gguf_blocks.cuh"

namespace nanovllm {

constexpr int kMatmulWarps = 4;
constexpr int kMatmulRowsPerWarp = 2;
constexpr int kMatmulTileM = 4;

// Elements k..k+7 of a row of K elements as floats; zeros past K.
template <typename T>
__device__ __forceinline__ void load8(const T* row, int k, int K, bool vec, float out[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = *reinterpret_cast<const float4*>(row + k);
      const float4 b = *reinterpret_cast<const float4*>(row + k + 4);
      out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
      out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + k);
      const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[j] = to_float(values[j]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = k + j < K ? to_float(row[k + j]) : 0.0f;
}

// A dense weight as the matmul sees it: units of 8 values.
template <typename T>
struct DenseFormat {
  using Weight = T;
  static constexpr int kUnitValues = 8;
  struct Unit {
    float v[8];
  };
  __device__ static Unit load(const T* row, int unit, int K, bool vec) {
    Unit u;
    load8(row, unit * kUnitValues, K, vec, u.v);
    return u;
  }
  __device__ static void values8(const Unit& u, float w[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = u.v[j];
  }
  __device__ static void next_group(Unit&) {}
};

// A GGUF block format as the matmul sees it: units of 32 values.
template <class Block>
struct QuantizedFormat {
  using Weight = unsigned char;
  static constexpr int kUnitValues = gguf::kUnitValues;
  using Unit = typename Block::Unit;
  __device__ static Unit load(const unsigned char* row, int unit, int, bool) {
    return Block::load(row, unit);
  }
  __device__ static void values8(const Unit& u, float w[8]) {
    Block::template values8<false>(u, w);
  }
  __device__ static void next_group(Unit& u) { Block::next_group(u); }
};

template <class Format, typename T>
__device__ void matmul(T* out, const T* x, const typename Format::Weight* weight,
                       long long row_stride, const T* bias, int M, int N, int K, int split,
                       bool vec,
                       long long out_stride) {
  constexpr int kRows = kMatmulRowsPerWarp;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int pairs = kMatmulWarps / split;  // row pairs per block
  const int m_tiles = (M + kMatmulTileM - 1) / kMatmulTileM;
  const int m0 = (blockIdx.x % m_tiles) * kMatmulTileM;
  const int n_block = (blockIdx.x / m_tiles) * pairs * kRows;
  const int n0 = n_block + (warp / split) * kRows;
  const int rows = min(kMatmulTileM, M - m0);  // the same for the whole block
  const T* x_tile = x + (long long)m0 * K;

  float acc[kMatmulTileM][kRows];
#pragma unroll
  for (int m = 0; m < kMatmulTileM; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;
  }

  // Warp w takes unit 32 (w % split) + lane, then every (32 split)-th one after it.
  const int units = (K + Format::kUnitValues - 1) / Format::kUnitValues;
  const int first = (warp % split) * kWarpSize + lane;
  for (int unit = first; unit < units; unit += split * kWarpSize) {
    typename Format::Unit w_unit[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      // A row past N reads row N - 1 instead: valid memory, and its sums are never stored.
      const long long n = min(n0 + r, N - 1);
      w_unit[r] = Format::load(weight + n * row_stride, unit, K, vec);
    }
    // Not unrolled: one copy of the body keeps the build of the 19 entry points short.
#pragma unroll 1
    for (int group = 0; group < Format::kUnitValues / 8; ++group) {
      float w[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        Format::values8(w_unit[r], w[r]);
        Format::next_group(w_unit[r]);
      }
      const int k = unit * Format::kUnitValues + 8 * group;
#pragma unroll
      for (int m = 0; m < kMatmulTileM; ++m) {
        if (m < rows) {
          float xv[8];
          load8(x_tile + (long long)m * K, k, K, vec, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][r] += w[r][j] * xv[j];
          }
        }
      }
    }
  }

  // The block's 4 x 8 x 32 partial sums go through shared memory in two rounds: each thread
  // adds 8 of them, then one thread per output adds the 4 split results of its row. No shuffles
  // (as fast on a GPU as a shuffle tree here, and far cheaper on the emulator); a fixed order.
  constexpr int kSums = kMatmulTileM * kRows;  // per lane
  static_assert(kMatmulWarps * kSums * 4 == kMatmulWarps * kWarpSize, "4 threads per sum");
  // Rows padded to 33 floats: the 8 consecutive values each thread reads below then fall in
  // distinct banks across a warp.
  __shared__ float partial[kMatmulWarps * kSums][kWarpSize + 1];
  __shared__ float quarter[kMatmulWarps * kWarpSize];
#pragma unroll
  for (int m = 0; m < kMatmulTileM; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) partial[warp * kSums + m * kRows + r][lane] = acc[m][r];
  }
  __syncthreads();
  const int t = threadIdx.x;  // adds lanes 8 (t % 4) ... + 7 of sum t / 4
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) sum += partial[t / 4][8 * (t % 4) + j];
  quarter[t] = sum;
  __syncthreads();
  for (int i = t; i < pairs * kSums; i += blockDim.x) {
    const int pair = i / kSums;
    const int m = i % kSums / kRows;
    const int r = i % kRows;
    const int n = n_block + pair * kRows + r;
    if (m < rows && n < N) {
      float value = 0.0f;
      for (int w = pair * split; w < (pair + 1) * split; ++w) {
        const float* q = &quarter[4 * (w * kSums + m * kRows + r)];
        value += (q[0] + q[1]) + (q[2] + q[3]);
      }
      if (bias != nullptr) value += to_float(bias[n]);
      out[(long long)(m0 + m) * out_stride + n] = from_float<T>(value);
    }
  }
}

}  // namespace nanovllm

#define NANOVLLM_DENSE_MATMUL_KERNEL(SUFFIX, T)                                                \
  extern "C" __global__ void __launch_bounds__(128, 1)                                         \
      matmul_##SUFFIX(T* out, const T* x, const T* weight, const T* bias, int M, int N, int K, \
                      int split, int vec, long long out_stride) {                              \
    nanovllm::matmul<nanovllm::DenseFormat<T>, T>(out, x, weight, K, bias, M, N, K, split,     \
                                                  vec != 0, out_stride);                       \
  }

#define NANOVLLM_QUANTIZED_MATMUL_KERNEL(FORMAT, BLOCK, SUFFIX, T)                               \
  extern "C" __global__ void __launch_bounds__(128, 1)                                           \
      matmul_##FORMAT##_##SUFFIX(T* out, const T* x, const unsigned char* weight, const T* bias, \
                                 int M, int N, int K, long long row_bytes, int split,            \
                                 long long out_stride) {                                         \
    nanovllm::matmul<nanovllm::QuantizedFormat<nanovllm::gguf::BLOCK>, T>(                       \
        out, x, weight, row_bytes, bias, M, N, K, split, true, out_stride);                      \
  }

#define NANOVLLM_QUANTIZED_MATMUL_FORMATS(SUFFIX, T)      \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q8_0, Q8_0, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q4_0, Q4_0, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q4_1, Q4_1, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q5_0, Q5_0, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q5_1, Q5_1, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q4_k, Q4_K, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q5_k, Q5_K, SUFFIX, T) \
  NANOVLLM_QUANTIZED_MATMUL_KERNEL(q6_k, Q6_K, SUFFIX, T)

NANOVLLM_DENSE_MATMUL_KERNEL(f32, float)
NANOVLLM_DENSE_MATMUL_KERNEL(f16, __half)
NANOVLLM_DENSE_MATMUL_KERNEL(bf16, __nv_bfloat16)
NANOVLLM_QUANTIZED_MATMUL_FORMATS(f32, float)
NANOVLLM_QUANTIZED_MATMUL_FORMATS(f16, __half)
