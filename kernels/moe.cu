// moe.cu: mixture-of-experts MLPs. A router picks K experts per token (moe_route); the T * K
// (token, expert) assignments are sorted by expert into tiles of 16 rows that each belong to one
// expert (moe_align); the experts then run as grouped matmuls over all tiles at once, one
// launch per projection whatever the number of experts (moe_gate_up with SiLU-and-mul fused,
// moe_down with the routing weight fused), and moe_sum adds each token's K outputs in a fixed
// order (deterministic: no atomics on outputs). Five launches per layer.
//
// Entry points (SUFFIX = f32 | f16 | bf16; T = float | __half | __nv_bfloat16):
//   moe_route_SUFFIX(weights, ids, logits, num_experts, top_k, renormalize)
//   moe_align(sorted_rows, tile_experts, num_tiles, ids, num_assignments, num_experts, max_tiles)
//   moe_gate_up_SUFFIX(act, x, gate_up, sorted_rows, tile_experts, num_tiles, top_k, hidden,
//                      width)
//   moe_down_SUFFIX(partial, act, down, sorted_rows, tile_experts, num_tiles, weights, hidden,
//                   width)
//   moe_sum_SUFFIX(out, partial, top_k, hidden)
//
// Launch geometry (R = 16 rows per tile, C = 32 output columns per block):
//   moe_route:   grid (tokens,), block (32,): one warp per token; static shared memory
//                kMaxExperts floats (4 KB).
//   moe_align:   grid (1,), block (1024,); static shared memory 2 * kMaxExperts ints (8 KB).
//   moe_gate_up: grid (max_tiles, ceil(width / C)), block (256,); blocks past *num_tiles return.
//   moe_down:    grid (max_tiles, ceil(hidden / C)), block (256,); likewise.
//                Both: static shared memory (R + 2 C) * 33 floats (10.3 KB), and thread t owns
//                tile row t / 16 and columns t % 16 and t % 16 + 16 of the block's C.
//   moe_sum:     grid (tokens,), block (any multiple of 32), threads striding over hidden.
//   max_tiles = ceil(T * K / R) + min(E, T * K) bounds the tiles whatever the routing, so the
//   host never waits for the routing to size a launch (CUDA-graph safe).
//
// Pointers (E experts, F = an expert's intermediate width, H = hidden, N = T * K; assignment
// a = t * K + j is token t's j-th expert):
//   logits        T, [T, E] router logits
//   weights       float, [T, K] routing weights, in descending order of probability
//   ids           int, [T, K] expert ids (ties: the lower id first)
//   sorted_rows   int, [max_tiles * R]: the assignment in each tile row, -1 in padding rows
//   tile_experts  int, [max_tiles]: the expert of each tile (-1 past *num_tiles)
//   num_tiles     int, [1]: tiles in use
//   x             T, [T, H] the tokens' hidden states
//   gate_up       T, [E, 2F, H]: expert e's gate rows [0, F), then its up rows [F, 2F)
//   act           T, [max_tiles * R, F]: silu(gate) * up per tile row
//   down          T, [E, H, F]
//   partial       float, [N, H]: weights[a] * down_e(act) per assignment
//   out           T, [T, H]: sum over j of partial[t * K + j]
//   scalars: int (pass np.int32); renormalize is 0 or 1
#include "common.cuh"

namespace nanovllm {

constexpr int kMaxExperts = 1024;
constexpr int kMoeTileRows = 16;  // R; the glue's max_tiles depends on it
constexpr int kMoeTileCols = 32;  // C
constexpr int kMoeTileK = 32;
constexpr int kMoeThreads = 256;
constexpr int kAlignThreads = 1024;

template <typename T>
__device__ void moe_route(float* weights, int* ids, const T* logits, int num_experts, int top_k,
                          int renormalize) {
  __shared__ float probs[kMaxExperts];
  const long long token = blockIdx.x;
  const int lane = threadIdx.x;
  float best = kNegBig;
  for (int e = lane; e < num_experts; e += kWarpSize) {
    probs[e] = to_float(logits[token * num_experts + e]);
    best = fmaxf(best, probs[e]);
  }
  best = warp_max(best);
  float sum = 0.0f;
  for (int e = lane; e < num_experts; e += kWarpSize) {
    probs[e] = expf(probs[e] - best);
    sum += probs[e];
  }
  sum = warp_sum(sum);
  __syncwarp();
  // K rounds of a warp-wide argmax; a picked expert is marked -1 (probabilities are >= 0).
  float picked_sum = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    float value = -1.0f;
    int index = num_experts;
    for (int e = lane; e < num_experts; e += kWarpSize) {
      if (probs[e] > value) {  // strictly greater: the lowest id wins within a lane
        value = probs[e];
        index = e;
      }
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other_value = __shfl_xor_sync(kFullMask, value, offset);
      const int other_index = __shfl_xor_sync(kFullMask, index, offset);
      if (other_value > value || (other_value == value && other_index < index)) {
        value = other_value;
        index = other_index;
      }
    }
    const float prob = value / sum;
    picked_sum += prob;
    if (lane == 0) {
      weights[token * top_k + j] = prob;
      ids[token * top_k + j] = index;
    }
    __syncwarp();
    if (lane == index % kWarpSize) probs[index] = -1.0f;
    __syncwarp();
  }
  if (renormalize) {
    for (int j = lane; j < top_k; j += kWarpSize) weights[token * top_k + j] /= picked_sum;
  }
}

__device__ void moe_align(int* sorted_rows, int* tile_experts, int* num_tiles, const int* ids,
                          int num_assignments, int num_experts, int max_tiles) {
  __shared__ int counts[kMaxExperts];
  __shared__ int row_start[kMaxExperts];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  for (int i = threadIdx.x; i < max_tiles * kMoeTileRows; i += blockDim.x) sorted_rows[i] = -1;
  for (int i = threadIdx.x; i < max_tiles; i += blockDim.x) tile_experts[i] = -1;
  __syncthreads();
  for (int a = threadIdx.x; a < num_assignments; a += blockDim.x) atomicAdd(&counts[ids[a]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    // Each expert's rows start on a tile boundary; its tiles are numbered in expert order.
    int tiles = 0;
    for (int e = 0; e < num_experts; ++e) {
      row_start[e] = tiles * kMoeTileRows;
      const int expert_tiles = (counts[e] + kMoeTileRows - 1) / kMoeTileRows;
      for (int i = 0; i < expert_tiles; ++i) tile_experts[tiles + i] = e;
      tiles += expert_tiles;
      counts[e] = 0;  // from here on: the expert's next free row
    }
    *num_tiles = tiles;
  }
  __syncthreads();
  for (int a = threadIdx.x; a < num_assignments; a += blockDim.x) {
    const int e = ids[a];
    sorted_rows[row_start[e] + atomicAdd(&counts[e], 1)] = a;
  }
}

// One tile (16 rows of one expert) times C columns of that expert's weights [cols, depth],
// over the whole depth: acc[c][i] for this thread's row and columns col0 + c + 16 i.
// `row_of(r)` gives the input row of tile row r (or -1 for padding); `weight_row(col)` the
// weight row of output column col. Inputs are staged through shared memory, K at a time.
template <typename T, int kMats, typename RowFn, typename WeightFn>
__device__ void tile_matmul(float (&acc)[kMats][2], const T* in, long long in_stride,
                            RowFn row_of, WeightFn weight_row, int cols, int depth) {
  __shared__ float in_s[kMoeTileRows][kMoeTileK + 1];
  __shared__ float w_s[kMats][kMoeTileCols][kMoeTileK + 1];
  const int row = threadIdx.x / 16;
  const int col = threadIdx.x % 16;
#pragma unroll
  for (int m = 0; m < kMats; ++m) acc[m][0] = acc[m][1] = 0.0f;
  for (int k0 = 0; k0 < depth; k0 += kMoeTileK) {
    for (int i = threadIdx.x; i < kMoeTileRows * kMoeTileK; i += blockDim.x) {
      const int r = i / kMoeTileK, k = k0 + i % kMoeTileK;
      const long long source = row_of(r);
      in_s[r][i % kMoeTileK] = source >= 0 && k < depth ? to_float(in[source * in_stride + k]) : 0.0f;
    }
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
      for (int i = threadIdx.x; i < kMoeTileCols * kMoeTileK; i += blockDim.x) {
        const int c = i / kMoeTileK, k = k0 + i % kMoeTileK;
        const T* w = weight_row(m, c);
        w_s[m][c][i % kMoeTileK] = w != nullptr && k < depth ? to_float(w[k]) : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kMoeTileK; ++k) {
      const float a = in_s[row][k];
#pragma unroll
      for (int m = 0; m < kMats; ++m) {
        acc[m][0] += a * w_s[m][col][k];
        acc[m][1] += a * w_s[m][col + 16][k];
      }
    }
    __syncthreads();
  }
}

template <typename T>
__device__ void moe_gate_up(T* act, const T* x, const T* gate_up, const int* sorted_rows,
                            const int* tile_experts, const int* num_tiles, int top_k, int hidden,
                            int width) {
  const int tile = blockIdx.x;
  if (tile >= *num_tiles) return;  // the whole block leaves together, before any barrier
  const long long expert = tile_experts[tile];
  const int col0 = blockIdx.y * kMoeTileCols;
  const int* rows = sorted_rows + (long long)tile * kMoeTileRows;
  const T* weights = gate_up + expert * 2 * width * (long long)hidden;
  float acc[2][2];  // [gate | up][column]
  tile_matmul<T, 2>(
      acc, x, hidden, [&](int r) -> long long { return rows[r] < 0 ? -1 : rows[r] / top_k; },
      [&](int m, int c) -> const T* {
        const int column = col0 + c;
        return column < width ? weights + ((long long)m * width + column) * hidden : nullptr;
      },
      width, hidden);
  const int row = threadIdx.x / 16;
  if (rows[row] < 0) return;
  for (int i = 0; i < 2; ++i) {
    const int column = col0 + threadIdx.x % 16 + 16 * i;
    if (column < width) {
      const float g = acc[0][i];
      const float silu = g / (1.0f + expf(-g));
      act[((long long)tile * kMoeTileRows + row) * width + column] = from_float<T>(silu * acc[1][i]);
    }
  }
}

template <typename T>
__device__ void moe_down(float* partial, const T* act, const T* down, const int* sorted_rows,
                         const int* tile_experts, const int* num_tiles, const float* weights,
                         int hidden, int width) {
  const int tile = blockIdx.x;
  if (tile >= *num_tiles) return;
  const long long expert = tile_experts[tile];
  const int col0 = blockIdx.y * kMoeTileCols;
  const int* rows = sorted_rows + (long long)tile * kMoeTileRows;
  const T* matrix = down + expert * hidden * (long long)width;
  const long long first_row = (long long)tile * kMoeTileRows;
  float acc[1][2];
  tile_matmul<T, 1>(
      acc, act, width, [&](int r) -> long long { return rows[r] < 0 ? -1 : first_row + r; },
      [&](int, int c) -> const T* {
        const int column = col0 + c;
        return column < hidden ? matrix + (long long)column * width : nullptr;
      },
      hidden, width);
  const int row = threadIdx.x / 16;
  const int assignment = rows[row];
  if (assignment < 0) return;
  for (int i = 0; i < 2; ++i) {
    const int column = col0 + threadIdx.x % 16 + 16 * i;
    if (column < hidden) {
      partial[(long long)assignment * hidden + column] = weights[assignment] * acc[0][i];
    }
  }
}

template <typename T>
__device__ void moe_sum(T* out, const float* partial, int top_k, int hidden) {
  const long long token = blockIdx.x;
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
    float total = 0.0f;
    for (int j = 0; j < top_k; ++j) total += partial[(token * top_k + j) * hidden + h];
    out[token * hidden + h] = from_float<T>(total);
  }
}

}  // namespace nanovllm

extern "C" __global__ void moe_align(int* sorted_rows, int* tile_experts, int* num_tiles,
                                     const int* ids, int num_assignments, int num_experts,
                                     int max_tiles) {
  nanovllm::moe_align(sorted_rows, tile_experts, num_tiles, ids, num_assignments, num_experts,
                      max_tiles);
}

#define NANOVLLM_MOE_KERNELS(SUFFIX, T)                                                         \
  extern "C" __global__ void moe_route_##SUFFIX(float* weights, int* ids, const T* logits,     \
                                                int num_experts, int top_k, int renormalize) { \
    nanovllm::moe_route<T>(weights, ids, logits, num_experts, top_k, renormalize);             \
  }                                                                                            \
  extern "C" __global__ void moe_gate_up_##SUFFIX(                                              \
      T* act, const T* x, const T* gate_up, const int* sorted_rows, const int* tile_experts,   \
      const int* num_tiles, int top_k, int hidden, int width) {                                \
    nanovllm::moe_gate_up<T>(act, x, gate_up, sorted_rows, tile_experts, num_tiles, top_k,     \
                             hidden, width);                                                   \
  }                                                                                            \
  extern "C" __global__ void moe_down_##SUFFIX(                                                 \
      float* partial, const T* act, const T* down, const int* sorted_rows,                     \
      const int* tile_experts, const int* num_tiles, const float* weights, int hidden,         \
      int width) {                                                                             \
    nanovllm::moe_down<T>(partial, act, down, sorted_rows, tile_experts, num_tiles, weights,   \
                          hidden, width);                                                      \
  }                                                                                            \
  extern "C" __global__ void moe_sum_##SUFFIX(T* out, const float* partial, int top_k,         \
                                              int hidden) {                                    \
    nanovllm::moe_sum<T>(out, partial, top_k, hidden);                                         \
  }

NANOVLLM_MOE_KERNELS(f32, float)
NANOVLLM_MOE_KERNELS(f16, __half)
NANOVLLM_MOE_KERNELS(bf16, __nv_bfloat16)
