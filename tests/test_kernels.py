"""Every kernel of kernels/ matches the NumPy reference (nanovllm/backends/cpu_reference.py) on the CUDA
emulator, through the CUDA backend's own launch code, in float32, float16 and bfloat16.

Each case runs under the emulator's three thread schedules (a kernel that depends on the order
threads run in, e.g. a missing __syncthreads, fails one of them), and one shape per kernel runs
under AddressSanitizer. The op cases (inputs, reference) live in nanovllm/check.py, shared with
`nanovllm check` on a real GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_matches

from nanovllm.backends import kernel_cases
from nanovllm.backends.kernel_cases import (
    DTYPES,
    attention_metadata,
    case_gelu_tanh_and_mul,
    case_head_norm,
    case_moe_experts,
    case_moe_route,
    case_paged_attention,
    case_rms_norm,
    case_rotary,
    case_silu_and_mul,
    case_write_kv,
)
from nanovllm.backends.kernel_library import ATTENTION_HEAD_DIMS

SCHEDULES = ("forward", "reverse", "random")


# ---- paged attention -----------------------------------------------------------------------
ATTENTION_CASES = {
    # Context length 1, partial blocks, one query head per kv head.
    "decode_gqa1_partial_blocks": dict(
        seqs=((1, 1), (1, 17), (1, 40)), heads=4, kv_heads=4, head_dim=64, block_size=16
    ),
    # Prefill, decode, chunked prefill and a verification-sized chunk in one batch.
    "mixed_batch_gqa4": dict(
        seqs=((5, 5), (1, 20), (3, 30), (2, 9)), heads=8, kv_heads=2, head_dim=32, block_size=8
    ),
    "mixed_batch_gqa8_block_size_2": dict(
        seqs=((7, 7), (1, 9), (4, 6)), heads=8, kv_heads=1, head_dim=16, block_size=2
    ),
    # Past 128 keys every warp of the block takes several 32-key chunks, then they merge.
    "long_context_d128": dict(
        seqs=((1, 300), (3, 140)), heads=2, kv_heads=1, head_dim=128, block_size=16
    ),
    # Sliding window of 6 over blocks of 4 (windows start mid-block), soft-capped scores, every
    # kind of query run; contexts from shorter than the window to several blocks past it.
    "window_soft_cap_mixed_batch": dict(
        seqs=((5, 40), (1, 150), (2, 2), (7, 7), (3, 33)),
        heads=4,
        kv_heads=2,
        head_dim=32,
        block_size=4,
        window=6,
        soft_cap=2.0,
    ),
    # A window past 32 keys: the warps' chunks start at the window's chunk, not at key 0; a
    # 40-token prefill spans five query blocks whose windows start in different chunks.
    "window_70_long_prefill_d64": dict(
        seqs=((1, 300), (40, 140)), heads=2, kv_heads=1, head_dim=64, block_size=16, window=70
    ),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_paged_attention_matches_reference(emulated, case, dtype, schedule) -> None:
    rng = np.random.default_rng(1)
    results = case_paged_attention(emulated(schedule), dtype, rng, **ATTENTION_CASES[case])
    assert_matches(results, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", ATTENTION_HEAD_DIMS)
def test_paged_attention_every_head_dim(emulated, head_dim, dtype) -> None:
    rng = np.random.default_rng(2)
    seqs = ((3, 11), (1, 6))
    results = case_paged_attention(
        emulated("forward"), dtype, rng, seqs=seqs, heads=4, kv_heads=2, head_dim=head_dim
    )
    assert_matches(results, dtype)


@pytest.mark.parametrize("case", ["mixed_batch_gqa4", "window_soft_cap_mixed_batch"])
def test_paged_attention_under_asan(emulated, case) -> None:
    rng = np.random.default_rng(3)
    results = case_paged_attention(emulated("asan"), "float16", rng, **ATTENTION_CASES[case])
    assert_matches(results, "float16")


def test_sliding_window_attention_never_reads_blocks_before_the_window(emulated) -> None:
    """The block manager may free blocks wholly before every query's window: the op must not
    read their block table entries. Poisoned entries (an id far past the cache) would make the
    kernel fault under ASan and the reference raise IndexError."""
    rng = np.random.default_rng(7)
    backend = emulated("asan")
    seqs, window, block_size = ((1, 40), (3, 29)), 8, 4
    kwargs = dict(heads=2, kv_heads=1, head_dim=16, block_size=block_size, window=window)
    clean = case_paged_attention(backend, "float32", np.random.default_rng(7), seqs=seqs, **kwargs)

    def poisoned(rng, seqs, block_size, to_device):
        meta, num_blocks = attention_metadata(rng, seqs, block_size, to_device)
        tables = meta.block_tables_host
        for row, (query_len, context) in enumerate(seqs):
            first_visible = context - query_len - window + 1
            tables[row, : first_visible // block_size] = 10**6
        meta.block_tables = to_device(tables)
        return meta, num_blocks

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel_cases, "attention_metadata", poisoned)
        results = case_paged_attention(backend, "float32", rng, seqs=seqs, **kwargs)
    assert_matches(results, "float32")
    np.testing.assert_array_equal(results[1][0], clean[1][0])


# ---- norms, rotary, activation, cache write ------------------------------------------------
OP_CASES = {
    "rms_norm_h96": (case_rms_norm, dict(hidden=96)),
    "rms_norm_h1000_loops_over_the_row": (case_rms_norm, dict(hidden=1000, tokens=3)),
    "add_rms_norm_h96": (case_rms_norm, dict(hidden=96, residual=True)),
    "add_rms_norm_h16": (case_rms_norm, dict(hidden=16, residual=True)),
    "head_norm_on_qkv_view": (case_head_norm, dict(heads=4, kv_heads=2, head_dim=32)),
    "rotary_d64_gqa4": (case_rotary, dict(heads=8, kv_heads=2, head_dim=64)),
    "rotary_d16": (case_rotary, dict(heads=4, kv_heads=4, head_dim=16)),
    "silu_and_mul_w80": (case_silu_and_mul, dict(width=80)),
    "silu_and_mul_w700": (case_silu_and_mul, dict(width=700, tokens=2)),
    "gelu_tanh_and_mul_w80": (case_gelu_tanh_and_mul, dict(width=80)),
    "moe_route_40_experts_top4": (case_moe_route, dict(experts=40, top_k=4)),
    "moe_route_unnormalized_top1": (case_moe_route, dict(experts=8, top_k=1, renormalize=False)),
    # 21 tokens x 2 experts over 6 experts, one never chosen: full, partial and no tiles; widths
    # that are not multiples of the 32-column block or the 32-deep k step.
    "moe_experts_uneven_routing": (case_moe_experts, dict()),
    "moe_experts_one_token_top3": (
        case_moe_experts,
        dict(tokens=1, experts=4, top_k=3, hidden=32, width=16),
    ),
    "write_kv_views": (case_write_kv, dict(kv_heads=2, head_dim=32, block_size=4)),
    "write_kv_block_size_1": (
        case_write_kv,
        dict(kv_heads=1, head_dim=16, block_size=1, num_blocks=9),
    ),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OP_CASES)
def test_op_matches_reference(emulated, case, dtype, schedule) -> None:
    fn, kwargs = OP_CASES[case]
    assert_matches(fn(emulated(schedule), dtype, np.random.default_rng(4), **kwargs), dtype)


@pytest.mark.parametrize(
    "case",
    [
        "add_rms_norm_h96",
        "head_norm_on_qkv_view",
        "rotary_d64_gqa4",
        "silu_and_mul_w80",
        "gelu_tanh_and_mul_w80",
        "write_kv_views",
        "moe_route_40_experts_top4",
        "moe_experts_uneven_routing",
    ],
)
def test_op_under_asan(emulated, case) -> None:
    fn, kwargs = OP_CASES[case]
    assert_matches(fn(emulated("asan"), "bfloat16", np.random.default_rng(5), **kwargs), "bfloat16")


def test_write_kv_skips_negative_slots(emulated) -> None:
    backend = emulated("forward")
    k = np.ones((2, 1, 16), dtype=np.float32)
    k_cache, v_cache = np.zeros((2, 2, 1, 16), np.float32), np.zeros((2, 2, 1, 16), np.float32)
    backend.write_kv(k, 2 * k, k_cache, v_cache, np.array([3, -1], dtype=np.int64))
    assert k_cache[1, 1].tolist() == [[1.0] * 16] and v_cache[1, 1].tolist() == [[2.0] * 16]
    assert k_cache.sum() == 16 and v_cache.sum() == 32


def test_rms_norm_without_residual_returns_its_input_as_residual(emulated) -> None:
    x = np.random.default_rng(6).standard_normal((2, 32)).astype(np.float32)
    _, residual = emulated("forward").rms_norm(x, np.ones(32, np.float32), 1e-6)
    assert residual is x
