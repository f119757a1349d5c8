"""`nanovllm check`: are the CUDA kernels sound here?

On a GPU: compile every kernel with NVRTC for the device (registers and spills from ptxas), run
each against the NumPy reference (nanovllm/backends/cpu_reference.py) on random inputs in float32,
float16 and bfloat16 (the matmuls also through linear() on each of its paths, and embedding(),
dense and in every GGUF format), and run a tiny random model greedily on the GPU and on the CPU. Without
a GPU: compile for sm_80 and sm_90 and say that the runtime checks need a GPU, or run them on
the CPU emulator with --emulated.

The kernel cases live in nanovllm/backends/kernel_cases.py and matmul_cases.py, the device
checks (also the engine's start-up self-check) in nanovllm/backends/self_check.py.
"""

from __future__ import annotations

import argparse
import json

from nanovllm.backends.cuda import CUDABackend
from nanovllm.backends.kernel_cases import DTYPES, CheckResult, kernel_checks, run_checks
from nanovllm.backends.matmul_cases import matmul_checks
from nanovllm.backends.self_check import device_arch, device_name, device_versions, model_check
from nanovllm.errors import NanovllmError
from nanovllm.extras import require_cuda_extra


def add_check_parser(subparsers) -> None:
    check = subparsers.add_parser(
        "check",
        help="compile the CUDA kernels and check them against the NumPy reference",
        description=__doc__.split("\n\n")[1],
    )
    check.add_argument(
        "--arch",
        action="append",
        default=None,
        help="GPU architecture to compile for (repeatable; default: the GPU's own, or sm_80 "
        "and sm_90 without a GPU)",
    )
    check.add_argument(
        "--emulated",
        action="store_true",
        help="without a GPU, run the runtime checks on the CPU emulator (slow)",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from nanovllm.backends import cuda_available

    require_cuda_extra("nanovllm check")  # NVRTC, CuPy and the CUDA headers, even without a GPU
    gpu = cuda_available()
    backend = None
    if gpu or args.emulated:
        backend = CUDABackend("float16", emulated=not gpu)
    archs = tuple(args.arch or ((device_arch(backend),) if gpu else ("sm_80", "sm_90")))
    report: dict = {"device": device_name(backend) if backend else "no CUDA GPU", "builds": []}
    build_ok = _run_builds(archs, report)
    checks: list[CheckResult] = []
    if backend is not None:
        checks = kernel_checks(backend)
        checks += run_checks(matmul_checks(backend, DTYPES))
        checks += [model_check(backend), model_check(backend.with_dtype("float32"))]
        report["versions"] = device_versions(backend)
    report["checks"] = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, archs, checks, gpu or args.emulated)
    return 0 if build_ok and all(c.passed for c in checks) else 1


def _run_builds(archs: tuple[str, ...], report: dict) -> bool:
    from nanovllm.backends.kernel_library import KERNEL_FILES
    from nanovllm.backends.nvrtc_check import compile_family

    ok = True
    for arch in archs:
        for family in KERNEL_FILES:
            try:
                build = compile_family(family, arch)
            except NanovllmError as exc:
                ok = False
                report["builds"].append({"family": family, "arch": arch, "error": str(exc)})
                continue
            for k in build.kernels:
                report["builds"].append(
                    {"family": family, "arch": arch, "kernel": k.name, "registers": k.registers,
                     "spill_bytes": k.spills, "stack_bytes": k.stack_bytes,
                     "shared_bytes": k.shared_bytes}
                )  # fmt: skip
                ok = ok and k.spills == 0
    return ok


def _print_report(report: dict, archs, checks: list[CheckResult], ran: bool) -> None:
    print(f"nanovllm check: {report['device']}")
    if report.get("versions"):
        print("  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"\nNVRTC build, registers / spill bytes per architecture ({', '.join(archs)}):")
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    for b in report["builds"]:
        if "error" in b:
            print(f"  FAIL {b['family']}.cu for {b['arch']}:\n{b['error']}")
            continue
        rows.setdefault(b["kernel"], {})[b["arch"]] = (b["registers"], b["spill_bytes"])
    print("  " + "kernel".ljust(28) + "".join(a.rjust(12) for a in archs) + "  result")
    for name, per_arch in rows.items():
        cells = "".join(
            (f"{per_arch[a][0]:>4} / {per_arch[a][1]}" if a in per_arch else "-").rjust(12)
            for a in archs
        )
        spills = any(spill for _, spill in per_arch.values())
        print(f"  {name:<28}{cells}  {'FAIL (spills)' if spills else 'pass'}")
    if not ran:
        print(
            "\nRuntime checks (each kernel against the NumPy reference, a tiny model on GPU vs "
            "CPU) need a CUDA GPU, and none is usable here (cupy.cuda.is_available() is False)."
            "\n`nanovllm check --emulated` runs them on the CPU emulator instead."
        )
        return
    print("\nRuntime checks against the NumPy reference:")
    for c in checks:
        print(f"  {c.name:<36} {'pass' if c.passed else 'FAIL'}  {c.detail}")
