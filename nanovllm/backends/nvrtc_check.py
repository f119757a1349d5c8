"""Compile every kernel for a GPU architecture with NVRTC, without a GPU, and read ptxas' report.

cupy.RawModule asks the driver for the current device's architecture, so it cannot compile
here. CuPy's low-level NVRTC binding needs no device: with `--gpu-architecture=sm_XX` it
builds a cubin, and `--ptxas-options=-v` puts each entry point's registers, stack frame and
spill traffic in the program log, which this module parses.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

from nanovllm.backends.kernel_library import KERNEL_FILES, kernel_source, nvrtc_options
from nanovllm.errors import NanovllmError

DEFAULT_ARCHS = ("sm_80", "sm_90")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


@dataclass(slots=True)
class KernelReport:
    """What ptxas said about one entry point for one architecture."""

    name: str
    arch: str
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass(slots=True)
class BuildResult:
    family: str
    arch: str
    seconds: float
    kernels: list[KernelReport]
    log: str


class NvrtcError(NanovllmError):
    """A kernel source did not compile; the message carries NVRTC's log."""


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
    except ImportError as exc:
        raise NanovllmError(
            "NVRTC is not available: pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 "
            "nvidia-cuda-runtime-cu12 (or nanovllm[cuda])"
        ) from exc
    return nvrtc


@functools.cache
def compile_family(family: str, arch: str) -> BuildResult:
    """Compile kernels/<family>.cu to a cubin for `arch` (e.g. "sm_90") and parse the log.
    Cached for the life of the process (the sources are fixed once loaded): `nanovllm check`
    and the tests ask for the same builds, and matmul.cu alone takes NVRTC ~8 s per arch."""
    nvrtc = _nvrtc()
    options = [*nvrtc_options(arch), "--ptxas-options=-v"]
    start = time.perf_counter()
    program = nvrtc.createProgram(kernel_source(family), f"{family}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program)
            raise NvrtcError(f"{family}.cu does not compile for {arch}: {exc}\n{log}") from None
        nvrtc.getCUBIN(program)  # proves a cubin (not just PTX) came out
        log = nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
    return BuildResult(family, arch, time.perf_counter() - start, parse_ptxas_log(log), log)


def parse_ptxas_log(log: str) -> list[KernelReport]:
    """One report per "Compiling entry function" block of a `ptxas -v` log."""
    reports: list[KernelReport] = []
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            reports.append(KernelReport(entry.group(1), entry.group(2)))
        elif reports and (frame := _FRAME.search(line)):
            report = reports[-1]
            report.stack_bytes, report.spill_stores, report.spill_loads = map(int, frame.groups())
        elif reports and (registers := _REGISTERS.search(line)):
            reports[-1].registers = int(registers.group(1))
            shared = _SHARED.search(line)
            reports[-1].shared_bytes = int(shared.group(1)) if shared else 0
    return reports


def compile_all(archs: tuple[str, ...] = DEFAULT_ARCHS) -> list[BuildResult]:
    """Every kernel file for every architecture."""
    return [compile_family(family, arch) for arch in archs for family in KERNEL_FILES]
