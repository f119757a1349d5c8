"""Find the CUDA sources of kernels/ at run time and load their entry points.

kernels/ is installed as the package `nanovllm.kernels`, so the sources are found through
importlib.resources from an editable checkout and from a wheel alike. `#include "common.cuh"`
is pasted in here, making each kernel file one self-contained source for NVRTC (through
`cupy.RawModule` on a GPU, or the low-level binding in nvrtc_check.py) and for the CPU emulator.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanovllm.errors import NanovllmError

# One file per op family; each defines `extern "C"` entry points per dtype (and head_dim).
KERNEL_FILES = (
    "paged_attention", "cache", "norm", "rotary", "activation", "matmul", "dequantize", "token_bitmask", "moe",
)  # fmt: skip
DTYPE_SUFFIXES = ("f32", "f16", "bf16")
# The GGUF kernels take the dtypes the CUDA backend computes in (it refuses bfloat16).
GGUF_DTYPE_SUFFIXES = ("f32", "f16")
# The GGUF block formats kernels/gguf_blocks.cuh decodes: name -> (values, bytes) per block.
GGUF_FORMATS = {
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
}  # fmt: skip
# Launch constants of kernels/matmul.cu (kMatmulTileM, kMatmulRowsPerWarp, 32 * kMatmulWarps)
# and kernels/dequantize.cu (threads per block, 8 values per thread).
MATMUL_TILE_M = 4
MATMUL_ROWS_PER_WARP = 2
MATMUL_THREADS = 128
DEQUANTIZE_THREADS = 256
ATTENTION_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# Query vectors per paged-attention block: kQueryVectors in kernels/paged_attention.cu.
ATTENTION_QUERY_VECTORS = 8
ATTENTION_THREADS = 128
# kernels/moe.cu: rows per expert tile (kMoeTileRows), output columns per block (kMoeTileCols),
# threads of the grouped matmuls (kMoeThreads) and of moe_align, the most experts (kMaxExperts).
MOE_TILE_ROWS = 16
MOE_TILE_COLS = 32
MOE_THREADS = 256
MOE_ALIGN_THREADS = 1024
MOE_MAX_EXPERTS = 1024


def matmul_geometry(rows: int, out_features: int, units: int) -> tuple[int, int]:
    """(blocks, split) of a kernels/matmul.cu launch: `split` warps share a pair of weight rows,
    enough to give each lane about one of a row's `units` (8 dense values or a 32-value GGUF
    block), so that even a short matrix has a load in flight on every lane."""
    split = 4 if units >= 128 else 2 if units >= 64 else 1
    rows_per_block = MATMUL_THREADS // 32 // split * MATMUL_ROWS_PER_WARP
    m_tiles = -(-rows // MATMUL_TILE_M)
    return m_tiles * -(-out_features // rows_per_block), split


def attention_shared_bytes(head_dim: int) -> int:
    """Dynamic shared memory of one paged-attention block (see kernels/paged_attention.cu):
    the block's queries, each warp's accumulators, and each warp's maxima and sums."""
    vectors, warps = ATTENTION_QUERY_VECTORS, ATTENTION_THREADS // 32
    return ((1 + warps) * vectors * head_dim + 2 * warps * vectors) * 4


_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.MULTILINE)


def kernel_file_text(name: str) -> str:
    """The text of one file of kernels/ (e.g. "norm.cu"), as shipped."""
    return importlib.resources.files("nanovllm.kernels").joinpath(name).read_text()


@functools.cache
def kernel_source(family: str) -> str:
    """kernels/<family>.cu with its local includes pasted in (recursively, each header once);
    #line directives keep error lines right."""
    return _pasted(f"{family}.cu", set())


def _pasted(name: str, seen: set[str]) -> str:
    text = kernel_file_text(name)
    out, last = [], 0
    for match in _INCLUDE.finditer(text):
        header = match.group(1)
        resume = text.count("\n", 0, match.end()) + 2  # the line after the #include
        out.append(text[last : match.start()])
        if header not in seen:
            seen.add(header)
            out.append(f'#line 1 "{header}"\n{_pasted(header, seen)}\n')
        out.append(f'#line {resume} "{name}"')
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def sources_digest() -> str:
    """A hash of every kernel source: the key of the start-up self-check's cache."""
    digest = hashlib.sha256()
    for family in KERNEL_FILES:
        digest.update(kernel_source(family).encode())
    return digest.hexdigest()[:16]


DEFAULT_TOOLKITS = ("/usr/local/cuda",)


def cuda_include_dir() -> Path:
    """The folder holding cuda_fp16.h / cuda_bf16.h, which NVRTC needs on its include path:
    from NVIDIA's pip wheels (CUDA 12's `nvidia-cuda-runtime-cu12` puts them in
    nvidia/cuda_runtime/include, CUDA 13's `nvidia-cuda-runtime` in nvidia/cu13/include), else
    from a CUDA toolkit ($CUDA_PATH, $CUDA_HOME, /usr/local/cuda)."""
    for include in _include_candidates():
        if (include / "cuda_fp16.h").exists():
            return include
    raise NanovllmError(
        "CUDA headers (cuda_fp16.h) not found: pip install nvidia-cuda-runtime-cu12 (CUDA 12) or "
        "nvidia-cuda-runtime (CUDA 13), or set CUDA_PATH to a CUDA toolkit"
    )


def _include_candidates() -> list[Path]:
    found = []
    for package in ("nvidia.cuda_runtime", "nvidia"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            root = Path(root)
            if package == "nvidia":  # CUDA 13+ wheels: one folder per major version
                found += [path / "include" for path in sorted(root.glob("cu[0-9]*"), reverse=True)]
            else:
                found.append(root / "include")
    toolkits = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), *DEFAULT_TOOLKITS]
    return found + [Path(path) / "include" for path in toolkits if path]


def nvrtc_options(arch: str | None = None) -> tuple[str, ...]:
    """NVRTC options shared by the runtime build and the build check."""
    options = ("-std=c++17", f"-I{cuda_include_dir()}")
    if arch is not None:
        options += (f"--gpu-architecture={arch}",)
    return options


def entry_points(family: str) -> list[str]:
    """The `extern "C"` kernel names a family's file defines."""
    suffixes = DTYPE_SUFFIXES
    if family == "matmul":
        quantized = [f"matmul_{f}_{s}" for s in GGUF_DTYPE_SUFFIXES for f in GGUF_FORMATS]
        return [f"matmul_{s}" for s in suffixes] + quantized
    if family == "dequantize":
        return [f"dequantize_{f}_{s}" for s in GGUF_DTYPE_SUFFIXES for f in GGUF_FORMATS]
    if family == "paged_attention":
        return [f"paged_attention_{s}_d{d}" for s in suffixes for d in ATTENTION_HEAD_DIMS]
    if family == "norm":
        return [f"{op}_{s}" for op in ("rms_norm", "add_rms_norm") for s in suffixes]
    if family == "moe":
        ops = ("moe_route", "moe_gate_up", "moe_down", "moe_sum")
        return ["moe_align"] + [f"{op}_{s}" for op in ops for s in suffixes]
    if family == "activation":
        return [f"{op}_{s}" for op in ("silu_and_mul", "gelu_tanh_and_mul") for s in suffixes]
    name = {"cache": "write_kv", "rotary": "rotary", "token_bitmask": "apply_token_bitmask"}[family]
    return [f"{name}_{s}" for s in suffixes]


class KernelLibrary:
    """Loads each kernel file once and hands out its functions, called like CuPy's RawKernel:
    fn(grid, block, args, shared_mem=0).

    On a GPU the modules are CuPy RawModules (NVRTC); on the emulated device they are the
    emulator's EmulatedModules, so the launch code in cuda.py is the same for both.
    """

    def __init__(self, emulated: bool, emulator_options: dict[str, Any] | None = None) -> None:
        self.emulated = emulated
        self.emulator_options = dict(emulator_options or {})
        self._modules: dict[str, Any] = {}
        self._functions: dict[str, Callable[..., Any]] = {}

    def function(self, family: str, name: str) -> Callable[..., Any]:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.module(family).get_function(name)
        return fn

    def module(self, family: str) -> Any:
        module = self._modules.get(family)
        if module is None:
            module = self._modules[family] = self._load(family)
        return module

    def _load(self, family: str) -> Any:
        source, options = kernel_source(family), nvrtc_options()
        if self.emulated:
            from nanovllm.backends.emulator import EmulatedModule

            return EmulatedModule(source, options, **self.emulator_options)
        import cupy

        return cupy.RawModule(code=source, options=options)
