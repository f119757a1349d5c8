// norm.cu: RMSNorm, alone and fused with the residual add; also the per-head q/k norm of Qwen3.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   rms_norm_SUFFIX(out, x, x_token_stride, heads, weight, eps, hidden)
//   add_rms_norm_SUFFIX(out, residual_out, x, x_token_stride, heads, residual, weight, eps, hidden)
//
// Launch geometry:
//   grid  = (rows,)  one block per row, rows = tokens * heads
//   block = (threads,)  any multiple of 32 up to 1024; the glue picks it from `hidden`
//   shared memory: 32 floats, static
//
// Pointers (all T unless said otherwise; every row is `hidden` contiguous elements):
//   x            row r at x + (r / heads) * x_token_stride + (r % heads) * hidden. heads = 1 for
//                a plain [tokens, hidden] matrix; heads = H for a [tokens, H, head_dim] view of
//                the fused qkv output, normalised per head without a copy.
//   residual     [rows, hidden] contiguous, the running residual stream
//   weight       [hidden]
//   out          [rows, hidden] contiguous: normalised rows times weight
//   residual_out [rows, hidden] contiguous: x + residual rounded to T, the new residual stream
//   eps          float (pass np.float32); x_token_stride: long long; heads, hidden: int
//
// The fused kernel normalises the sum as rounded to T, as a model running wholly in T would.
#include "common.cuh"

namespace nanovllm {

template <typename T, bool kAddResidual>
__device__ void rms_norm(T* out, T* residual_out, const T* x, long long x_token_stride, int heads,
                         const T* residual, const T* weight, float eps, int hidden) {
  __shared__ float scratch[kWarpSize];
  const int row = blockIdx.x;
  const T* x_row = x + (row / heads) * x_token_stride + (long long)(row % heads) * hidden;
  const long long offset = (long long)row * hidden;

  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float value = to_float(x_row[i]);
    if constexpr (kAddResidual) {
      const T sum = from_float<T>(value + to_float(residual[offset + i]));
      residual_out[offset + i] = sum;
      value = to_float(sum);
    }
    sum_sq += value * value;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);

  // Each thread rereads only the elements it wrote above, so no barrier is needed.
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float value = kAddResidual ? to_float(residual_out[offset + i]) : to_float(x_row[i]);
    out[offset + i] = from_float<T>(value * inv_rms * to_float(weight[i]));
  }
}

}  // namespace nanovllm

#define NANOVLLM_NORM_KERNELS(SUFFIX, T)                                                      \
  extern "C" __global__ void rms_norm_##SUFFIX(T* out, const T* x, long long x_token_stride,   \
                                               int heads, const T* weight, float eps,          \
                                               int hidden) {                                   \
    nanovllm::rms_norm<T, false>(out, nullptr, x, x_token_stride, heads, nullptr, weight, eps, \
                                 hidden);                                                      \
  }                                                                                            \
  extern "C" __global__ void add_rms_norm_##SUFFIX(                                            \
      T* out, T* residual_out, const T* x, long long x_token_stride, int heads,                \
      const T* residual, const T* weight, float eps, int hidden) {                             \
    nanovllm::rms_norm<T, true>(out, residual_out, x, x_token_stride, heads, residual, weight, \
                                eps, hidden);                                                  \
  }

NANOVLLM_NORM_KERNELS(f32, float)
NANOVLLM_NORM_KERNELS(f16, __half)
NANOVLLM_NORM_KERNELS(bf16, __nv_bfloat16)
