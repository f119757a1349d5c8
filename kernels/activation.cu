// activation.cu: the gate of a gated MLP: out = act(gate) * up, with act SiLU (Llama's SwiGLU)
// or GELU's tanh approximation (Gemma's GeGLU).
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   silu_and_mul_SUFFIX(out, x, width)
//   gelu_tanh_and_mul_SUFFIX(out, x, width)
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

struct Silu {
  // For very negative g, expf(-g) is inf and g / inf is -0: the right limit, no NaN.
  __device__ float operator()(float g) const { return g / (1.0f + expf(-g)); }
};

struct GeluTanh {
  // 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), as PyTorch's gelu(approximate="tanh").
  __device__ float operator()(float g) const {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + tanhf(inner));
  }
};

template <typename T, typename Act>
__device__ void gated(T* out, const T* x, int width) {
  const long long token = blockIdx.x;
  const T* gate = x + token * 2 * width;
  const T* up = gate + width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    out[token * width + i] = from_float<T>(Act()(to_float(gate[i])) * to_float(up[i]));
  }
}

}  // namespace nanovllm

#define NANOVLLM_ACTIVATION_KERNEL(SUFFIX, T)                                                   \
  extern "C" __global__ void silu_and_mul_##SUFFIX(T* out, const T* x, int width) {            \
    nanovllm::gated<T, nanovllm::Silu>(out, x, width);                                         \
  }                                                                                            \
  extern "C" __global__ void gelu_tanh_and_mul_##SUFFIX(T* out, const T* x, int width) {       \
    nanovllm::gated<T, nanovllm::GeluTanh>(out, x, width);                                     \
  }

NANOVLLM_ACTIVATION_KERNEL(f32, float)
NANOVLLM_ACTIVATION_KERNEL(f16, __half)
NANOVLLM_ACTIVATION_KERNEL(bf16, __nv_bfloat16)
