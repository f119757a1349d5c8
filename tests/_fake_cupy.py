"""A stand-in for CuPy on the emulated CUDA device: arrays, streams, CUDA-graph capture and replay,
memory pools and device memory, enforcing the rules CuPy 14.2.0 and the CUDA runtime apply.

The CUDA backend runs unchanged on it (`FakeCuPy().attach(backend)` makes it the backend's `xp`
and routes kernel launches through it), so GPU-only glue — `CapturedGraphs`, the decode graphs'
uploads, memory sizing — runs in tests without a GPU. Each rule below is read from CuPy 14.2.0's
source (file named) or the CUDA runtime's documented behaviour:

- cuBLAS refuses capture (cupy_backends/cuda/libs/cublas.pyx, `setStream`): a matmul, dot,
  tensordot or einsum while the current stream captures raises NotImplementedError('calling
  cuBLAS API during stream capture is currently unsupported').
- No host transfers while capturing (cupy/cuda/memory.pyx, `copy_from_host_async`,
  `copy_to_host_async`, ...): uploading a NumPy array (`asarray`, `set`, a NumPy index or
  value) raises RuntimeError('the current stream is capturing, so H2D transfers are
  disallowed'); reading one back (`get`, `item`, `bool`, `int`, `float`) raises the D2H one.
- Synchronizing a capturing stream, or the device while any stream captures, fails
  (cudaErrorStreamCaptureUnsupported) and invalidates the capture: `end_capture` then fails.
- `begin_capture` refuses the legacy default stream (cupy/cuda/stream.pyx).
- NumPy arrays are no operands of device work (cupy/_core/_scalar.pyx, `CScalar`): TypeError
  'Unsupported type <class 'numpy.ndarray'>' for a ufunc, a CuPy function or a kernel argument;
  `device[...] = numpy_array` raises ValueError('non-scalar numpy.ndarray cannot be used for
  fill') (cupy/_core/_routines_indexing.pyx, `_scatter_op`).
- Capture records, it does not run: work issued on a capturing stream (kernel launches, CuPy
  elementwise ops, reductions, copies) runs only when the graph is launched, with the arrays
  (addresses) and scalars fixed at capture. Arrays allocated while capturing start as poison
  (NaN, -1), so a replay that misses a step, or a value read before replay, shows.
- Memory: arrays come from a memory pool (CuPy's default pool, or the allocator installed by
  `cuda.using_allocator`) that keeps freed blocks cached; `memGetInfo` reports the device's
  free bytes net of every pool's blocks and of other processes. While a stream captures, an
  allocation must come from an installed pool: CuPy would silently hand out the shared pool's
  memory, which eager work after the capture then reuses under the graph's feet.

Not modelled: pinned host memory, multiple devices, events' timing, the exact block sizes of
CuPy's pool (bytes are pooled, rounded to 512), and `numpy.asarray(device_array)` (CuPy
raises; a NumPy subclass cannot refuse it).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

CUBLAS_FUNCTIONS = {np.dot, np.vdot, np.inner, np.tensordot, np.einsum, np.matmul}
_ROUND = 512  # CuPy's pool rounds every allocation up to 512 bytes


class CUDARuntimeError(RuntimeError):
    pass


def _capture_refused(what: str) -> RuntimeError:
    return RuntimeError(f"the current stream is capturing, so {what} are disallowed")


class DeviceArray(np.ndarray):
    """A device array: NumPy memory standing for device memory, whose every operation goes
    through its FakeCuPy (checked, and recorded while a stream captures)."""

    fake: FakeCuPy  # the active stand-in (one at a time, set by FakeCuPy())
    _alloc: Allocation | None = None  # the device allocation this array (or view) keeps alive
    _root: np.ndarray | None = None  # the NumPy memory behind that allocation

    def __array_finalize__(self, obj) -> None:
        self._alloc = getattr(obj, "_alloc", None)
        self._root = getattr(obj, "_root", None)

    # ---- operations ----------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            self.fake.cublas()
        return self.fake.op(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        if func in CUBLAS_FUNCTIONS:
            self.fake.cublas()
        return self.fake.op(func, args, kwargs)

    def __getitem__(self, key):
        key = self.fake.index(key)
        if _basic(key):  # a view, as in CuPy (a 0-d view rather than a scalar)
            return np.ndarray.__getitem__(self, _with_ellipsis(key))
        return self.fake.op(lambda a, k: a[k], (self, key), {})

    def __setitem__(self, key, value):
        key = self.fake.index(key)
        if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
            if _basic(key) and value.ndim:
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = self.fake.upload(value)
        self.fake.op(_setitem, (self, key, value), {}, writes=True)

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self.fake.op(lambda a: a.astype(dtype, order=order), (self,), {})

    def copy(self, order="C"):
        return self.fake.op(lambda a: a.copy(order=order), (self,), {})

    def reshape(self, *shape, order="C"):
        return self.fake.op(lambda a: a.reshape(*shape, order=order), (self,), {})

    def ravel(self, order="C"):
        return self.fake.op(lambda a: a.ravel(order=order), (self,), {})

    def argmax(self, axis=None, out=None, keepdims=False):
        return self.fake.op(lambda a: a.argmax(axis=axis, keepdims=keepdims), (self,), {})

    def argmin(self, axis=None, out=None, keepdims=False):
        return self.fake.op(lambda a: a.argmin(axis=axis, keepdims=keepdims), (self,), {})

    def take(self, indices, axis=None, out=None, mode="raise"):
        return self.fake.op(lambda a, i: a.take(i, axis=axis), (self, indices), {})

    def fill(self, value):
        self.fake.op(lambda a: a.fill(value), (self,), {}, writes=True)

    def sort(self, axis=-1, kind=None, order=None):
        self.fake.op(lambda a: a.sort(axis=axis), (self,), {}, writes=True)

    def argsort(self, axis=-1, kind=None, order=None):
        return self.fake.op(lambda a: a.argsort(axis=axis), (self,), {})

    # ---- transfers ---------------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        self.fake.download()
        return np.array(_raw(self))

    def set(self, arr: np.ndarray, stream=None) -> None:
        self.fake.host_to_device()
        np.copyto(_raw(self), arr)

    def item(self, *args):
        return self.get().item(*args)

    def tolist(self):
        return self.get().tolist()

    def __bool__(self) -> bool:
        return bool(self.get())

    def __int__(self) -> int:
        return int(self.get())

    def __float__(self) -> float:
        return float(self.get())

    def __index__(self) -> int:
        return int(self.get())


class Allocation:
    """One block taken from a pool; it goes back to the pool when the last array using it dies
    (what recorded work holds is the memory, not the allocation, as in a CUDA graph)."""

    def __init__(self, pool: MemoryPool, size: int) -> None:
        pool.take(size)
        weakref.finalize(self, pool.give_back, size)


def _raw(x: Any) -> Any:
    """DeviceArrays (also inside lists, tuples and dicts) as plain ndarray views of their memory
    that do not keep their allocation alive."""
    if isinstance(x, DeviceArray):
        root = x._root
        if root is None:
            return x.view(np.ndarray)
        offset = x.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return np.ndarray(x.shape, x.dtype, buffer=root, offset=offset, strides=x.strides)
    if isinstance(x, list | tuple):
        return type(x)(_raw(v) for v in x)
    if isinstance(x, dict):
        return {k: _raw(v) for k, v in x.items()}
    return x


def _host_arrays(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return not isinstance(x, DeviceArray)
    if isinstance(x, list | tuple):
        return any(_host_arrays(v) for v in x)
    if isinstance(x, dict):
        return any(_host_arrays(v) for v in x.values())
    return False


def _basic(key: Any) -> bool:
    parts = key if isinstance(key, tuple) else (key,)
    return all(
        isinstance(p, int | np.integer | slice | types.EllipsisType) or p is None for p in parts
    )


def _with_ellipsis(key: Any) -> tuple:
    parts = key if isinstance(key, tuple) else (key,)
    return parts if any(p is Ellipsis for p in parts) else (*parts, Ellipsis)


def _poison(a: np.ndarray) -> None:
    """Fill with what all-ones bytes mean: NaN for floats, -1 for integers."""
    a[...] = np.nan if a.dtype.kind in "fc" else True if a.dtype.kind == "b" else -1


def _setitem(a: np.ndarray, key: Any, value: Any) -> None:
    a[key] = value


def _owner(result: np.ndarray, args: Any) -> DeviceArray | None:
    """The device array among args whose memory result is a view of, if any."""
    for arg in _flat(args):
        if isinstance(arg, DeviceArray) and np.may_share_memory(result, _raw(arg)):
            return arg
    return None


def _flat(x: Any) -> list:
    if isinstance(x, list | tuple):
        return [v for item in x for v in _flat(item)]
    if isinstance(x, dict):
        return _flat(list(x.values()))
    return [x]


class MemoryPool:
    """CuPy's MemoryPool: blocks stay cached after their arrays die, until free_all_blocks."""

    def __init__(self, fake: FakeCuPy | None = None) -> None:
        self.fake = fake or DeviceArray.fake
        self.used = 0
        self.cached = 0
        self.fake.pools.append(self)

    def malloc(self, size: int) -> None:
        raise NotImplementedError("the stand-in allocates through FakeCuPy.allocate")

    def take(self, size: int) -> None:
        reuse = min(size, self.cached)
        self.cached -= reuse
        self.used += size
        self.fake.device_grew(size - reuse)

    def give_back(self, size: int) -> None:
        self.used -= size
        self.cached += size

    def used_bytes(self) -> int:
        return self.used

    def free_bytes(self) -> int:
        return self.cached

    def total_bytes(self) -> int:
        return self.used + self.cached

    def free_all_blocks(self, stream=None) -> None:
        self.cached = 0


class Graph:
    """A captured CUDA graph: launching it runs the recorded work, in order, as it was issued."""

    def __init__(self, work: list[Callable[[], None]]) -> None:
        self.work = work

    def launch(self, stream=None) -> None:
        fake = DeviceArray.fake
        if fake.capturing() is not None:
            fake.capturing().recording.append(self.launch)  # a graph inside a capture
            return
        fake.graph_launches += 1
        with np.errstate(all="ignore"):
            for step in self.work:
                step()


class Event:
    def synchronize(self) -> None:
        pass


class Stream:
    def __init__(self, non_blocking: bool = False, null: bool = False) -> None:
        self.fake = DeviceArray.fake
        self.null = null
        self.recording: list[Callable[[], None]] | None = None
        self.invalidated = False
        self._previous: list[Stream] = []

    def __enter__(self) -> Stream:
        self._previous.append(self.fake.current)
        self.fake.current = self
        return self

    def __exit__(self, *exc) -> None:
        self.fake.current = self._previous.pop()

    def begin_capture(self, mode=None) -> None:
        if self.null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self.recording is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        self.recording, self.invalidated = [], False

    def end_capture(self) -> Graph:
        if self.recording is None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        work, self.recording = self.recording, None
        if self.invalidated:
            self.invalidated = False
            raise CUDARuntimeError(
                "cudaErrorStreamCaptureInvalidated: capture was invalidated by an earlier error"
            )
        return Graph(work)

    def is_capturing(self) -> bool:
        if self.invalidated:
            raise RuntimeError(
                "the stream was capturing, but an error has invalidated the capture sequence"
            )
        return self.recording is not None

    def synchronize(self) -> None:
        if self.recording is not None:
            self.invalidated = True
            raise CUDARuntimeError(
                "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is "
                "capturing"
            )

    def record(self, event=None) -> Event:
        return Event()


class FakeCuPy:
    """The module: `xp` of a CUDABackend; `cuda` holds streams, pools, graphs and the runtime.

    total_bytes and other_bytes describe the device: its memory and what other processes use.
    peak_bytes is the most device memory this process's pools ever held plus other_bytes.
    """

    def __init__(self, total_bytes: int = 1 << 40, other_bytes: int = 0) -> None:
        DeviceArray.fake = self
        self.total_bytes = total_bytes
        self.other_bytes = other_bytes
        self.pools: list[MemoryPool] = []
        self.default_pool = MemoryPool(self)
        self.allocator: Callable | None = None  # None: the default pool
        self.null_stream = Stream(null=True)
        self.current = self.null_stream
        self.streams: list[Stream] = []
        self.peak_bytes = other_bytes
        self.graph_launches = 0
        self.kernel_launches = 0
        self.ndarray = DeviceArray
        self.lib = types.SimpleNamespace(
            stride_tricks=types.SimpleNamespace(as_strided=self.as_strided)
        )
        self.cuda = types.SimpleNamespace(
            Stream=self._stream,
            MemoryPool=MemoryPool,
            Event=Event,
            using_allocator=self.using_allocator,
            get_current_stream=lambda: self.current,
            is_available=lambda: True,
            runtime=types.SimpleNamespace(
                deviceSynchronize=self.device_synchronize, memGetInfo=self.mem_get_info
            ),
        )

    # ---- wiring -------------------------------------------------------------------------------
    def attach(self, backend):
        """Make this the backend's array module and route its kernel launches through it;
        returns the backend."""
        backend.xp = self
        library, function = backend.kernels, backend.kernels.function

        def recorded(family: str, name: str):
            fn = function(family, name)
            return lambda grid, block, args, shared_mem=0: self.launch(
                fn, grid, block, args, shared_mem
            )

        library.function = recorded
        return backend

    def __getattr__(self, name: str) -> Any:
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes (float32, int64, ...), constants
        return lambda *args, **kwargs: self.call(value, args, kwargs)

    # ---- streams and capture ------------------------------------------------------------------
    def _stream(self, non_blocking: bool = False) -> Stream:
        stream = Stream(non_blocking)
        self.streams.append(stream)
        return stream

    def capturing(self) -> Stream | None:
        """The current stream if it is capturing (work issued now is recorded, not run)."""
        return self.current if self.current.recording is not None else None

    @contextlib.contextmanager
    def using_allocator(self, allocator: Callable | None = None):
        previous, self.allocator = self.allocator, allocator
        try:
            yield
        finally:
            self.allocator = previous

    def device_synchronize(self) -> None:
        for stream in self.streams:
            if stream.recording is not None:
                stream.invalidated = True
                raise CUDARuntimeError(
                    "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is "
                    "capturing"
                )

    def get_default_memory_pool(self) -> MemoryPool:
        return self.default_pool

    def cublas(self) -> None:
        if self.capturing() is not None:
            raise NotImplementedError(
                "calling cuBLAS API during stream capture is currently unsupported"
            )

    def host_to_device(self) -> None:
        if self.capturing() is not None:
            raise _capture_refused("H2D transfers")

    def upload(self, host: np.ndarray) -> DeviceArray:
        self.host_to_device()
        return self.adopt(np.array(host))

    def download(self) -> None:
        if self.capturing() is not None:
            raise _capture_refused("D2H transfers")

    def index(self, key: Any) -> Any:
        """An index as CuPy takes it: NumPy arrays in it are uploaded."""
        if isinstance(key, tuple):
            return tuple(self.index(k) for k in key)
        if isinstance(key, np.ndarray) and not isinstance(key, DeviceArray):
            return self.upload(key)
        return key

    # ---- memory -------------------------------------------------------------------------------
    def pool(self) -> MemoryPool:
        if self.allocator is None:
            if self.capturing() is not None:
                raise RuntimeError(
                    "allocation from CuPy's shared memory pool during graph capture: eager work "
                    "after the capture would reuse memory the graph writes (use_allocator a "
                    "private pool)"
                )
            return self.default_pool
        owner = getattr(self.allocator, "__self__", None)
        if not isinstance(owner, MemoryPool):
            raise RuntimeError(f"unknown allocator {self.allocator!r}")
        return owner

    def adopt(self, raw: np.ndarray) -> DeviceArray:
        """A new device array over `raw` (C-contiguous), counted in the current pool until it
        and every view of it die."""
        size = -(-max(raw.nbytes, 1) // _ROUND) * _ROUND
        alloc = Allocation(self.pool(), size)
        if self.capturing() is not None:
            _poison(raw)  # capture runs nothing: what it seems to compute is garbage
        array = raw.view(DeviceArray)
        array._alloc, array._root = alloc, raw
        return array

    def device_grew(self, size: int) -> None:
        held = self.other_bytes + sum(p.total_bytes() for p in self.pools)
        if held > self.total_bytes:
            raise MemoryError(f"out of device memory: {held} of {self.total_bytes} bytes")
        self.peak_bytes = max(self.peak_bytes, held)

    def mem_get_info(self) -> tuple[int, int]:
        held = self.other_bytes + sum(p.total_bytes() for p in self.pools)
        return self.total_bytes - held, self.total_bytes

    # ---- work -----------------------------------------------------------------------------------
    def op(self, fn: Callable, args: tuple, kwargs: dict, writes: bool = False) -> Any:
        """Device work fn(*args, **kwargs) on the current stream: run now, or recorded while it
        captures. Its result is a view of an input, a new array, or (writes, or out=) nothing
        new."""
        if _host_arrays(args) or _host_arrays(kwargs):
            raise TypeError(f"Unsupported type {np.ndarray}")
        raw_args, raw_kwargs = _raw(args), _raw(kwargs)
        stream = self.capturing()
        out = kwargs.get("out")
        if writes or out is not None:
            if stream is not None:
                stream.recording.append(lambda: fn(*raw_args, **raw_kwargs))
            else:
                fn(*raw_args, **raw_kwargs)
            if out is None:
                return None
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        with np.errstate(all="ignore"):
            result = fn(*raw_args, **raw_kwargs)  # while capturing: only its shape counts
        if isinstance(result, tuple):
            return tuple(
                self._result(r, fn, (args, kwargs), raw_args, raw_kwargs, i)
                for i, r in enumerate(result)
            )
        return self._result(result, fn, (args, kwargs), raw_args, raw_kwargs, None)

    def _result(self, result, fn, args, raw_args, raw_kwargs, position) -> Any:
        if not isinstance(result, np.ndarray | np.generic):
            return result  # e.g. a shape
        result = np.array(result) if isinstance(result, np.generic) else result
        owner = _owner(result, args)
        if owner is not None:  # a view of an input: no work, and it keeps that memory alive
            view = result.view(DeviceArray)
            view._alloc, view._root = owner._alloc, owner._root
            return view
        result = np.ascontiguousarray(result)
        array = self.adopt(result)
        stream = self.capturing()
        if stream is not None:

            def replay() -> None:
                value = fn(*raw_args, **raw_kwargs)
                np.copyto(result, value if position is None else value[position], casting="unsafe")

            stream.recording.append(replay)
        return array

    def call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """A module-level function: on device arrays it dispatches to DeviceArray; without any
        it creates an array (arange, ...), device work like any other."""
        if any(isinstance(a, DeviceArray) for a in _flat(args) + _flat(kwargs)):
            return fn(*args, **kwargs)
        return self.op(fn, args, kwargs)

    def launch(self, fn, grid, block, args, shared_mem) -> None:
        if _host_arrays(args):
            raise TypeError(f"Unsupported type {np.ndarray} (a kernel argument)")
        raw_args = _raw(tuple(args))
        stream = self.capturing()
        if stream is not None:
            stream.recording.append(lambda: self._run_kernel(fn, grid, block, raw_args, shared_mem))
        else:
            self._run_kernel(fn, grid, block, raw_args, shared_mem)

    def _run_kernel(self, fn, grid, block, args, shared_mem) -> None:
        self.kernel_launches += 1
        fn(grid, block, args, shared_mem=shared_mem)

    # ---- array creation -------------------------------------------------------------------------
    def empty(self, shape, dtype=np.float64, order="C") -> DeviceArray:
        return self.adopt(np.empty(shape, dtype=dtype, order=order))

    def empty_like(self, a, dtype=None) -> DeviceArray:
        return self.empty(a.shape, dtype=dtype or a.dtype)

    def zeros(self, shape, dtype=np.float64) -> DeviceArray:
        return self.full(shape, 0, dtype)

    def zeros_like(self, a, dtype=None) -> DeviceArray:
        return self.zeros(a.shape, dtype=dtype or a.dtype)

    def ones(self, shape, dtype=np.float64) -> DeviceArray:
        return self.full(shape, 1, dtype)

    def full(self, shape, fill_value, dtype=None) -> DeviceArray:
        out = self.empty(shape, dtype=dtype if dtype is not None else np.asarray(fill_value).dtype)
        out.fill(fill_value)
        return out

    def array(self, obj, dtype=None, copy=True, order="K") -> DeviceArray:
        if isinstance(obj, DeviceArray):
            if not copy and (dtype is None or np.dtype(dtype) == obj.dtype):
                return obj
            return obj.astype(dtype or obj.dtype)
        return self.upload(np.array(obj, dtype=dtype, order="C" if order == "K" else order))

    def asarray(self, obj, dtype=None, order=None) -> DeviceArray:
        return self.array(obj, dtype=dtype, copy=False)

    def ascontiguousarray(self, obj, dtype=None) -> DeviceArray:
        array = self.asarray(obj, dtype=dtype)
        if array.flags.c_contiguous:
            return array
        return array.copy()

    def as_strided(self, x, shape=None, strides=None) -> DeviceArray:
        return np.lib.stride_tricks.as_strided(x, shape=shape, strides=strides, subok=True)
