// paged_attention.cu: causal attention of each sequence's query tokens over its paged KV cache.
// One kernel serves prefill, chunked prefill, decode and speculative verification.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16;
// D = head_dim, one of 16, 32, 64, 80, 96, 128, 256):
//   paged_attention_SUFFIX_dD(out, q, k_cache, v_cache, block_tables, query_start, context_lens,
//                             scale, num_heads, num_kv_heads, block_size, max_blocks, window,
//                             soft_cap)
//
// Launch geometry:
//   grid  = (ceil(max_query_len * group / 8), num_seqs, num_kv_heads), group = num_heads /
//           num_kv_heads. Block (x, b, h) takes 8 consecutive "query vectors" of sequence b that
//           share kv head h: vector u is query token u / group, head h * group + u % group.
//           Blocks past the end of a sequence's vectors return at once.
//   block = (128,)  four warps; each warp takes every fourth chunk of 32 keys for all 8 vectors,
//           then the warps merge their partial softmax states through shared memory.
//   shared memory: dynamic, (8 * D + 4 * 8 * D + 2 * 4 * 8) * 4 bytes = queries, the warps'
//           accumulators to merge, their maxima and sums: 20.3 KB for D = 128, 40.3 KB for
//           D = 256 (under the 48 KB a launch may take without raising the kernel's limit).
//
// Pointers:
//   q             T, [tokens, num_heads, D] contiguous (tokens of all sequences, flat)
//   k_cache       T, [num_blocks, block_size, num_kv_heads, D] contiguous
//   v_cache       T, same shape as k_cache
//   block_tables  int, [num_seqs, max_blocks]: the cache blocks of each sequence, in order
//   query_start   int, [num_seqs + 1]: sequence b owns query rows query_start[b]..[b + 1]
//   context_lens  int, [num_seqs]: tokens cached for sequence b, this step's included
//   out           T, [tokens, num_heads, D] contiguous
//   scale, soft_cap: float (pass np.float32); the other scalars: int (pass np.int32)
//
// Query i of sequence b (q_len = query_start[b + 1] - query_start[b]) sits at position
// p = context_lens[b] - q_len + i and sees cache positions 0..p, or p - window + 1..p when
// window > 0 (a sliding-window layer). A score s = scale * q.k becomes
// soft_cap * tanh(s / soft_cap) when soft_cap > 0 (Gemma 2), then goes through the softmax.
// A block reads cache positions from its first vector's first visible one: nothing of a
// sequence before (its first query's position) - window + 1, not even the block table entry,
// so the engine may free blocks that fall wholly before every query's window.
//
// Each lane scores one key of a 32-key chunk against all of the block's query vectors, so a key
// is read once per 8 vectors; values are read one key at a time with the lanes spread over the
// head dimension (coalesced). Plain loads and shuffles only: no tensor cores, no async copies.
#include "common.cuh"

// The block's dynamic shared memory (sized by the launch), at file scope so that its symbol
// is the plain name on every compiler.
extern __shared__ float attention_smem[];

namespace nanovllm {

constexpr int kAttentionWarps = 4;
constexpr int kQueryVectors = 8;  // query vectors per block; the glue's grid depends on it
// Keys are loaded kKeyStep dims at a time, so the per-vector dot products can skip the
// block's unused vector slots without indexing registers at run time.
constexpr int kKeyStep = 8;

template <typename T, int D>
__device__ void paged_attention(T* out, const T* q, const T* k_cache, const T* v_cache,
                                const int* block_tables, const int* query_start,
                                const int* context_lens, float scale, int num_heads,
                                int num_kv_heads, int block_size, int max_blocks, int window,
                                float soft_cap) {
  static_assert(D % kKeyStep == 0, "head_dim must be a multiple of 8");
  constexpr int kDimsPerLane = (D + kWarpSize - 1) / kWarpSize;
  // Carved out of the launch's dynamic shared memory (attention_shared_bytes in the glue).
  auto q_s = reinterpret_cast<float (*)[D]>(attention_smem);  // [kQueryVectors][D]
  auto acc_s =  // [kAttentionWarps][kQueryVectors][D]
      reinterpret_cast<float (*)[kQueryVectors][D]>(attention_smem + kQueryVectors * D);
  float* stats = attention_smem + (1 + kAttentionWarps) * kQueryVectors * D;
  auto max_s = reinterpret_cast<float (*)[kQueryVectors]>(stats);  // [kAttentionWarps][...]
  auto sum_s = reinterpret_cast<float (*)[kQueryVectors]>(stats + kAttentionWarps * kQueryVectors);

  const int seq = blockIdx.y;
  const int kv_head = blockIdx.z;
  const int group = num_heads / num_kv_heads;
  const int q_begin = query_start[seq];
  const int q_len = query_start[seq + 1] - q_begin;
  const int first = blockIdx.x * kQueryVectors;
  const int count = min(kQueryVectors, q_len * group - first);
  if (count <= 0) return;  // the whole block leaves together, before any barrier
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int first_pos = context_lens[seq] - q_len;  // position of the sequence's query 0

  // Row of vector v in q and out, in units of D elements.
  auto vector_row = [&](int v) -> long long {
    const int u = first + v;
    return (long long)(q_begin + u / group) * num_heads + kv_head * group + u % group;
  };

  for (int i = threadIdx.x; i < kQueryVectors * D; i += blockDim.x) {
    const int v = i / D;
    const int d = i % D;
    q_s[v][d] = v < count ? to_float(q[vector_row(v) * D + d]) * scale : 0.0f;
  }
  __syncthreads();

  int pos[kQueryVectors];  // the last key each vector may see
  float row_max[kQueryVectors];
  float row_sum[kQueryVectors];  // per lane: the sum over this lane's keys only
  float acc[kQueryVectors][kDimsPerLane];
#pragma unroll
  for (int v = 0; v < kQueryVectors; ++v) {
    pos[v] = first_pos + (first + v) / group;
    row_max[v] = kNegBig;
    row_sum[v] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[v][i] = 0.0f;
  }
  const int last_key = first_pos + (first + count - 1) / group;
  // Vector 0 has the block's lowest position, so its window starts first.
  const int first_key = window > 0 ? max(0, pos[0] - window + 1) : 0;
  const int first_chunk = first_key / kWarpSize * kWarpSize;
  const int* table = block_tables + (long long)seq * max_blocks;
  const long long token_stride = (long long)num_kv_heads * D;  // elements per cache slot
  auto key_offset = [&](int key) -> long long {
    const long long slot = (long long)table[key / block_size] * block_size + key % block_size;
    return slot * token_stride + (long long)kv_head * D;
  };

  for (int chunk = first_chunk + warp * kWarpSize; chunk <= last_key;
       chunk += kAttentionWarps * kWarpSize) {
    const int key = chunk + lane;
    const bool in_range = key >= first_key && key <= last_key;

    float score[kQueryVectors];
#pragma unroll
    for (int v = 0; v < kQueryVectors; ++v) score[v] = 0.0f;
    if (in_range) {
      const T* k_row = k_cache + key_offset(key);
      for (int d0 = 0; d0 < D; d0 += kKeyStep) {
        float k_part[kKeyStep];
#pragma unroll
        for (int j = 0; j < kKeyStep; ++j) k_part[j] = to_float(k_row[d0 + j]);
#pragma unroll
        for (int v = 0; v < kQueryVectors; ++v) {
          if (v < count) {
#pragma unroll
            for (int j = 0; j < kKeyStep; ++j) score[v] += q_s[v][d0 + j] * k_part[j];
          }
        }
      }
    }

    // Online softmax: rescale what was accumulated when a larger score turns up.
    float prob[kQueryVectors];
#pragma unroll
    for (int v = 0; v < kQueryVectors; ++v) {
      prob[v] = 0.0f;
      if (v < count) {
        const bool visible = in_range && key <= pos[v] && (window <= 0 || key > pos[v] - window);
        float s = visible ? score[v] : kNegBig;
        if (soft_cap > 0.0f && visible) s = soft_cap * tanhf(s / soft_cap);
        const float new_max = fmaxf(row_max[v], warp_max(s));
        const float rescale = expf(row_max[v] - new_max);
        prob[v] = visible ? expf(s - new_max) : 0.0f;
        row_sum[v] = row_sum[v] * rescale + prob[v];
        row_max[v] = new_max;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[v][i] *= rescale;
      }
    }

    // Values: key by key, each lane owning dims lane, lane + 32, ...
    const int keys_here = min(kWarpSize, last_key - chunk + 1);
    for (int j = max(0, first_key - chunk); j < keys_here; ++j) {
      const T* v_row = v_cache + key_offset(chunk + j);
      float value[kDimsPerLane];
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + i * kWarpSize;
        value[i] = d < D ? to_float(v_row[d]) : 0.0f;
      }
#pragma unroll
      for (int v = 0; v < kQueryVectors; ++v) {
        const float p = __shfl_sync(kFullMask, prob[v], j);
        if (v < count) {
#pragma unroll
          for (int i = 0; i < kDimsPerLane; ++i) acc[v][i] += p * value[i];
        }
      }
    }
  }

  // Merge the four warps' partial states. A warp that saw no chunk contributes max kNegBig and
  // sum 0, which weigh nothing below.
#pragma unroll
  for (int v = 0; v < kQueryVectors; ++v) {
    const float total = warp_sum(row_sum[v]);
    if (lane == 0) {
      max_s[warp][v] = row_max[v];
      sum_s[warp][v] = total;
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      if (d < D) acc_s[warp][v][d] = acc[v][i];
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < count * D; i += blockDim.x) {
    const int v = i / D;
    const int d = i % D;
    float best = kNegBig;
    for (int w = 0; w < kAttentionWarps; ++w) best = fmaxf(best, max_s[w][v]);
    float total = 0.0f;
    float value = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) {
      const float weight = expf(max_s[w][v] - best);
      total += sum_s[w][v] * weight;
      value += acc_s[w][v][d] * weight;
    }
    out[vector_row(v) * D + d] = from_float<T>(value / total);
  }
}

}  // namespace nanovllm

#define NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, D)                                           \
  extern "C" __global__ void paged_attention_##SUFFIX##_d##D(                                   \
      T* out, const T* q, const T* k_cache, const T* v_cache, const int* block_tables,          \
      const int* query_start, const int* context_lens, float scale, int num_heads,              \
      int num_kv_heads, int block_size, int max_blocks, int window, float soft_cap) {           \
    nanovllm::paged_attention<T, D>(out, q, k_cache, v_cache, block_tables, query_start,        \
                                    context_lens, scale, num_heads, num_kv_heads, block_size,   \
                                    max_blocks, window, soft_cap);                              \
  }

#define NANOVLLM_PAGED_ATTENTION_HEAD_DIMS(SUFFIX, T) \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 16)      \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 32)      \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 64)      \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 80)      \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 96)      \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 128)     \
  NANOVLLM_PAGED_ATTENTION_KERNEL(SUFFIX, T, 256)

NANOVLLM_PAGED_ATTENTION_HEAD_DIMS(f32, float)
NANOVLLM_PAGED_ATTENTION_HEAD_DIMS(f16, __half)
NANOVLLM_PAGED_ATTENTION_HEAD_DIMS(bf16, __nv_bfloat16)
