"""Array routines over a batch of distributions [B, V], for the sampler: partial sorts and the
two-level running-sum search behind inverse-CDF draws and top_p cutoffs. `xp` is the array
module (NumPy, or CuPy on a GPU).
"""

from __future__ import annotations

# Width of the blocks in the two-level running-sum search (see search_cdf).
BLOCK = 256


def largest_sorted(xp, x, n: int):
    """Each row's n largest values, largest first."""
    if n < x.shape[1]:
        x = xp.partition(x, x.shape[1] - n, axis=1)[:, x.shape[1] - n :]
    # Contiguous, because the passes that follow are ~3x slower over a reversed view.
    return xp.ascontiguousarray(xp.sort(x, axis=1)[:, ::-1])


def largest_ids(xp, x, n: int):
    """Each row's n largest ids, largest value first."""
    if n == 0:
        return xp.zeros((len(x), 0), dtype=xp.int64)
    ids = xp.argpartition(x, x.shape[1] - n, axis=1)[:, x.shape[1] - n :]
    order = xp.argsort(-xp.take_along_axis(x, ids, axis=1), axis=1, kind="stable")
    return xp.take_along_axis(ids, order, axis=1)


def search_cdf(xp, weights, fraction, strict: bool, total=None):
    """Per row, the first index where the running sum of weights passes fraction * total.

    total defaults to the row's own sum. strict: the running sum must exceed the target
    (inverse-CDF sampling; a zero-weight index is never chosen); otherwise reaching it is enough
    (the top_p cutoff). Two levels, block sums and then a running sum inside the one block holding
    the answer, because a full-width cumsum is the slowest pass over a [B, V] array (~8x a sum).
    """
    rows, width = weights.shape
    cum = xp.cumsum(_block_sums(xp, weights), axis=1)
    target = fraction * (cum[:, -1] if total is None else total)
    block = xp.minimum(_count_before(cum, target, strict), cum.shape[1] - 1)
    start = xp.where(block > 0, cum[xp.arange(rows), block - 1], 0.0)
    cols = block[:, None] * BLOCK + xp.arange(BLOCK)
    inside = xp.take_along_axis(weights, xp.minimum(cols, width - 1), axis=1) * (cols < width)
    running = start[:, None] + xp.cumsum(inside, axis=1, dtype=xp.float64)
    offset = _count_before(running, target, strict)
    # Rounding between the two levels can put the target past the block's end: take the block's
    # last nonzero weight then, never a zero-weight index.
    last = BLOCK - 1 - xp.argmax(inside[:, ::-1] > 0, axis=1)
    return xp.minimum(block * BLOCK + xp.minimum(offset, last), width - 1)


def _block_sums(xp, weights):
    rows, width = weights.shape
    full = width // BLOCK * BLOCK
    blocks = weights[:, :full].reshape(rows, full // BLOCK, BLOCK)
    sums = [blocks.sum(axis=2, dtype=xp.float64)]
    if full < width:
        sums.append(weights[:, full:].sum(axis=1, keepdims=True, dtype=xp.float64))
    return xp.concatenate(sums, axis=1)


def _count_before(cum, target, strict: bool):
    """How many running sums come before the one that passes target (> if strict, else >=)."""
    target = target[:, None]
    return ((cum <= target) if strict else (cum < target)).sum(axis=1)
