"""The reference backend (`cpu-reference`): NumPy ops in float32, the readable statement of each op
and the oracle every compiled CPU kernel and every CUDA kernel is checked against.

Weights are dequantized to float32 at load, whatever the file stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.backends.base import AttentionMetadata
from nanovllm.models.quantized import Weight, dequantize_weight
from nanovllm.structured.bitmask import apply_token_bitmask


class ReferenceBackend:
    name = "cpu-reference"
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

    def weight(self, tensor: np.ndarray | Weight) -> np.ndarray:
        return np.ascontiguousarray(dequantize_weight(tensor), dtype=self.dtype)

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

    def gelu_tanh_and_mul(self, x: np.ndarray) -> np.ndarray:
        gate, up = np.split(x, 2, axis=-1)
        inner = np.float32(_SQRT_2_OVER_PI) * (gate + np.float32(0.044715) * gate**3)
        return np.float32(0.5) * gate * (1.0 + np.tanh(inner)) * up

    def soft_cap(self, x: np.ndarray, cap: float) -> np.ndarray:
        cap = np.float32(cap)
        return np.tanh(x / cap) * cap

    def moe_route(self, logits: np.ndarray, top_k: int, renormalize: bool):
        probs = _softmax_last(np.array(logits, dtype=np.float32))
        ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        weights = np.take_along_axis(probs, ids, axis=-1)
        if renormalize:
            weights /= weights.sum(axis=-1, keepdims=True)
        return weights, ids.astype(np.int32)

    def moe_experts(self, x, gate_up, down, weights, ids) -> np.ndarray:
        """Token groups per expert: each expert that some token chose runs once on its rows."""
        out = np.zeros((len(x), down.shape[1]), dtype=x.dtype)
        flat = ids.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(gate_up.shape[0] + 1))
        for expert in np.unique(flat):
            picks = order[bounds[expert] : bounds[expert + 1]]
            tokens = picks // ids.shape[1]  # a token picks an expert at most once
            hidden = self.silu_and_mul(self.linear(x[tokens], gate_up[expert]))
            out[tokens] += self.linear(hidden, down[expert]) * weights.ravel()[picks, None]
        return out

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        block_size = k_cache.shape[1]
        blocks, offsets = np.divmod(slot_mapping, block_size)
        k_cache[blocks, offsets] = k
        v_cache[blocks, offsets] = v

    def apply_token_bitmask(self, logits, bitmask, rows=None):
        """-inf on the logits of every token a bitmask row forbids, in place (structured/bitmask.py)."""
        return apply_token_bitmask(logits, bitmask, rows)

    def paged_attention(
        self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window=0, soft_cap=0.0
    ):
        out = np.empty_like(q)
        query_lens = meta.query_lens_host
        starts = np.asarray(meta.query_start_host)
        scores = Scores(scale, window, soft_cap)
        decodes = np.flatnonzero(query_lens == 1)
        for group in _by_context_length(decodes, meta.context_lens_host):
            rows = starts[group]
            out[rows] = _decode_attention(q[rows], k_cache, v_cache, meta, group, scores)
        for b in np.flatnonzero(query_lens > 1):
            rows = slice(starts[b], starts[b + 1])
            out[rows] = prefill_attention(q[rows], k_cache, v_cache, meta, b, scores)
        return out


_SQRT_2_OVER_PI = 0.7978845608028654
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


@dataclass(slots=True)
class Scores:
    """How scores become logits: scaled, soft-capped, and masked to the window."""

    scale: float
    window: int
    soft_cap: float

    def first_visible(self, position: np.ndarray) -> np.ndarray:
        """The first cache position a query at `position` sees."""
        if not self.window:
            return np.zeros_like(position)
        return np.maximum(position - self.window + 1, 0)

    def logits(self, scores: np.ndarray) -> np.ndarray:
        scores *= np.float32(self.scale)
        if self.soft_cap:
            cap = np.float32(self.soft_cap)
            scores = np.tanh(scores / cap, out=scores) * cap
        return scores


def _gather_blocks(cache: np.ndarray, table: np.ndarray, first: np.ndarray, count: int):
    """[B, max_blocks] tables -> [B, count * block_size, Hkv, D]: each row's blocks from its
    block index `first` on. Indices past a table's width repeat its last column (masked later);
    entries before `first` are never read."""
    columns = np.minimum(first[:, None] + np.arange(count), table.shape[1] - 1)
    gathered = cache[np.take_along_axis(table, columns, axis=1)]
    return gathered.reshape(len(table), -1, *cache.shape[2:])


def _softmax_last(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _decode_attention(q, k_cache, v_cache, meta, seqs, scores: Scores):
    """One query token per sequence, all sequences at once: [B, Hq, D] -> [B, Hq, D]."""
    size = meta.block_size
    context_lens = meta.context_lens_host[seqs]
    first_block = scores.first_visible(context_lens - 1) // size
    num_blocks = int((-(-context_lens // size) - first_block).max())
    table = meta.block_tables_host[seqs]
    keys = _gather_blocks(k_cache, table, first_block, num_blocks)  # [B, L, Hkv, D]
    values = _gather_blocks(v_cache, table, first_block, num_blocks)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = scores.logits(np.matmul(grouped, keys.transpose(0, 2, 3, 1)))  # [B, Hkv, G, L]
    # Positions before the window or past the context get -inf.
    key_pos = first_block[:, None] * size + np.arange(keys.shape[1])[None, :]
    visible = (key_pos >= scores.first_visible(context_lens - 1)[:, None]) & (
        key_pos < context_lens[:, None]
    )
    logits += np.where(visible, 0.0, -np.inf).astype(np.float32)[:, None, None, :]
    probs = _softmax_last(logits)
    out = np.matmul(probs, values.transpose(0, 2, 1, 3))  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim)


def prefill_attention(q, k_cache, v_cache, meta, b, scores: Scores):
    """Several query tokens of one sequence, causal over its cache: [Q, Hq, D] -> [Q, Hq, D]."""
    size = meta.block_size
    context_len = int(meta.context_lens_host[b])
    num_queries, num_heads, head_dim = q.shape
    query_pos = np.arange(context_len - num_queries, context_len)
    first_block = scores.first_visible(query_pos[:1]) // size
    num_blocks = -(-context_len // size) - int(first_block[0])
    table = meta.block_tables_host[b : b + 1]
    start = int(first_block[0]) * size
    keys = _gather_blocks(k_cache, table, first_block, num_blocks)[0, : context_len - start]
    values = _gather_blocks(v_cache, table, first_block, num_blocks)[0, : context_len - start]
    num_kv_heads = keys.shape[1]
    grouped = q.reshape(num_queries, num_kv_heads, -1, head_dim).transpose(
        1, 2, 0, 3
    )  # [Hkv,G,Q,D]
    logits = scores.logits(np.matmul(grouped, keys.transpose(1, 2, 0)[:, None]))  # [Hkv,G,Q,L]
    key_pos = np.arange(start, context_len)[None, :]
    hidden = (key_pos > query_pos[:, None]) | (key_pos < scores.first_visible(query_pos)[:, None])
    logits[..., hidden] = -np.inf
    probs = _softmax_last(logits)
    out = np.matmul(probs, values.transpose(1, 0, 2)[:, None])  # [Hkv, G, Q, D]
    return out.transpose(2, 0, 1, 3).reshape(num_queries, num_heads, head_dim)
