"""Runs sanitized (AddressSanitizer) emulator modules in a child process.

A Python process can load an ASan-instrumented library only if libasan was loaded first, i.e.
preloaded when the process started. So sanitized launches go, transparently, to one
persistent worker process started with LD_PRELOAD=libasan (see _asan_worker.py): it copies
each array into a malloc'ed buffer of exactly the array's size, so ASan sees the array's
bounds, runs the launch and sends back the arrays the kernel may have written. ASan stops the
worker at the first bad access; its report becomes an AddressSanitizerError here, and the
next sanitized launch starts a fresh worker.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from nanovllm.backends.emulator.build import compiler
from nanovllm.backends.emulator.errors import AddressSanitizerError, EmulatorError
from nanovllm.backends.emulator.signature import Marshalled, Signature

WORKER = Path(__file__).resolve().with_name("_asan_worker.py")
DYNAMIC_SMEM_BUFFER = 227 * 1024  # kMaxDynamicSmem in cuda_emulator.h
ASAN_OPTIONS = ":".join((
    "detect_leaks=0",  # Python itself "leaks" at exit by design
    "halt_on_error=1",
    "suppress_equal_pcs=0",  # report every bad access, also at a PC that failed before
    "detect_stack_use_after_return=0",  # fake stacks do not mix with our fiber stacks
    "detect_odr_violation=0",
    "allocator_may_return_null=1",
    "abort_on_error=0",
    "print_summary=1",
))  # fmt: skip


@functools.cache
def libasan_path() -> str:
    out = subprocess.run(
        [compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        raise EmulatorError(
            "sanitize=True needs GCC's AddressSanitizer runtime (libasan.so); "
            "install it with your compiler (Debian: libasan8)"
        )
    return os.path.realpath(out)


class AsanWorker:
    """The client side of one worker process, restarted whenever it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = 0  # our own pid when the worker was started (a forked child needs its own)

    def kernels(self, path: str) -> tuple[list[tuple[str, list[str]]], int]:
        with self._lock:
            reply = self._request(("kernels", path), kernel=None)
        return reply[1], reply[2]

    def launch(
        self,
        path: str,
        signature: Signature,
        index: int,
        dims: tuple[int, int, int, int, int, int],
        smem: int,
        schedule: int,
        seed: int,
        marshalled: Marshalled,
    ) -> tuple[int, str, int]:
        """Runs the launch in the worker; returns (error kind, message, static shared memory
        the kernel declared)."""
        # The same array passed twice (in-place ops) must stay one buffer in the worker.
        buffers: list[tuple[bytes, bool]] = []
        owners: list[tuple[int, int, object]] = []  # (address, nbytes, array) per buffer
        slots = []
        for slot, array in marshalled.arrays:
            address = array.__array_interface__["data"][0]
            write_back = not signature.params[slot].type.const
            for i, (a, n, _) in enumerate(owners):
                if a == address and n == array.nbytes:
                    buffers[i] = (buffers[i][0], buffers[i][1] or write_back)
                    break
            else:
                i = len(buffers)
                buffers.append((array.tobytes(), write_back))
                owners.append((address, array.nbytes, array))
            slots.append((slot, i))
        msg = ("launch", path, index, dims, smem, schedule, seed, marshalled.buffer, buffers, slots)
        with self._lock:
            reply = self._request(msg, kernel=(signature, slots))
        _, rc, message, results, static_smem = reply
        for (address, nbytes, _), data in zip(owners, results, strict=True):
            if data is not None:
                ctypes.memmove(address, data, nbytes)
        return rc, message, static_smem

    def _request(self, msg: tuple, kernel: tuple[Signature, list] | None) -> tuple:
        if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None
        try:
            pickle.dump(msg, self._to, protocol=pickle.HIGHEST_PROTOCOL)
            self._to.flush()
            reply = pickle.load(self._from)
        except (EOFError, BrokenPipeError, OSError):
            raise self._died(kernel) from None
        if reply[0] == "error":
            raise EmulatorError(f"AddressSanitizer worker: {reply[1]}")
        return reply

    def _start(self) -> None:
        self.close()  # a forked child leaves the parent's worker alone (see close)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self._log = tempfile.NamedTemporaryFile(prefix="nanovllm-asan-", suffix=".log")
        self._args_map = tempfile.NamedTemporaryFile(prefix="nanovllm-asan-args-", delete=False)
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(x for x in (libasan_path(), env.get("LD_PRELOAD", "")) if x)
        env["ASAN_OPTIONS"] = ASAN_OPTIONS
        self._proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(to_child_r), str(from_child_w), self._args_map.name],
            pass_fds=(to_child_r, from_child_w),
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._to = os.fdopen(to_child_w, "wb")
        self._from = os.fdopen(from_child_r, "rb")
        self._pid = os.getpid()

    def _died(self, kernel: tuple[Signature, list] | None) -> EmulatorError:
        assert self._proc is not None
        code = self._proc.wait()
        self._log.flush()
        report = Path(self._log.name).read_text(errors="replace")
        args_map = Path(self._args_map.name).read_text(errors="replace")
        self.close()
        if "ERROR: AddressSanitizer" in report:
            return AddressSanitizerError(_summarize(report, args_map, kernel))
        tail = "\n".join(report.strip().splitlines()[-30:])
        return EmulatorError(f"the AddressSanitizer worker died (exit code {code}):\n{tail}")

    def close(self) -> None:
        if self._proc is not None and self._pid == os.getpid():
            for f in (self._to, self._from):
                try:
                    f.close()
                except OSError:
                    pass
            if self._proc.poll() is None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._log.close()
            self._args_map.close()
            os.unlink(self._args_map.name)
        self._proc = None


_REGION = re.compile(
    r"is located (\d+) bytes (to the right of|to the left of|inside of|after|before) "
    r"(\d+)-byte region \[(0x[0-9a-f]+),"
)
_NOT_KERNEL_CODE = (
    "cuda_emulator.h",
    "__emu",
    "<emulator>",
    "(/lib",
    "libffi",
    "[stack]",
    "Python/",
    "Objects/",
    "Modules/",
)


_SHARED = re.compile(
    r"is located (\d+) bytes inside of global variable '__emu_shared_\d+_(\w+)' "
    r"defined in '([^']*)'"
)
_SHARED_REDZONE = 64  # kSharedRedzone in cuda_emulator.h


def _explain_shared(line: str) -> str | None:
    """A static __shared__ variable sits between two poisoned redzones (Shared<T> in
    cuda_emulator.h); ASan calls a hit "use-after-poison" inside the holder. Say it plainly."""
    m = _SHARED.search(line)
    if not m:
        return None
    offset, name, where = int(m.group(1)), m.group(2), m.group(3)
    if offset < _SHARED_REDZONE:
        place = f"{_SHARED_REDZONE - offset} bytes before its start"
    else:
        place = "past its end"
    return f"the access is out of bounds of __shared__ {name} ({where}): {place}"


def _summarize(report: str, args_map: str, kernel: tuple[Signature, list] | None) -> str:
    """ASan's report cut to what names the bug: the error, the access and the kernel's frames
    (file:line), which argument's buffer it missed, and the summary line."""
    lines = [
        line.strip() for line in report[report.index("ERROR: AddressSanitizer") :].splitlines()
    ]
    kept = [lines[0].split(" at pc ")[0]]
    in_access_stack = False
    for line in lines[1:]:
        if line.startswith(("READ of size", "WRITE of size")):
            kept.append(line)
            in_access_stack = True
        elif in_access_stack and line.startswith("#"):
            if not any(x in line for x in _NOT_KERNEL_CODE):
                kept.append("  " + line)
        elif "is located" in line:
            in_access_stack = False
            kept.append(_explain_shared(line) or line)
        elif line.startswith("SUMMARY:"):
            kept.append(line)
            break
        else:
            in_access_stack = in_access_stack and bool(line)
    m = re.search(r"on address (0x[0-9a-f]+)", report)
    for row in args_map.splitlines():
        if m and row.startswith("smem "):
            _, base, size = row.split()
            offset = int(m.group(1), 16) - int(base, 16)
            if 0 <= offset < DYNAMIC_SMEM_BUFFER:
                kept.insert(
                    1,
                    f"the access is at byte {offset} of dynamic shared memory, but the launch "
                    f"gave shared_mem={size} bytes",
                )
    m = _REGION.search(report)
    if m and kernel is not None:
        signature, _ = kernel
        for row in args_map.splitlines():
            if row.startswith("smem "):
                continue
            slot, address, nbytes = row.split()
            if int(address, 16) == int(m.group(4), 16):
                param = signature.params[int(slot)]
                kept.insert(
                    1,
                    f"the access is {m.group(1)} bytes {m.group(2)} the {nbytes}-byte array passed "
                    f"as {signature.kernel} {param.label()} (`{param.type.spelled}`)",
                )
                break
    return "\n".join(kept)


_worker: AsanWorker | None = None
_worker_lock = threading.Lock()


def worker() -> AsanWorker:
    """The process-wide worker (one child serves every sanitized module of this process)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = AsanWorker()
            atexit.register(_worker.close)
        return _worker
