"""The tensor-parallel collectives through NCCL, with CuPy's bindings (`cupy.cuda.nccl`).

One process per GPU, one `NcclCommunicator` per process. What NCCL requires, and what this
glue does about it (cupy_backends/cuda/libs/nccl.pyx takes raw pointers, counts and enums):

- The group is created collectively: rank 0's `get_unique_id()` (a tuple of 128 signed bytes)
  travels to every rank, and all ranks construct their communicator at the same time
  (`ncclCommInitRank` blocks until the whole group has joined).
- Buffers are contiguous device memory; `count` is in elements of `datatype`, which must match
  the array's dtype. all-reduce: `count` elements in and out. all-gather: `count` elements in per
  rank, `world_size * count` out, rank-major.
- Collectives are enqueued on a stream and return at once. They go on the current CuPy stream,
  where the model's kernels produced their input and will read their output, so no extra
  synchronization is needed (CuPy's memory pool only reuses a freed buffer on the same stream).
- Every rank issues the same collectives in the same order with the same counts and dtypes;
  anything else hangs or corrupts. The sharded model guarantees it by construction.

The NCCL module, how an array's address is read and which stream is current are parameters,
so tests run this glue against a stand-in that enforces the rules above (tests/test_nccl.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Array = Any


def nccl_module() -> Any:
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy cannot load NCCL (libnccl.so.2); install nvidia-nccl-cu12")
    return nccl


def new_unique_id(nccl: Any = None) -> tuple[int, ...]:
    """The id rank 0 creates and every rank passes to its communicator."""
    return tuple((nccl or nccl_module()).get_unique_id())


def device_address(x: Array) -> int:
    """The address of an array's first element (a NumPy array's on the emulated device)."""
    data = x.data
    return data.ptr if hasattr(data, "ptr") else x.ctypes.data


def current_stream() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr


class NcclCommunicator:
    def __init__(
        self,
        unique_id: tuple[int, ...],
        rank: int,
        world_size: int,
        xp: Any,
        nccl: Any = None,
        address: Callable[[Array], int] = device_address,
        stream: Callable[[], int] = current_stream,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.xp = xp
        self.nccl = nccl or nccl_module()
        self._address = address
        self._stream = stream
        self.comm = self.nccl.NcclCommunicator(world_size, tuple(unique_id), rank)

    def all_reduce(self, x: Array) -> Array:
        x = self.xp.ascontiguousarray(x)
        out = self.xp.empty_like(x)
        datatype = self._datatype(x)
        self.comm.allReduce(
            self._address(x), self._address(out), x.size, datatype, self.nccl.NCCL_SUM, self._stream()
        )  # fmt: skip
        return out

    def all_gather(self, x: Array) -> Array:
        x = self.xp.ascontiguousarray(x)
        out = self.xp.empty((self.world_size, *x.shape), dtype=x.dtype)
        datatype = self._datatype(x)
        self.comm.allGather(self._address(x), self._address(out), x.size, datatype, self._stream())
        # [ranks, ..., n] rank-major -> [..., ranks * n]: each rank's slice in rank order.
        joined = self.xp.moveaxis(out, 0, -2)
        return self.xp.ascontiguousarray(joined).reshape(*x.shape[:-1], self.world_size * x.shape[-1])  # fmt: skip

    def destroy(self) -> None:
        self.comm.destroy()

    def _datatype(self, x: Array) -> int:
        name = _DATATYPES.get(np.dtype(x.dtype))
        if name is None:
            raise TypeError(f"NCCL collectives here take float16 or float32 arrays, not {x.dtype}")
        return getattr(self.nccl, name)


_DATATYPES = {np.dtype(np.float16): "NCCL_FLOAT16", np.dtype(np.float32): "NCCL_FLOAT32"}
