// token_bitmask.cu: constrained decoding: -inf on the logits of every token a row's bitmask forbids.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   apply_token_bitmask_SUFFIX(logits, bitmask, rows, logits_stride, vocab, words)
//
// Launch geometry:
//   grid  = (ceil(vocab / threads), masks)  x: a span of tokens, y: one bitmask row
//   block = (threads,)  any size; the glue uses 256. One thread per token: the 32 threads that
//           share a mask word read the same address (one broadcast load), and the logits a warp
//           touches are contiguous.
//   shared memory: none
//
// Pointers:
//   logits   T, [num_rows, logits_stride]: row r starts at logits + r * logits_stride
//   bitmask  int32, [masks, words] contiguous (llguidance's layout): bit b of word w allows token
//            32 * w + b; tokens at or past 32 * words are forbidden
//   rows     int32, [masks]: the logits row each bitmask row applies to; logits rows no mask
//            row names are left alone
//   logits_stride: long long; vocab (tokens per logits row), words: int
//
// Only forbidden logits are written; allowed ones are not even read.
#include "common.cuh"

namespace nanovllm {

template <typename T>
__device__ void apply_token_bitmask(T* logits, const int* bitmask, const int* rows,
                                    long long logits_stride, int vocab, int words) {
  const int token = blockIdx.x * blockDim.x + threadIdx.x;
  if (token >= vocab) return;
  const int mask_row = blockIdx.y;
  const int word = token / 32;
  const bool allowed =
      word < words &&
      ((static_cast<unsigned>(bitmask[static_cast<long long>(mask_row) * words + word]) >>
        (token % 32)) & 1u);
  if (!allowed) {
    logits[rows[mask_row] * logits_stride + token] = from_float<T>(-INFINITY);
  }
}

}  // namespace nanovllm

#define NANOVLLM_TOKEN_BITMASK_KERNEL(SUFFIX, T)                                             \
  extern "C" __global__ void apply_token_bitmask_##SUFFIX(T* logits, const int* bitmask,      \
                                                          const int* rows,                    \
                                                          long long logits_stride, int vocab, \
                                                          int words) {                        \
    nanovllm::apply_token_bitmask<T>(logits, bitmask, rows, logits_stride, vocab, words);     \
  }

NANOVLLM_TOKEN_BITMASK_KERNEL(f32, float)
NANOVLLM_TOKEN_BITMASK_KERNEL(f16, __half)
NANOVLLM_TOKEN_BITMASK_KERNEL(bf16, __nv_bfloat16)
