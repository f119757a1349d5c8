// activation.cu: SiLU-and-mul, the gate of a gated MLP: out = silu(gate) * up.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   silu_and_mul_SUFFIX(out, x, width)
//
// Launch geometry:
//   grid  = (tokens,)  one block per token
//   block = (threads,)  any size; threads stride over the `width` outputs of the token
//   shared memory: none
//
// Pointers:
//   x    T, [tokens, 2 * width] contiguous: gate in columns [0, width), up in [width, 2 width)
//   out  T, [tokens, width] contiguous
//   width: int
#include "common.cuh"

namespace nanovllm {

template <typename T>
__device__ void silu_and_mul(T* out, const T* x, int width) {
  const long long token = blockIdx.x;
  const T* gate = x + token * 2 * width;
  const T* up = gate + width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float g = to_float(gate[i]);
    // For very negative g, expf(-g) is inf and g / inf is -0: the right limit, no NaN.
    out[token * width + i] = from_float<T>(g / (1.0f + expf(-g)) * to_float(up[i]));
  }
}

}  // namespace nanovllm

#define NANOVLLM_ACTIVATION_KERNEL(SUFFIX, T)                                              \
  extern "C" __global__ void silu_and_mul_##SUFFIX(T* out, const T* x, int width) {       \
    nanovllm::silu_and_mul<T>(out, x, width);                                             \
  }

NANOVLLM_ACTIVATION_KERNEL(f32, float)
NANOVLLM_ACTIVATION_KERNEL(f16, __half)
NANOVLLM_ACTIVATION_KERNEL(bf16, __nv_bfloat16)
