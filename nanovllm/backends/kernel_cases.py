"""Kernel cases: random inputs run through a backend's op and through the NumPy reference
(nanovllm/backends/cpu_reference.py), in float32, float16 and bfloat16. `nanovllm check`, the engine's
start-up self-check and tests/test_kernels.py (through the CUDA emulator) all run these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nanovllm.backends.base import AttentionInputs, AttentionMetadata, slots_of
from nanovllm.backends.cpu_reference import ReferenceBackend
from nanovllm.backends.cuda import CUDABackend, from_storage, to_storage
from nanovllm.backends.kernel_library import ATTENTION_HEAD_DIMS

DTYPES = ("float32", "float16", "bfloat16")
# (atol, rtol) against the float32 reference computed on the same rounded inputs: about two
# units in the last place of the output dtype (float16 2^-10, bfloat16 2^-7 near 1).
TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}

Results = tuple[list[np.ndarray], list[np.ndarray]]  # (kernel outputs, reference), float32


@dataclass(slots=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


# ---- op cases: random inputs, the backend's result and the NumPy reference ------------------
def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale=1.0):
    """Float32 values exactly representable in dtype, so kernel and reference see the same input."""
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    return from_storage(to_storage(values, dtype))


def _device(backend, x: np.ndarray, dtype: str):
    return backend.asarray(to_storage(x, dtype))


def _host(backend, x) -> np.ndarray:
    return from_storage(backend.to_numpy(x))


def case_rms_norm(backend, dtype, rng, tokens=5, hidden=96, residual=False) -> Results:
    x = _random(rng, (tokens, hidden), dtype)
    weight = _random(rng, (hidden,), dtype) * 0.5 + 1.0
    weight = from_storage(to_storage(weight, dtype))
    res = _random(rng, (tokens, hidden), dtype) if residual else None
    ref = ReferenceBackend().rms_norm(x, weight, 1e-5, res)
    dev_res = _device(backend, res, dtype) if residual else None
    out = backend.rms_norm(
        _device(backend, x, dtype), _device(backend, weight, dtype), 1e-5, dev_res
    )
    return [_host(backend, a) for a in out], list(ref)


def _qkv(rng, dtype, tokens, heads, kv_heads, head_dim) -> np.ndarray:
    return _random(rng, (tokens, (heads + 2 * kv_heads) * head_dim), dtype)


def _views(qkv, heads, kv_heads, head_dim):
    """q, k, v sliced from a fused qkv output the way models/llama.py does: strided views."""
    tokens, q_size, kv_size = qkv.shape[0], heads * head_dim, kv_heads * head_dim
    return (
        qkv[:, :q_size].reshape(tokens, heads, head_dim),
        qkv[:, q_size : q_size + kv_size].reshape(tokens, kv_heads, head_dim),
        qkv[:, q_size + kv_size :].reshape(tokens, kv_heads, head_dim),
    )


def case_head_norm(backend, dtype, rng, tokens=3, heads=4, kv_heads=2, head_dim=32) -> Results:
    """Qwen3's per-head q norm, on a strided view of the fused qkv output."""
    qkv = _qkv(rng, dtype, tokens, heads, kv_heads, head_dim)
    weight = from_storage(to_storage(rng.uniform(0.5, 1.5, head_dim).astype(np.float32), dtype))
    q_ref, _, _ = _views(qkv, heads, kv_heads, head_dim)
    q_dev, _, _ = _views(_device(backend, qkv, dtype), heads, kv_heads, head_dim)
    out, _ = backend.rms_norm(q_dev, _device(backend, weight, dtype), 1e-6)
    return [_host(backend, out)], [ReferenceBackend().rms_norm(q_ref, weight, 1e-6)[0]]


def case_rotary(backend, dtype, rng, tokens=5, heads=4, kv_heads=2, head_dim=32) -> Results:
    from nanovllm.models.rope import rope_cos_sin

    qkv = _qkv(rng, dtype, tokens, heads, kv_heads, head_dim)
    table = rope_cos_sin(head_dim, 10000.0, 64, None)
    positions = rng.integers(0, 64, tokens).astype(np.int64)
    q_ref, k_ref, _ = _views(qkv, heads, kv_heads, head_dim)
    q_dev, k_dev, _ = _views(_device(backend, qkv, dtype), heads, kv_heads, head_dim)
    out = backend.rotary(q_dev, k_dev, backend.asarray(positions), backend.asarray(table))
    ref = ReferenceBackend().rotary(q_ref, k_ref, positions, table)
    return [_host(backend, a) for a in out], list(ref)


def case_silu_and_mul(backend, dtype, rng, tokens=5, width=80) -> Results:
    x = _random(rng, (tokens, 2 * width), dtype, scale=3.0)
    out = backend.silu_and_mul(_device(backend, x, dtype))
    return [_host(backend, out)], [ReferenceBackend().silu_and_mul(x)]


def case_gelu_tanh_and_mul(backend, dtype, rng, tokens=5, width=80) -> Results:
    x = _random(rng, (tokens, 2 * width), dtype, scale=3.0)
    out = backend.gelu_tanh_and_mul(_device(backend, x, dtype))
    return [_host(backend, out)], [ReferenceBackend().gelu_tanh_and_mul(x)]


def _router_logits(rng, dtype, tokens: int, experts: int) -> np.ndarray:
    """Logits whose values differ by at least 0.25 within a row (exact in every dtype), so that
    rounding in the kernel's softmax cannot reorder experts."""
    rows = [rng.permutation(experts) * 0.25 - experts * 0.125 for _ in range(tokens)]
    return from_storage(to_storage(np.array(rows, dtype=np.float32), dtype))


def case_moe_route(backend, dtype, rng, tokens=7, experts=40, top_k=4, renormalize=True) -> Results:
    logits = _router_logits(rng, dtype, tokens, experts)
    weights, ids = backend.moe_route(_device(backend, logits, dtype), top_k, renormalize)
    ref_weights, ref_ids = ReferenceBackend().moe_route(logits, top_k, renormalize)
    got = [backend.to_numpy(weights), backend.to_numpy(ids).astype(np.float32)]
    return got, [ref_weights, ref_ids.astype(np.float32)]


def case_moe_experts(
    backend, dtype, rng, tokens=21, experts=6, top_k=2, hidden=48, width=40
) -> Results:
    """Uneven routing: expert e is drawn with probability ~ 2^-e, the last one never, so tiles
    are full, partial and absent; each token's experts are distinct."""
    x = _random(rng, (tokens, hidden), dtype)
    gate_up = _random(rng, (experts, 2 * width, hidden), dtype, scale=hidden**-0.5)
    down = _random(rng, (experts, hidden, width), dtype, scale=width**-0.5)
    odds = 2.0 ** -np.arange(experts - 1)
    ids = np.array(
        [rng.choice(experts - 1, top_k, replace=False, p=odds / odds.sum()) for _ in range(tokens)],
        dtype=np.int32,
    )
    weights = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    ref = ReferenceBackend().moe_experts(x, gate_up, down, weights, ids)
    dev = [_device(backend, a, dtype) for a in (x, gate_up, down)]
    out = backend.moe_experts(*dev, backend.asarray(weights), backend.asarray(ids))
    return [_host(backend, out)], [ref]


def case_write_kv(
    backend, dtype, rng, tokens=6, kv_heads=2, head_dim=32, block_size=4, num_blocks=5
) -> Results:
    qkv = _qkv(rng, dtype, tokens, kv_heads, kv_heads, head_dim)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [_random(rng, shape, dtype), _random(rng, shape, dtype)]
    slots = rng.permutation(num_blocks * block_size)[:tokens].astype(np.int64)
    _, k_ref, v_ref = _views(qkv, kv_heads, kv_heads, head_dim)
    _, k_dev, v_dev = _views(_device(backend, qkv, dtype), kv_heads, kv_heads, head_dim)
    dev_caches = [_device(backend, c, dtype) for c in caches]
    backend.write_kv(k_dev, v_dev, *dev_caches, backend.asarray(slots))
    ReferenceBackend().write_kv(k_ref, v_ref, *caches, slots)
    return [_host(backend, c) for c in dev_caches], caches


def case_apply_token_bitmask(
    backend, dtype, rng, logits_rows=6, vocab=1000, rows=(4, 0, 2), extra_words=0
) -> Results:
    """Masks for some rows of a batch (constrained and free rows share it). Which entries are
    -inf and the values of the others are compared apart: -inf is no number to subtract."""
    from nanovllm.structured.bitmask import apply_token_bitmask

    logits = _random(rng, (logits_rows, vocab), dtype)
    words = -(-vocab // 32) + extra_words  # fewer: the tokens past the mask are forbidden
    bitmask = rng.integers(-(2**31), 2**31, (len(rows), words), dtype=np.int64).astype(np.int32)
    bitmask[0, : words // 2] = -1  # long runs of allowed tokens too
    index = np.asarray(rows, dtype=np.int32)
    ref = apply_token_bitmask(logits.copy(), bitmask, index)
    out = backend.apply_token_bitmask(_device(backend, logits, dtype), bitmask, index)
    return _split_infinite(_host(backend, out)), _split_infinite(ref)


def _split_infinite(x: np.ndarray) -> list[np.ndarray]:
    masked = np.isneginf(x)
    return [masked.astype(np.float32), np.where(masked, 0.0, x).astype(np.float32)]


def attention_metadata(
    rng, seqs: Sequence[tuple[int, int]], block_size: int, to_device: Callable
) -> tuple[AttentionMetadata, int]:
    """Metadata for sequences given as (query_len, context_len), their blocks scattered over
    the cache in random order. Returns it and the number of cache blocks needed."""
    needed = [-(-context // block_size) for _, context in seqs]
    num_blocks = sum(needed) + 1  # one block no sequence owns
    ids = iter(rng.permutation(num_blocks).astype(np.int32))
    tables = np.zeros((len(seqs), max(needed)), dtype=np.int32)
    for row, count in enumerate(needed):
        tables[row, :count] = [next(ids) for _ in range(count)]
    query_start = np.concatenate(([0], np.cumsum([q for q, _ in seqs]))).astype(np.int32)
    context_lens = np.array([c for _, c in seqs], dtype=np.int32)
    slots = np.concatenate(
        [
            slots_of(table, np.arange(c - q, c), block_size)
            for table, (q, c) in zip(tables, seqs, strict=True)
        ]
    )
    host = AttentionInputs.from_lists(slots, tables, query_start, context_lens)
    return AttentionMetadata.build(host, block_size, host.map(to_device)), num_blocks


def case_paged_attention(
    backend,
    dtype,
    rng,
    seqs: Sequence[tuple[int, int]] = ((4, 9), (1, 7), (3, 3)),
    heads=4,
    kv_heads=2,
    head_dim=32,
    block_size=4,
    window=0,
    soft_cap=0.0,
) -> Results:
    """Sequences as (query_len, context_len): prefill, chunked prefill, decode, verification;
    optionally a sliding window and soft-capped scores (Gemma)."""
    meta, num_blocks = attention_metadata(rng, seqs, block_size, backend.asarray)
    tokens = int(meta.query_start_host[-1])
    shape = (num_blocks, block_size, kv_heads, head_dim)
    # Queries scaled up so the online softmax has to rescale as larger scores turn up.
    q = _random(rng, (tokens, heads, head_dim), dtype, scale=2.0)
    k_cache, v_cache = _random(rng, shape, dtype), _random(rng, shape, dtype)
    scale = 1.0 / np.sqrt(head_dim)
    # The reference reads only the host copies of the metadata.
    ref = ReferenceBackend().paged_attention(q, k_cache, v_cache, meta, scale, window, soft_cap)
    out = backend.paged_attention(
        _device(backend, q, dtype),
        _device(backend, k_cache, dtype),
        _device(backend, v_cache, dtype),
        meta,
        scale,
        window,
        soft_cap,
    )
    return [_host(backend, out)], [ref]


def compare(got: list[np.ndarray], want: list[np.ndarray], dtype: str) -> tuple[bool, float]:
    """All arrays within the dtype's tolerance; also the worst error relative to the tolerance."""
    atol, rtol = TOLERANCES[dtype]
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return False, float("inf")
        excess = np.abs(g - w) / (atol + rtol * np.abs(w))
        worst = max(worst, float(np.nan_to_num(excess, nan=np.inf).max(initial=0.0)))
    return worst <= 1.0, worst


def kernel_checks(
    backend: CUDABackend,
    dtypes: Sequence[str] = DTYPES,
    head_dims: Sequence[int] = ATTENTION_HEAD_DIMS,
    seed: int = 0,
) -> list[CheckResult]:
    """Every kernel entry point for the given dtypes and head dims, against the NumPy reference."""
    cases: list[tuple[str, Callable[..., Results], dict]] = [
        ("rms_norm", case_rms_norm, {}),
        ("add_rms_norm", case_rms_norm, {"residual": True}),
        ("rms_norm per head", case_head_norm, {}),
        ("rotary", case_rotary, {}),
        ("silu_and_mul", case_silu_and_mul, {}),
        ("gelu_tanh_and_mul", case_gelu_tanh_and_mul, {}),
        ("write_kv", case_write_kv, {}),
        ("moe_route", case_moe_route, {}),
        ("moe_experts", case_moe_experts, {}),
        ("apply_token_bitmask", case_apply_token_bitmask, {}),
    ]
    windowed = {"head_dim": head_dims[0], "block_size": 16, "seqs": ((5, 40), (1, 150), (2, 2))}
    windowed |= {"window": 37, "soft_cap": 2.0}
    cases.append((f"paged_attention window d{head_dims[0]}", case_paged_attention, windowed))
    for head_dim in head_dims:
        kwargs = {"head_dim": head_dim, "block_size": 16, "seqs": ((5, 40), (1, 150), (2, 2))}
        cases.append((f"paged_attention d{head_dim}", case_paged_attention, kwargs))
    checks = [
        (f"{name} {dtype}", dtype, lambda rng, c=case, d=dtype, k=kwargs: c(backend, d, rng, **k))
        for dtype in dtypes
        for name, case, kwargs in cases
    ]
    return run_checks(checks, seed)


def run_checks(checks: Sequence[tuple[str, str, Callable]], seed: int = 0) -> list[CheckResult]:
    """Run (name, dtype, case) checks, case(rng) -> Results, each on a fresh generator and
    within the dtype's tolerance. A case that raises is a failed check, not a crash."""
    results = []
    for name, dtype, case in checks:
        rng = np.random.default_rng(seed)
        try:
            ok, worst = compare(*case(rng), dtype)
            detail = f"max error {worst:.2f} x tolerance"
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(CheckResult(name, ok, detail))
    return results
