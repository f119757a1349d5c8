"""What the compiled CPU kernels share: numba's decorators with a cache that always has a home,
bit casts numba lacks, and the thread count.

Kernels are compiled on first use and cached on disk (numba `cache=True`), next to their source
when the package directory is writable, else under nanovllm's cache directory (read-only
site-packages, containers), else in a temporary directory; `NUMBA_CACHE_DIR` wins over all.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanovllm.demo import cache_dir

# fastmath without `contract` or `reassoc`: dequantization must round exactly like the `gguf`
# package (no fused multiply-add), and serial reductions keep their order.
EXACT = {"nnan", "ninf", "nsz"}


def cache_location(package_dir: Path, writable: Callable[[Path], bool]) -> Path | None:
    """Where compiled kernels go: None for numba's own choice (next to the source), else the
    first writable of nanovllm's cache and the temporary directory."""
    if os.environ.get("NUMBA_CACHE_DIR") or writable(package_dir):
        return None
    for candidate in (cache_dir() / "numba", Path(tempfile.gettempdir()) / "nanovllm-numba"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if writable(candidate):
            return candidate
    return None


def _is_writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


_location = cache_location(Path(__file__).parent, _is_writable)
if _location is not None:
    numba.config.CACHE_DIR = str(_location)

# OpenMP workers wait for the next parallel region by spinning for a while, then sleeping. A
# decode token runs ~150 regions a few microseconds apart: workers that sleep at once (passive)
# pay a ~58 us wake-up per region (a SmolLM2 token took 33.0 ms with two threads, more than with
# one), workers that never sleep take a core from everything else on a busy machine. A bounded
# spin (~0.6 ms here) keeps them awake through a step and asleep between steps (docs/
# benchmarks.md, "Threads"). Read when numba first starts its OpenMP pool, so set here; an
# explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")


def kernel(parallel: bool = False, exact: bool = False):
    """numba.njit for a kernel: cached, fastmath (vectorized reductions) unless exact."""
    return numba.njit(cache=True, parallel=parallel, fastmath=EXACT if exact else True)


def inline(exact: bool = False):
    """numba.njit for a helper inlined into kernels (numba IR level)."""
    return numba.njit(cache=True, inline="always", fastmath=EXACT if exact else True)


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """uint16 bit pattern of an IEEE half -> float32, exactly (vcvtph2ps on x86-64)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def u32_bits_to_f32(typingctx, bits):
    """uint32 bit pattern -> float32 (bfloat16 is the top half of one)."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


# ---- threads --------------------------------------------------------------------------------
_local = threading.local()


def default_threads() -> int:
    """One per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class ThreadControl:
    """The thread count of numba's kernels and of BLAS. numba's setting is per calling thread
    (the server steps the engine from a background thread), so `apply()` runs before each op and
    costs one attribute check once set. BLAS's setting is process-wide: set once."""

    def __init__(self, num_threads: int | None) -> None:
        limit = numba.config.NUMBA_NUM_THREADS  # numba's pool size, fixed at import
        if num_threads is not None and num_threads > limit:
            warnings.warn(
                f"{num_threads} CPU threads asked for, but numba's pool has {limit} (one per "
                f"core, or NUMBA_NUM_THREADS): using {limit}",
                stacklevel=3,
            )
        self.num_threads = min(num_threads or default_threads(), limit)
        self._blas = _limit_blas(self.num_threads)

    def apply(self) -> None:
        if getattr(_local, "num_threads", None) != self.num_threads:
            numba.set_num_threads(self.num_threads)
            _local.num_threads = self.num_threads


def _limit_blas(num_threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=num_threads, user_api="blas")


def as_u16(data: np.ndarray) -> np.ndarray:
    """uint8 rows of 16-bit values -> uint16 rows (a view)."""
    return data.view(np.uint16)
