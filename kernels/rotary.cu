// rotary.cu: neox-style rotary position embedding of queries and keys, from a precomputed table.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   rotary_SUFFIX(q_out, k_out, q, q_token_stride, k, k_token_stride, positions, cos_sin,
//                 num_heads, num_kv_heads, head_dim)
//
// Launch geometry:
//   grid  = (tokens,)  one block per token
//   block = (threads,)  any size; each thread rotates (dim, dim + head_dim/2) pairs in a loop
//   shared memory: none
//
// Pointers:
//   q          T, [tokens, num_heads, head_dim] with token stride q_token_stride (elements);
//              heads and dims contiguous, so a view sliced from the fused qkv output works
//   k          T, [tokens, num_kv_heads, head_dim] with token stride k_token_stride
//   positions  long long, [tokens]: each token's position in its sequence
//   cos_sin    float, [max_positions, head_dim]: cos of each frequency in the first half, sin in
//              the second (nanovllm/models/rope.py; Llama 3 / linear scaling is already in it)
//   q_out      T, [tokens, num_heads, head_dim] contiguous
//   k_out      T, [tokens, num_kv_heads, head_dim] contiguous
//   token strides: long long; num_heads, num_kv_heads, head_dim: int (head_dim even)
#include "common.cuh"

namespace nanovllm {

template <typename T>
__device__ void rotary(T* q_out, T* k_out, const T* q, long long q_token_stride, const T* k,
                       long long k_token_stride, const long long* positions, const float* cos_sin,
                       int num_heads, int num_kv_heads, int head_dim) {
  const int token = blockIdx.x;
  const int half = head_dim / 2;
  const float* cos = cos_sin + positions[token] * head_dim;
  const float* sin = cos + half;
  const int q_pairs = num_heads * half;
  const int pairs = (num_heads + num_kv_heads) * half;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    // One loop over the query heads, then the key heads, keeps every thread busy when
    // num_kv_heads is small.
    const bool is_query = i < q_pairs;
    const int pair = is_query ? i : i - q_pairs;
    const int head = pair / half;
    const int dim = pair % half;
    const T* src = is_query ? q + token * q_token_stride : k + token * k_token_stride;
    T* dst = is_query ? q_out + (long long)token * num_heads * head_dim
                      : k_out + (long long)token * num_kv_heads * head_dim;
    src += head * head_dim;
    dst += head * head_dim;
    const float x1 = to_float(src[dim]);
    const float x2 = to_float(src[dim + half]);
    dst[dim] = from_float<T>(x1 * cos[dim] - x2 * sin[dim]);
    dst[dim + half] = from_float<T>(x2 * cos[dim] + x1 * sin[dim]);
  }
}

}  // namespace nanovllm

#define NANOVLLM_ROTARY_KERNEL(SUFFIX, T)                                                        \
  extern "C" __global__ void rotary_##SUFFIX(                                                     \
      T* q_out, T* k_out, const T* q, long long q_token_stride, const T* k,                       \
      long long k_token_stride, const long long* positions, const float* cos_sin, int num_heads, \
      int num_kv_heads, int head_dim) {                                                           \
    nanovllm::rotary<T>(q_out, k_out, q, q_token_stride, k, k_token_stride, positions, cos_sin,   \
                        num_heads, num_kv_heads, head_dim);                                       \
  }

NANOVLLM_ROTARY_KERNEL(f32, float)
NANOVLLM_ROTARY_KERNEL(f16, __half)
NANOVLLM_ROTARY_KERNEL(bf16, __nv_bfloat16)
