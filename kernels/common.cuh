// common.cuh: what every kernel file shares: the element types, float conversions and
// warp/block reductions. Kernels load and store their own dtype and compute in float32.
//
// nanovllm/backends/kernel_library.py pastes this file in place of `#include "common.cuh"`,
// so NVRTC and the CPU emulator both see one self-contained source.
#ifndef NANOVLLM_COMMON_CUH
#define NANOVLLM_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC has no math.h; the emulator's host compiler does.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace nanovllm {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// A finite stand-in for -inf in running maxima: expf(kNegBig - m) is 0 for every real m, and
// kNegBig - kNegBig is 0, where (-inf) - (-inf) would be NaN.
constexpr float kNegBig = -1e30f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32;
// scratch holds 32 floats and may be reused only after another __syncthreads().
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  // Every warp sums the per-warp totals itself, so no second barrier is needed.
  const int num_warps = blockDim.x / kWarpSize;
  return warp_sum(lane < num_warps ? scratch[lane] : 0.0f);
}

}  // namespace nanovllm

#endif  // NANOVLLM_COMMON_CUH
