"""EmulatedModule / EmulatedKernel: CuPy's RawModule / RawKernel, run on the CPU.

    mod = EmulatedModule(code, options, schedule="random", seed=1, sanitize=False)
    fn = mod.get_function("rms_norm_f16")
    fn((blocks,), (threads,), (x, w, out, np.int32(n)), shared_mem=0)

The launch code written for CuPy runs unchanged: same grid/block tuples, same argument order,
same marshalling (with the types checked), the same launch limits a GPU enforces. NumPy
arrays stand for device arrays and the kernel writes into them in place.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

from nanovllm.backends.emulator import build as builder
from nanovllm.backends.emulator import native
from nanovllm.backends.emulator.errors import (
    DeviceAssertError,
    EmulatorError,
    LaunchError,
    SharedMemoryError,
    SynchronizationError,
)
from nanovllm.backends.emulator.signature import Signature, signature

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

# What a current NVIDIA GPU (H100, sm_90) enforces at launch.
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
DEFAULT_MAX_DYNAMIC_SMEM = 48 * 1024  # above this only after raising the kernel's attribute
MAX_SMEM_PER_BLOCK = 227 * 1024  # static + dynamic, opt-in maximum

_ERRORS = {
    native.ERR_ASSERT: DeviceAssertError,
    native.ERR_SYNC: SynchronizationError,
    native.ERR_LAUNCH: LaunchError,
    native.ERR_MEMORY: SharedMemoryError,
}


class _InProcess:
    """Launches in this process: the kernel writes straight into the NumPy arrays."""

    def __init__(self, path: str) -> None:
        self.native = native.NativeModule(path)

    def kernels(self) -> list[tuple[str, list[str]]]:
        return self.native.kernels()

    def launch(self, sig: Signature, index: int, dims, smem, schedule, seed, marshalled):
        return self.native.launch(index, dims, smem, schedule, seed, marshalled.buffer)


class _Sanitized:
    """Launches in the AddressSanitizer worker process (see sanitizer.py)."""

    def __init__(self, path: str) -> None:
        from nanovllm.backends.emulator.sanitizer import worker

        self.path = path
        self.worker = worker()

    def kernels(self) -> list[tuple[str, list[str]]]:
        return self.worker.kernels(self.path)[0]

    def launch(self, sig: Signature, index: int, dims, smem, schedule, seed, marshalled):
        return self.worker.launch(self.path, sig, index, dims, smem, schedule, seed, marshalled)


class EmulatedModule:
    """A CUDA source compiled for the CPU emulator; hands out its kernels by name."""

    def __init__(
        self,
        code: str,
        options: Sequence[str] = (),
        *,
        schedule: str = "forward",
        seed: int = 0,
        sanitize: bool = False,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule
        self.seed = seed
        self.sanitize = sanitize
        self.build = builder.build(code, tuple(options), sanitize=sanitize)
        path = str(self.build.path)
        self._runner = _Sanitized(path) if sanitize else _InProcess(path)
        table = self._runner.kernels()
        self._index = {name: (i, descs) for i, (name, descs) in enumerate(table)}
        self._decls = {d.name: d for d in self.build.kernels}
        self._functions: dict[str, EmulatedKernel] = {}
        self._launches = itertools.count()  # each random-schedule launch gets its own order
        self._lock = threading.Lock()

    @property
    def kernel_names(self) -> list[str]:
        return list(self._index)

    def get_function(self, name: str) -> EmulatedKernel:
        with self._lock:
            fn = self._functions.get(name)
            if fn is None:
                fn = self._functions[name] = self._make_function(name)
            return fn

    def _make_function(self, name: str) -> EmulatedKernel:
        if name not in self._index:
            decl = self._decls.get(name)
            if decl is not None and decl.template:
                why = "it is a template (CuPy would need name_expressions)"
            elif decl is not None:
                why = 'it is not extern "C", so on a GPU its symbol name is mangled'
            else:
                why = f"the module defines {sorted(self._index) or 'no kernels'}"
            raise EmulatorError(f"no kernel {name!r} in {self.build.filename}: {why}")
        index, descs = self._index[name]
        decl = self._decls.get(name)
        names = decl.param_names if decl is not None else ()
        return EmulatedKernel(self, name, index, signature(name, descs, names))

    def _next_seed(self) -> int:
        return self.seed * 1_000_003 + next(self._launches)


class EmulatedKernel:
    """One kernel, called like cupy.RawKernel: fn(grid, block, args, shared_mem=0)."""

    def __init__(self, module: EmulatedModule, name: str, index: int, sig: Signature) -> None:
        self.module = module
        self.name = name
        self.signature = sig
        self._index = index
        self._max_dynamic_smem = DEFAULT_MAX_DYNAMIC_SMEM
        self._static_smem = 0
        self.preferred_shared_memory_carveout = -1  # accepted like CuPy's, no effect here

    @property
    def shared_size_bytes(self) -> int:
        """Static __shared__ memory of this kernel: what its threads declared in its last launch
        (0 before the first; the emulator learns it by running the kernel)."""
        return self._static_smem

    @property
    def max_threads_per_block(self) -> int:
        return MAX_THREADS_PER_BLOCK

    @property
    def num_regs(self) -> int:
        return 0  # registers are a GPU compiler's business (NVRTC's ptxas log tells them)

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic_smem

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        limit = MAX_SMEM_PER_BLOCK - self.shared_size_bytes
        if not 0 <= int(value) <= limit:
            raise ValueError(
                f"{self.name}: max_dynamic_shared_size_bytes must be in [0, {limit}] "
                f"({MAX_SMEM_PER_BLOCK} bytes per block minus {self.shared_size_bytes} static)"
            )
        self._max_dynamic_smem = int(value)

    def __call__(
        self,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple | list,
        shared_mem: int = 0,
        stream: object = None,
        enable_cooperative_groups: bool = False,
    ) -> None:
        if enable_cooperative_groups:
            raise LaunchError(
                f"{self.name}: cooperative launches (grid-wide sync) are not emulated"
            )
        dims = (*_dims("grid", self.name, grid), *_dims("block", self.name, block))
        self._check_limits(dims, shared_mem)
        marshalled = self.signature.marshal(args)
        mod = self.module
        schedule = SCHEDULES[mod.schedule]
        rc, message, self._static_smem = mod._runner.launch(
            self.signature, self._index, dims, shared_mem, schedule, mod._next_seed(), marshalled
        )
        if rc:
            error = _ERRORS.get(rc, EmulatorError)
            raise error(f"kernel {self.name}: {message}")

    def _check_limits(self, dims: tuple[int, ...], shared_mem: int) -> None:
        grid, block = dims[:3], dims[3:]
        for axis, (n, limit) in enumerate(zip(grid, MAX_GRID_DIM, strict=True)):
            if n > limit:
                raise LaunchError(
                    f"{self.name}: grid dimension {'xyz'[axis]} = {n} exceeds {limit}"
                )
        for axis, (n, limit) in enumerate(zip(block, MAX_BLOCK_DIM, strict=True)):
            if n > limit:
                raise LaunchError(
                    f"{self.name}: block dimension {'xyz'[axis]} = {n} exceeds {limit}"
                )
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise LaunchError(
                f"{self.name}: {threads} threads per block exceed the limit of "
                f"{MAX_THREADS_PER_BLOCK}"
            )
        if not isinstance(shared_mem, int) or shared_mem < 0:
            raise TypeError(
                f"{self.name}: shared_mem must be a non-negative int, got {shared_mem!r}"
            )
        if shared_mem > self._max_dynamic_smem:
            raise LaunchError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the kernel's "
                f"max_dynamic_shared_size_bytes ({self._max_dynamic_smem}); a GPU refuses more "
                "than 48 KB until you raise it: fn.max_dynamic_shared_size_bytes = n"
            )
        if shared_mem + self.shared_size_bytes > MAX_SMEM_PER_BLOCK:
            raise LaunchError(
                f"{self.name}: {shared_mem} bytes dynamic + {self.shared_size_bytes} static "
                f"shared memory exceed {MAX_SMEM_PER_BLOCK} bytes per block"
            )


def _dims(what: str, kernel: str, dims: object) -> tuple[int, int, int]:
    """CuPy's grid/block handling: a tuple of 1 to 3 ints, padded with 1s; entries below 1 are
    raised to 1 (so a grid of (0,) runs one block, as it does on a GPU through CuPy)."""
    if not isinstance(dims, tuple):
        raise TypeError(f"{kernel}: {what} must be a tuple (as CuPy requires), got {dims!r}")
    if not 1 <= len(dims) <= 3:
        raise TypeError(f"{kernel}: {what} must have 1 to 3 entries, got {dims!r}")
    try:
        values = [int(d.__index__()) for d in dims]
    except (AttributeError, TypeError):
        raise TypeError(f"{kernel}: {what} entries must be ints, got {dims!r}") from None
    values += [1] * (3 - len(values))
    return (max(1, values[0]), max(1, values[1]), max(1, values[2]))
