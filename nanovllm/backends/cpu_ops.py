"""Compiled CPU kernels for everything but the matmuls: paged attention, RMSNorm, rotary, SiLU-and-
mul and the KV-cache write. Each states the op of nanovllm/backends/cpu_reference.py (the oracle
in tests) in one pass over its data, without NumPy's temporaries and per-call overhead.

Shapes as in nanovllm/backends/base.py: T tokens, B sequences, Hq / Hkv heads, D head_dim, KV caches
[num_blocks, block_size, Hkv, D]. Arrays are float32; q, k and v may be strided views of the
fused qkv output (each kernel takes their strides as they come).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from nanovllm.backends.cpu_jit import kernel

F32 = np.float32


@kernel(parallel=True)
def paged_attention(
    out, q, k_cache, v_cache, block_tables, query_start, context_lens, scale, window, soft_cap, rows
):
    """Causal attention of the query tokens `rows` (flat-batch rows) over their sequences' cached
    context; one work item per (token, KV head), for the query heads that share that KV head
    (each key and value is read once for all of them: with SmolLM2's 3 query heads a KV head,
    a third of the cache reads of one item per query head, which made attention memory-bound on
    32 long sequences). Token i of a sequence with Q new tokens and C cached ones (this step's
    included) sits at position p = C - Q + i and sees positions 0..p, or only p - window + 1..p
    when window > 0 (blocks below it may be released: never read). Scores are scaled, then
    soft-capped (cap * tanh(s / cap)) when soft_cap > 0, go to a buffer, then a softmax, then
    the weighted sum of values: K and V are read from their blocks in place, never gathered."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    for item in prange(rows.size * num_kv_heads):
        t, kv_head = rows[item // num_kv_heads], item % num_kv_heads
        heads = q[t, kv_head * group : (kv_head + 1) * group]
        seq = np.searchsorted(query_start, t, side="right") - 1
        query_len = query_start[seq + 1] - query_start[seq]
        length = context_lens[seq] - query_len + (t - query_start[seq]) + 1
        first = max(length - window, 0) if window > 0 else 0
        scores = np.empty((group, length - first), F32)
        for pos in range(first, length):
            block = block_tables[seq, pos // block_size]
            key = k_cache[block, pos % block_size, kv_head]
            for g in range(group):
                s = F32(0)
                for d in range(head_dim):
                    s += heads[g, d] * key[d]
                s *= scale
                if soft_cap > 0:
                    s = F32(math.tanh(s / soft_cap)) * soft_cap
                scores[g, pos - first] = s
        totals = np.empty(group, F32)
        for g in range(group):
            best = F32(-np.inf)
            for i in range(length - first):
                best = max(best, scores[g, i])
            total = F32(0)
            for i in range(length - first):
                p = math.exp(scores[g, i] - best)
                scores[g, i] = p
                total += p
            totals[g] = total
        acc = np.zeros((group, head_dim), F32)
        for pos in range(first, length):
            block = block_tables[seq, pos // block_size]
            value = v_cache[block, pos % block_size, kv_head]
            for g in range(group):
                p = scores[g, pos - first]
                for d in range(head_dim):
                    acc[g, d] += p * value[d]
        for g in range(group):
            for d in range(head_dim):
                out[t, kv_head * group + g, d] = acc[g, d] / totals[g]


@kernel()
def rms_norm(out, x, weight, eps):
    """out = x / sqrt(mean(x^2) + eps) * weight, row by row; x and out [R, H]."""
    rows, hidden = x.shape
    for r in range(rows):
        total = F32(0)
        for i in range(hidden):
            total += x[r, i] * x[r, i]
        inv = F32(1.0 / math.sqrt(total / hidden + eps))
        for i in range(hidden):
            out[r, i] = x[r, i] * inv * weight[i]


@kernel()
def add_rms_norm(out, summed, x, residual, weight, eps):
    """summed = x + residual (the new residual), out = rms_norm(summed); all [R, H]."""
    rows, hidden = x.shape
    for r in range(rows):
        total = F32(0)
        for i in range(hidden):
            s = x[r, i] + residual[r, i]
            summed[r, i] = s
            total += s * s
        inv = F32(1.0 / math.sqrt(total / hidden + eps))
        for i in range(hidden):
            out[r, i] = summed[r, i] * inv * weight[i]


@kernel()
def rotary(out, x, positions, cos_sin):
    """Neox rotary on x [T, H, D] into out (same shape); cos_sin [max_pos, D] = cos | sin."""
    tokens, heads, head_dim = x.shape
    half = head_dim // 2
    for t in range(tokens):
        table = cos_sin[positions[t]]
        for h in range(heads):
            for i in range(half):
                c, s = table[i], table[half + i]
                x1, x2 = x[t, h, i], x[t, h, half + i]
                out[t, h, i] = x1 * c - x2 * s
                out[t, h, half + i] = x2 * c + x1 * s


@kernel()
def silu_and_mul(out, x):
    """x [T, 2F] = gate | up -> out [T, F] = silu(gate) * up."""
    rows, width = out.shape
    for r in range(rows):
        for i in range(width):
            gate = x[r, i]
            out[r, i] = gate / (F32(1) + math.exp(-gate)) * x[r, width + i]


@kernel()
def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """k, v [T, Hkv, D] -> cache slot slot_mapping[t] (block * block_size + offset)."""
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        block, offset = slot_mapping[t] // block_size, slot_mapping[t] % block_size
        k_cache[block, offset] = k[t]
        v_cache[block, offset] = v[t]
