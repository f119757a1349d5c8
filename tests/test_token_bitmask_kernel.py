"""kernels/token_bitmask.cu matches the NumPy reference (nanovllm/structured/bitmask.py) on the CUDA
emulator, through CUDABackend.apply_token_bitmask, in float32, float16 and bfloat16, under the
emulator's three thread schedules and under AddressSanitizer. (tests/test_nvrtc.py compiles it
for sm_80 and sm_90 with the other kernel files.)"""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm.backends.cpu_reference import ReferenceBackend
from nanovllm.backends.kernel_cases import DTYPES, case_apply_token_bitmask, compare
from nanovllm.structured.bitmask import (
    allocate_bitmask,
    allowed_tokens,
    apply_token_bitmask,
    bitmask_from_token_ids,
    clear_tokens,
)

SCHEDULES = ("forward", "reverse", "random")
CASES = {
    "three_of_six_rows": dict(),
    # A vocabulary that is no multiple of 32 or of the block, masks wider than needed.
    "vocab_1001_wide_masks": dict(vocab=1001, logits_rows=3, rows=(2, 1), extra_words=2),
    # Masks narrower than the vocabulary: the tokens past them are forbidden.
    "short_masks": dict(vocab=700, logits_rows=2, rows=(1,), extra_words=-3),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(emulated, case, dtype, schedule) -> None:
    results = case_apply_token_bitmask(
        emulated(schedule), dtype, np.random.default_rng(7), **CASES[case]
    )
    ok, worst = compare(*results, dtype)
    assert ok, f"max error {worst:.2f} x the {dtype} tolerance"


@pytest.mark.parametrize("case", ["three_of_six_rows", "short_masks"])
def test_kernel_under_asan(emulated, case) -> None:
    results = case_apply_token_bitmask(
        emulated("asan"), "bfloat16", np.random.default_rng(8), **CASES[case]
    )
    assert compare(*results, "bfloat16")[0]


def test_kernel_writes_through_a_row_strided_view(emulated) -> None:
    """Logits rows sliced out of a wider buffer: the kernel must honour the row stride."""
    buffer = np.random.default_rng(9).standard_normal((3, 80)).astype(np.float32)
    view = buffer[:, :64]
    mask = bitmask_from_token_ids([1, 40], 64)[None]
    emulated("forward").apply_token_bitmask(view, mask, np.array([1], dtype=np.int32))
    assert np.isneginf(buffer[1, :64]).sum() == 62
    assert np.isfinite(buffer[1, [1, 40]]).all() and np.isfinite(buffer[1, 64:]).all()
    assert np.isfinite(buffer[[0, 2]]).all()


def test_reference_forbids_exactly_the_cleared_bits() -> None:
    """The NumPy op against an independent per-token reading of llguidance's layout."""
    rng = np.random.default_rng(10)
    vocab = 77
    masks = rng.integers(-(2**31), 2**31, (2, 3), dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal((2, vocab)).astype(np.float32)
    out = ReferenceBackend().apply_token_bitmask(logits.copy(), masks)
    for row in range(2):
        for token in range(vocab):
            allowed = (int(masks[row, token // 32]) >> (token % 32)) & 1
            assert (
                (out[row, token] == logits[row, token]) if allowed else out[row, token] == -np.inf
            )


def test_bitmask_helpers_round_trip() -> None:
    vocab = 100
    row = bitmask_from_token_ids([0, 31, 32, 99], vocab)
    assert np.flatnonzero(allowed_tokens(row, vocab)).tolist() == [0, 31, 32, 99]
    full = allocate_bitmask(1, vocab)
    clear_tokens(full[0], [3, 35, 36, 99])
    assert sorted(set(range(vocab)) - set(np.flatnonzero(allowed_tokens(full[0], vocab)))) == [
        3,
        35,
        36,
        99,
    ]


def test_rows_without_a_mask_are_untouched() -> None:
    logits = np.zeros((4, 64), dtype=np.float32)
    apply_token_bitmask(logits, bitmask_from_token_ids([5], 64)[None], np.array([2]))
    assert np.isneginf(logits[2]).sum() == 63 and not np.isinf(logits[[0, 1, 3]]).any()
