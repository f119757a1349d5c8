"""Compiles a CUDA source into an emulator module (a shared library) with g++.

Two g++ runs: `g++ -E` with cuda_emulator.h force-included, then source.rewrite() on the
preprocessed text, then a compile of that text into a .so. Builds are cached under
$NANOVLLM_CACHE/emulator (default ~/.cache/nanovllm/emulator), keyed by a hash of everything
that can change the result: the source, the files it includes with "...", the emulator's
header and shims, the options, the compiler's version and the sanitizer flag. Entries are
written under a temporary name and renamed into place, so concurrent test processes never see
half a file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanovllm.backends.emulator import source
from nanovllm.backends.emulator.errors import CompileError

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emulator.h"
SHIMS = HERE / "include"
# Bump when source.py or the generated code changes in a way the hashed files do not show.
BUILD_FORMAT = 1

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)
_LINE_FILE = re.compile(r'^[ \t]*#[ \t]*line[ \t]+\d+[ \t]+"([^"/\\]+\.cu)"', re.MULTILINE)
_UNSUPPORTED_INCLUDES = {
    "cooperative_groups.h": "cooperative groups (grid-wide sync cannot run on one CPU thread)",
    "mma.h": "wmma / tensor-core matrix fragments",
    "cuda_pipeline.h": "cp.async pipelines",
    "cuda_pipeline_primitives.h": "cp.async pipelines",
    "cuda_awbarrier.h": "asynchronous barriers",
    "cuda/pipeline": "cp.async pipelines",
    "cuda/barrier": "asynchronous barriers",
}


@dataclass(frozen=True, slots=True)
class Build:
    """A compiled module: its shared library and what the source declares."""

    path: Path
    filename: str
    kernels: tuple[source.KernelDecl, ...]
    sanitize: bool
    log: str  # g++'s warnings, if any


@dataclass(slots=True)
class BuildStats:
    """Counts g++ compiles and cache hits in this process (the tests check the cache with it)."""

    compiles: int = 0
    cache_hits: int = 0


stats = BuildStats()
_stats_lock = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("NANOVLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanovllm"
    )
    return Path(root) / "emulator"


def compiler() -> str:
    return os.environ.get("NANOVLLM_EMULATOR_CXX", "g++")


@functools.cache
def compiler_identity(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise CompileError(
            f"the CUDA emulator needs a C++ compiler: {cxx!r} failed ({exc})"
        ) from exc
    return out.stdout.splitlines()[0]


@functools.cache
def cuda_include_dir() -> Path:
    """cuda_fp16.h / cuda_bf16.h come from the nvidia-cuda-runtime-cu12 pip package."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    for root in (spec.submodule_search_locations or []) if spec else []:
        include = Path(root) / "include"
        if (include / "cuda_fp16.h").exists():
            return include.resolve()
    raise CompileError(
        "the CUDA emulator needs the CUDA headers: pip install nvidia-cuda-runtime-cu12 "
        "(or nanovllm[cuda])"
    )


# NVRTC options that only steer GPU code generation: meaningless on the CPU.
_IGNORED_PREFIXES = (
    "-arch", "--gpu-architecture", "-lineinfo", "--generate-line-info", "-G", "--device-debug",
    "-use_fast_math", "--use_fast_math", "--ptxas-options", "-Xptxas", "--fmad", "-fmad",
    "--ftz", "-ftz", "--prec-div", "-prec-div", "--prec-sqrt", "-prec-sqrt", "-dopt",
    "--dopt", "--extra-device-vectorization", "-extra-device-vectorization", "--maxrregcount",
    "-maxrregcount", "-rdc", "--relocatable-device-code", "-default-device",
    "--device-as-default-execution-space", "-restrict", "--restrict", "-ewp",
    "--extensible-whole-program", "--device-int128", "-device-int128", "-dw", "--disable-warnings",
    "-w", "--expt-relaxed-constexpr", "-expt-relaxed-constexpr", "--expt-extended-lambda",
    "-expt-extended-lambda", "-dlto", "--dlink-time-opt", "-fdevice-syntax-only",
    "--fdevice-syntax-only", "-minimal", "--minimal", "-split-compile", "--split-compile",
    "-jump-table-density", "--jump-table-density", "--Wreorder", "-Wreorder",
)  # fmt: skip


def translate_options(options: Sequence[str]) -> tuple[list[str], str]:
    """NVRTC options -> g++ flags (include paths and macros) and the C++ standard."""
    flags: list[str] = []
    std = "c++17"
    opts = list(options)
    i = 0
    while i < len(opts):
        opt = opts[i]
        if not isinstance(opt, str):
            raise TypeError(f"compile options must be strings, got {opt!r}")
        value_next = i + 1 < len(opts)
        for short, long_ in (
            ("-I", "--include-path"),
            ("-D", "--define-macro"),
            ("-U", "--undefine-macro"),
        ):
            if opt in (short, long_) and value_next:
                flags.append(short + opts[i + 1])
                i += 1
                break
            if opt.startswith(long_ + "="):
                flags.append(short + opt[len(long_) + 1 :])
                break
            if opt.startswith(short) and len(opt) > 2:
                flags.append(opt)
                break
        else:
            if opt.startswith(("-std=", "--std=")):
                wanted = opt.split("=", 1)[1]
                std = wanted if wanted in ("c++20", "c++2a", "c++23") else "c++17"
            elif not opt.startswith(_IGNORED_PREFIXES):
                raise CompileError(
                    f"compile option {opt!r} is not understood by the CPU emulator "
                    "(it accepts -I, -D, -U, -std and ignores GPU code-generation options)"
                )
        i += 1
    # Our own copy of the CUDA include dir comes in as a system directory; a user's -I for
    # the same directory would make g++ treat (and warn about) its headers as user code.
    cuda = str(cuda_include_dir())
    flags = [f for f in flags if not (f.startswith("-I") and _same_dir(f[2:], cuda))]
    return flags, std


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def guess_filename(code: str) -> str:
    """The name error messages use for the source. A source pasted together from kernels/
    (kernel_library.kernel_source) carries `#line N "family.cu"` directives; otherwise the
    text came from nowhere in particular."""
    m = _LINE_FILE.search(code)
    return m.group(1) if m else "kernel.cu"


def _included_files(code: str, include_dirs: list[str], seen: set[str] | None = None) -> list[str]:
    """Contents of the "..."-included files the source can reach, for the cache key."""
    seen = set() if seen is None else seen
    found = []
    for name in _INCLUDE.findall(code):
        for d in include_dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path) and path not in seen:
                seen.add(path)
                text = Path(path).read_text(errors="replace")
                found += [path, text, *_included_files(text, include_dirs, seen)]
                break
    return found


def _check_includes(code: str, filename: str) -> None:
    for m in re.finditer(r'^[ \t]*#[ \t]*include[ \t]*[<"]([^>"]+)[>"]', code, re.MULTILINE):
        what = _UNSUPPORTED_INCLUDES.get(m.group(1))
        if what:
            line = code.count("\n", 0, m.start()) + 1
            raise CompileError(f"{filename}:{line}: {what} cannot run in the CPU emulator")


def _compile_flags(sanitize: bool) -> list[str]:
    common = ["-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wl,-Bsymbolic"]
    if sanitize:
        # -O1 -g keeps ASan's reports accurate to the source line.
        return [*common, "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address"]
    return [*common, "-O2"]


def build(code: str, options: Sequence[str] = (), *, sanitize: bool = False) -> Build:
    """Compiles `code` (or finds it in the cache) and returns the module's Build."""
    flags, std = translate_options(options)
    filename = guess_filename(code)
    _check_includes(code, filename)
    cxx = compiler()
    include_dirs = [f[2:] for f in flags if f.startswith("-I")]
    digest = hashlib.sha256()
    for part in (
        str(BUILD_FORMAT), compiler_identity(cxx), cxx, std, str(sanitize), filename,
        json.dumps(flags), HEADER.read_text(), *(p.read_text() for p in sorted(SHIMS.rglob("*")) if p.is_file()),
        code, *_included_files(code, include_dirs), str(cuda_include_dir()),
    ):  # fmt: skip
        digest.update(part.encode(errors="replace"))
        digest.update(b"\0")
    key = digest.hexdigest()[:32]
    root = cache_dir()
    so_path, meta_path = root / f"{key}.so", root / f"{key}.json"
    if so_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            with _stats_lock:
                stats.cache_hits += 1
            return _from_meta(so_path, meta, sanitize)
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry: rebuild it
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="build-") as tmp:
        meta = _compile(code, filename, flags, std, sanitize, cxx, Path(tmp))
        (Path(tmp) / "meta.json").write_text(json.dumps(meta))
        os.replace(Path(tmp) / "meta.json", meta_path)
        os.replace(Path(tmp) / "module.so", so_path)
    return _from_meta(so_path, meta, sanitize)


def _from_meta(so_path: Path, meta: dict, sanitize: bool) -> Build:
    kernels = tuple(
        source.KernelDecl(**{**k, "param_names": tuple(k["param_names"])}) for k in meta["kernels"]
    )
    return Build(so_path, meta["filename"], kernels, sanitize, meta["log"])


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise CompileError(f"could not run {cmd[0]!r}: {exc}") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        shown = "\n".join(lines[:60]) + ("\n..." if len(lines) > 60 else "")
        raise CompileError(f"{what} failed:\n{shown}")
    return done.stderr


def _compile(
    code: str, filename: str, flags: list[str], std: str, sanitize: bool, cxx: str, tmp: Path
) -> dict:
    (tmp / filename).write_text(code)
    sanitize_flags = ["-fsanitize=address"] if sanitize else []
    preprocess = [
        cxx, "-E", f"-std={std}", "-include", str(HEADER), "-isystem", str(SHIMS),
        "-isystem", str(cuda_include_dir()), *flags, *sanitize_flags, "-x", "c++", filename, "-o", "pre.ii",
    ]  # fmt: skip
    _run(preprocess, tmp, f"preprocessing {filename}")
    rewritten = source.rewrite((tmp / "pre.ii").read_text(errors="replace"))
    text = rewritten.text + source.kernel_table(rewritten.kernels, rewritten.dynamic_smem_names)
    (tmp / "module.ii").write_text(text)
    compile_cmd = [
        cxx, f"-std={std}", *_compile_flags(sanitize), f"-fdebug-prefix-map={tmp}=.",
        "module.ii", "-o", "module.so",
    ]  # fmt: skip
    with _stats_lock:
        stats.compiles += 1
    log = _run(compile_cmd, tmp, f"compiling {filename} for the CPU emulator")
    return {
        "filename": filename,
        "log": log,
        "kernels": [
            {
                "name": k.name,
                "qualified": k.qualified,
                "param_names": list(k.param_names),
                "file": k.file,
                "line": k.line,
                "extern_c": k.extern_c,
                "template": k.template,
            }  # fmt: skip
            for k in rewritten.kernels
        ],
    }


def clear_cache() -> None:
    """Removes every cached module (e.g. after changing the emulator header by hand)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)
