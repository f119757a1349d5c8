"""ctypes bindings to one compiled emulator module (the .so that build.py makes).

Imported both by the engine process and, as a top-level module, by the AddressSanitizer
worker (_asan_worker.py), so it depends on the standard library only.
"""

from __future__ import annotations

import ctypes

ABI_VERSION = 2
ERROR_BUFFER = 16 * 1024  # the header keeps at most this much of a message

# Error kinds returned by emu_launch (see cuda_emulator.h).
OK, ERR_ASSERT, ERR_SYNC, ERR_LAUNCH, ERR_MEMORY = 0, 1, 2, 3, 4


class NativeModule:
    """A loaded module: its kernel table and its launch function."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        for name, restype, argtypes in (
            ("emu_abi_version", ctypes.c_int, []),
            ("emu_kernel_count", ctypes.c_int, []),
            ("emu_kernel_name", ctypes.c_char_p, [ctypes.c_int]),
            ("emu_kernel_nparams", ctypes.c_int, [ctypes.c_int]),
            ("emu_kernel_param", ctypes.c_char_p, [ctypes.c_int, ctypes.c_int]),
            ("emu_static_smem_bytes", ctypes.c_ulong, []),
            ("emu_dynamic_smem", ctypes.c_void_p, []),
            (
                "emu_launch",
                ctypes.c_int,
                [
                    ctypes.c_int,
                    ctypes.POINTER(ctypes.c_uint),
                    ctypes.c_ulong,
                    ctypes.c_int,
                    ctypes.c_ulonglong,
                    ctypes.c_char_p,
                    ctypes.c_char_p,
                    ctypes.c_ulong,
                    ctypes.POINTER(ctypes.c_ulong),
                ],
            ),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        if lib.emu_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path}: emulator ABI mismatch (stale cache entry?)")
        self.lib = lib

    def kernels(self) -> list[tuple[str, list[str]]]:
        """[(name, [parameter descriptor, ...]), ...] in table order (the launch index)."""
        lib = self.lib
        out = []
        for k in range(lib.emu_kernel_count()):
            params = [lib.emu_kernel_param(k, i).decode() for i in range(lib.emu_kernel_nparams(k))]
            out.append((lib.emu_kernel_name(k).decode(), params))
        return out

    def static_smem_bytes(self) -> int:
        return int(self.lib.emu_static_smem_bytes())

    def dynamic_smem_address(self) -> int:
        return int(self.lib.emu_dynamic_smem())

    def launch(
        self,
        kernel: int,
        dims: tuple[int, int, int, int, int, int],
        dyn_smem: int,
        schedule: int,
        seed: int,
        args: bytes,
    ) -> tuple[int, str, int]:
        """Runs the whole grid; returns (error kind, message, static shared memory the kernel
        declared), with (OK, "") on success."""
        cdims = (ctypes.c_uint * 6)(*dims)
        error = ctypes.create_string_buffer(ERROR_BUFFER)  # per call: launches may overlap
        static_smem = ctypes.c_ulong(0)
        rc = self.lib.emu_launch(
            kernel,
            cdims,
            dyn_smem,
            schedule,
            seed & (2**64 - 1),
            args,
            error,
            ERROR_BUFFER,
            ctypes.byref(static_smem),
        )
        return rc, (error.value.decode(errors="replace") if rc else ""), static_smem.value
