"""Token bitmasks: which tokens a row of logits may take, one bit per token (llguidance's layout).

A mask row is int32 [ceil(vocab / 32)]: bit b of word w allows token 32 * w + b. Every
constraint (grammar, allowed_token_ids, bad_words) writes rows in this layout, constraints on one
sequence combine by AND, and one op applies a batch of rows to the logits: `apply_token_bitmask`
below on the CPU, kernels/token_bitmask.cu on a GPU. Everything here is NumPy only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ALL_ALLOWED = np.int32(-1)  # every bit set


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def allocate_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """[rows, words] int32, every token allowed."""
    return np.full((rows, bitmask_words(vocab_size)), ALL_ALLOWED, dtype=np.int32)


def bitmask_from_token_ids(token_ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """One row allowing exactly `token_ids`."""
    bits = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
    bits[np.fromiter(token_ids, dtype=np.int64)] = True
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Boolean [..., vocab_size]: which tokens each row allows."""
    as_bytes = np.ascontiguousarray(bitmask, dtype="<i4").view(np.uint8)
    # unpackbits gives 0/1 bytes, which are valid booleans: a view, no copy.
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :vocab_size].view(bool)


def clear_tokens(row: np.ndarray, token_ids: Iterable[int]) -> None:
    """Forbid `token_ids` in one mask row, in place."""
    ids = np.fromiter(token_ids, dtype=np.int64)
    if len(ids):
        words, bits = np.divmod(ids, 32)
        # One token per call to np.bitwise_and.at's unbuffered update: ids may share a word.
        view = row.view(np.uint32)
        np.bitwise_and.at(view, words, ~(np.uint32(1) << bits.astype(np.uint32)))


def apply_token_bitmask(
    logits: np.ndarray, bitmask: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Set the logits of forbidden tokens to -inf, in place; returns `logits`.

    logits: [num_rows, vocab] float. bitmask: [num_masks, words] int32. rows: [num_masks], the
    logits row each mask row applies to (default: mask row i to logits row i); rows without a
    mask are left alone. Tokens past the mask's 32 * words are forbidden.
    """
    if rows is None:
        rows = range(len(bitmask))
    covered = min(logits.shape[1], bitmask.shape[1] * 32)
    for mask, row in zip(bitmask, rows, strict=True):
        _mask_row(logits[int(row)], allowed_tokens(mask, covered))
    return logits


def _mask_row(row: np.ndarray, allowed: np.ndarray) -> None:
    # Grammar masks allow either a few tokens (JSON punctuation) or nearly all (inside a
    # string): touch only the smaller side. ~0.1-0.2 ms for a 152k-token row.
    covered = len(allowed)
    count = np.count_nonzero(allowed)
    if 2 * count < covered:
        keep = np.flatnonzero(allowed)
        values = row[keep]
        row.fill(-np.inf)
        row[keep] = values
    else:
        row[np.flatnonzero(~allowed)] = -np.inf
        row[covered:] = -np.inf
