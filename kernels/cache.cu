// cache.cu: write this step's keys and values into the paged KV cache, by slot mapping.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   write_kv_SUFFIX(k_cache, v_cache, k, k_token_stride, v, v_token_stride, slot_mapping,
//                   row_size)
//
// Launch geometry:
//   grid  = (tokens,)  one block per new token
//   block = (threads,)  any size; threads stride over the token's row_size elements
//   shared memory: none
//
// Pointers:
//   k, v          T, [tokens, num_kv_heads, head_dim] with token strides k_token_stride and
//                 v_token_stride (elements); heads and dims contiguous, so views sliced from
//                 the fused qkv output need no copy
//   slot_mapping  long long, [tokens]: block_id * block_size + offset; a negative slot skips
//                 the token (padding)
//   k_cache       T, [num_blocks, block_size, num_kv_heads, head_dim] contiguous
//   v_cache       T, same shape as k_cache
//   row_size = num_kv_heads * head_dim: int; token strides: long long
//
// Slot s starts at element s * row_size of a cache because the cache is contiguous with
// block_size rows of row_size elements per block.
#include "common.cuh"

namespace nanovllm {

template <typename T>
__device__ void write_kv(T* k_cache, T* v_cache, const T* k, long long k_token_stride,
                         const T* v, long long v_token_stride, const long long* slot_mapping,
                         int row_size) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  T* k_dst = k_cache + slot * row_size;
  T* v_dst = v_cache + slot * row_size;
  const T* k_src = k + token * k_token_stride;
  const T* v_src = v + token * v_token_stride;
  for (int i = threadIdx.x; i < row_size; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

}  // namespace nanovllm

#define NANOVLLM_CACHE_KERNEL(SUFFIX, T)                                                        \
  extern "C" __global__ void write_kv_##SUFFIX(T* k_cache, T* v_cache, const T* k,              \
                                               long long k_token_stride, const T* v,             \
                                               long long v_token_stride,                         \
                                               const long long* slot_mapping, int row_size) {    \
    nanovllm::write_kv<T>(k_cache, v_cache, k, k_token_stride, v, v_token_stride, slot_mapping, \
                          row_size);                                                             \
  }

NANOVLLM_CACHE_KERNEL(f32, float)
NANOVLLM_CACHE_KERNEL(f16, __half)
NANOVLLM_CACHE_KERNEL(bf16, __nv_bfloat16)
