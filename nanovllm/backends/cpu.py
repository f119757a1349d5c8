"""The NumPy backend: float32 ops on the CPU, and the reference every CUDA kernel is checked against."""

from __future__ import annotations

import numpy as np

from nanovllm.backends.base import AttentionMetadata
from nanovllm.structured.bitmask import apply_token_bitmask


class CPUBackend:
    name = "cpu"
    xp = np  # the array module, for code (the sampler) written against NumPy's API

    def __init__(self, dtype=np.float32) -> None:
        self.dtype = np.dtype(dtype)

    supports_decode_graphs = False
    needs_startup_check = False  # this backend is the reference

    def check_model(self, config) -> None:
        """NumPy runs any shape."""

    def memory_info(self) -> None:
        """No device memory: `--num-blocks auto` takes the default."""
        return None

    def asarray(self, x: np.ndarray, dtype=None) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=dtype or x.dtype)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def zeros(self, shape: tuple[int, ...], dtype=None) -> np.ndarray:
        return np.zeros(shape, dtype=dtype or self.dtype)

    def embedding(self, ids: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return weight[ids]

    def linear(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None
    ) -> np.ndarray:
        if len(x) <= _GEMV_ROWS:
            # OpenBLAS's matrix-matrix path costs 4-7x its matrix-vector path at 2-3 rows
            # (measured on SmolLM2's shapes): one product per row is cheaper there.
            out = np.empty((len(x), weight.shape[0]), dtype=np.result_type(x, weight))
            for row in range(len(x)):
                np.dot(weight, x[row], out=out[row])
        else:
            out = x @ weight.T
        if bias is not None:
            out += bias
        return out

    def rms_norm(self, x, weight, eps: float, residual=None):
        if residual is not None:
            x = x + residual
        variance = np.mean(np.square(x), axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(variance + eps)) * weight, x

    def rotary(self, q, k, positions, cos_sin):
        table = cos_sin[positions]  # [T, D]
        half = table.shape[-1] // 2
        cos, sin = table[:, None, :half], table[:, None, half:]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def silu_and_mul(self, x: np.ndarray) -> np.ndarray:
        gate, up = np.split(x, 2, axis=-1)
        return gate / (1.0 + np.exp(-gate)) * up

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        block_size = k_cache.shape[1]
        blocks, offsets = np.divmod(slot_mapping, block_size)
        k_cache[blocks, offsets] = k
        v_cache[blocks, offsets] = v

    def apply_token_bitmask(self, logits, bitmask, rows=None):
        """-inf on the logits of every token a bitmask row forbids, in place (structured/bitmask.py)."""
        return apply_token_bitmask(logits, bitmask, rows)

    def paged_attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        out = np.empty_like(q)
        query_lens = meta.query_lens_host
        starts = np.asarray(meta.query_start_host)
        decodes = np.flatnonzero(query_lens == 1)
        for group in _by_context_length(decodes, meta.context_lens_host):
            rows = starts[group]
            out[rows] = _decode_attention(q[rows], k_cache, v_cache, meta, group, scale)
        for b in np.flatnonzero(query_lens > 1):
            rows = slice(starts[b], starts[b + 1])
            out[rows] = _prefill_attention(q[rows], k_cache, v_cache, meta, b, scale)
        return out


_GEMV_ROWS = 3
_DECODE_GROUP = 8  # most decode sequences gathered and padded together


def _by_context_length(seqs: np.ndarray, context_lens: np.ndarray) -> list[np.ndarray]:
    """Decode sequences in groups of similar context length: each group is padded only to its own
    longest context, so short sequences do not pay for the longest one's gather."""
    if len(seqs) == 0:
        return []
    ordered = seqs[np.argsort(context_lens[seqs], kind="stable")]
    return np.array_split(ordered, -(-len(seqs) // _DECODE_GROUP))


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def _gather_context(cache: np.ndarray, block_table: np.ndarray, num_blocks: int) -> np.ndarray:
    """[..., num_blocks] block ids -> [..., num_blocks * block_size, Hkv, D] cached vectors."""
    gathered = cache[block_table[..., :num_blocks]]
    return gathered.reshape(*gathered.shape[:-4], -1, *cache.shape[2:])


def _softmax_last(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _decode_attention(q, k_cache, v_cache, meta, seqs, scale):
    """One query token per sequence, all sequences at once: [B, Hq, D] -> [B, Hq, D]."""
    context_lens = meta.context_lens_host[seqs]
    num_blocks = -(-int(context_lens.max()) // meta.block_size)
    table = meta.block_tables_host[seqs]
    keys = _gather_context(k_cache, table, num_blocks)  # [B, L, Hkv, D]
    values = _gather_context(v_cache, table, num_blocks)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = np.matmul(grouped, keys.transpose(0, 2, 3, 1))  # [B, Hkv, G, L]
    # Scale and mask in one pass: positions past a sequence's context get -inf.
    bias = np.where(np.arange(keys.shape[1])[None, :] < context_lens[:, None], 0.0, -np.inf)
    scores = scores * np.float32(scale) + bias[:, None, None, :].astype(np.float32)
    probs = _softmax_last(scores)
    out = np.matmul(probs, values.transpose(0, 2, 1, 3))  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim)


def _prefill_attention(q, k_cache, v_cache, meta, b, scale):
    """Several query tokens of one sequence, causal over its cache: [Q, Hq, D] -> [Q, Hq, D]."""
    context_len = int(meta.context_lens_host[b])
    num_blocks = -(-context_len // meta.block_size)
    table = meta.block_tables_host[b]
    keys = _gather_context(k_cache, table, num_blocks)[:context_len]  # [L, Hkv, D]
    values = _gather_context(v_cache, table, num_blocks)[:context_len]
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    grouped = q.reshape(num_queries, num_kv_heads, -1, head_dim).transpose(
        1, 2, 0, 3
    )  # [Hkv,G,Q,D]
    scores = np.matmul(grouped, keys.transpose(1, 2, 0)[:, None]) * scale  # [Hkv, G, Q, L]
    query_pos = np.arange(context_len - num_queries, context_len)
    future = np.arange(context_len)[None, :] > query_pos[:, None]  # [Q, L]
    scores[..., future] = -np.inf
    probs = _softmax_last(scores)
    out = np.matmul(probs, values.transpose(1, 0, 2)[:, None])  # [Hkv, G, Q, D]
    return out.transpose(2, 0, 1, 3).reshape(num_queries, num_heads, head_dim)
