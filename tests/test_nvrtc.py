"""Every kernel compiles with NVRTC for sm_80 and sm_90 with no register spills (no GPU needed).

The low-level NVRTC binding builds a cubin for an architecture named on the command line, and
`--ptxas-options=-v` reports registers and spill traffic per entry point, which these tests read.
"""

from __future__ import annotations

import re

import pytest

from nanovllm.backends.kernel_library import (
    ATTENTION_HEAD_DIMS,
    KERNEL_FILES,
    attention_shared_bytes,
    entry_points,
    kernel_file_text,
    kernel_source,
)
from nanovllm.backends.nvrtc_check import compile_family, parse_ptxas_log
from nanovllm.errors import NanovllmError

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def builds():
    """Each (family, arch) compiled once for the whole module (~8 s in all)."""
    cache = {}

    def get(family: str, arch: str):
        if (family, arch) not in cache:
            cache[family, arch] = compile_family(family, arch)
        return cache[family, arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", KERNEL_FILES)
def test_kernel_compiles_without_spills(builds, family: str, arch: str) -> None:
    build = builds(family, arch)
    reports = {k.name: k for k in build.kernels}
    assert sorted(reports) == sorted(entry_points(family))
    for name, report in reports.items():
        print(f"{arch} {name}: {report.registers} registers, {report.spills} bytes spilled")
        assert report.arch == arch
        assert 0 < report.registers <= 255, name
        assert report.spill_stores == 0 and report.spill_loads == 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_attention_takes_only_dynamic_shared_memory_under_48kb(builds, arch: str) -> None:
    for report in builds("paged_attention", arch).kernels:
        assert report.shared_bytes == 0, report.name
    assert all(attention_shared_bytes(d) <= 48 * 1024 for d in ATTENTION_HEAD_DIMS)
    assert attention_shared_bytes(128) == 20736


def test_ptxas_log_is_parsed_per_entry_point() -> None:
    log = """\
ptxas info    : 12 bytes gmem
ptxas info    : Compiling entry function 'first' for 'sm_90'
ptxas info    : Function properties for first
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compiling entry function 'second' for 'sm_90'
ptxas info    : Function properties for second
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 7 registers
"""
    first, second = parse_ptxas_log(log)
    assert (first.name, first.registers, first.stack_bytes) == ("first", 40, 16)
    assert (first.spill_stores, first.spill_loads, first.spills, first.shared_bytes) == (
        8,
        4,
        12,
        128,
    )
    assert (second.name, second.registers, second.spills, second.shared_bytes) == (
        "second",
        7,
        0,
        0,
    )


def test_sources_are_found_as_package_data_with_common_header_pasted_in() -> None:
    assert "NANOVLLM_COMMON_CUH" in kernel_file_text("common.cuh")
    for family in KERNEL_FILES:
        source = kernel_source(family)
        # Headers are pasted recursively (matmul.cu includes gguf_blocks.cuh, which includes
        # common.cuh): no local include is left for NVRTC, which has no kernels/ directory.
        assert not re.search(r'^#include "', source, re.MULTILINE)
        assert source.count("namespace nanovllm {") >= 1
        # After the pasted header, line numbers resume at the line after the #include.
        raw_lines = kernel_file_text(f"{family}.cu").splitlines()
        include_line = raw_lines.index('#include "common.cuh"') + 1
        assert f'#line {include_line + 1} "{family}.cu"' in source


@pytest.mark.parametrize("family", KERNEL_FILES)
def test_kernels_use_nothing_the_emulator_cannot_run(family: str) -> None:
    source = kernel_source(family)  # with the headers it includes
    for banned in (
        r"\basm\b",
        r"cp\.async",
        r"\bmma\b",
        r"wmma",
        r"grid\.sync",
        r"cooperative_groups",
    ):
        assert not re.search(banned, source), banned


@pytest.mark.parametrize("family", KERNEL_FILES)
def test_kernel_file_header_states_geometry_and_pointers(family: str) -> None:
    header = kernel_file_text(f"{family}.cu").split("#include")[0]
    for word in ("grid", "block", "shared memory", "Pointers"):
        assert word in header, word


def test_attention_launch_constants_match_the_kernel_source() -> None:
    """cuda.py sizes the grid from these; a mismatch would leave query rows uncomputed."""
    from nanovllm.backends.kernel_library import ATTENTION_QUERY_VECTORS, ATTENTION_THREADS

    source = kernel_file_text("paged_attention.cu")
    vectors = re.search(r"constexpr int kQueryVectors = (\d+);", source)
    warps = re.search(r"constexpr int kAttentionWarps = (\d+);", source)
    assert int(vectors.group(1)) == ATTENTION_QUERY_VECTORS
    assert int(warps.group(1)) * 32 == ATTENTION_THREADS


def test_matmul_launch_constants_match_the_kernel_source() -> None:
    """cuda.py sizes the matmul grid from these; a mismatch would leave outputs unwritten."""
    from nanovllm.backends.kernel_library import (
        MATMUL_ROWS_PER_WARP,
        MATMUL_THREADS,
        MATMUL_TILE_M,
        matmul_geometry,
    )

    source = kernel_file_text("matmul.cu")
    constants = dict(re.findall(r"constexpr int (kMatmul\w+) = (\d+);", source))
    assert int(constants["kMatmulTileM"]) == MATMUL_TILE_M
    assert int(constants["kMatmulWarps"]) * 32 == MATMUL_THREADS
    assert int(constants["kMatmulRowsPerWarp"]) == MATMUL_ROWS_PER_WARP
    bounds = re.findall(r"__launch_bounds__\((\d+)", source)
    assert bounds and all(int(b) == MATMUL_THREADS for b in bounds)
    # Qwen3-0.6B's o_proj at batch 1: 64 units of 32 per row, 2 warps per row pair, 4 rows a block.
    assert matmul_geometry(1, 1024, 64) == (256, 2)
    assert matmul_geometry(33, 19, 5) == (9 * 3, 1)
    assert matmul_geometry(5, 19, 129) == (2 * 10, 4)


def test_gguf_block_sizes_match_the_gguf_package() -> None:
    """The glue checks uploaded rows against these sizes; the kernels' own layouts are checked
    value by value in tests/test_kernels_matmul.py."""
    import gguf

    from nanovllm.backends.kernel_library import GGUF_FORMATS

    for name, (values, size) in GGUF_FORMATS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (values, size)


# ---- where the CUDA headers come from ---------------------------------------------------------
def _headers(folder):
    folder.mkdir(parents=True)
    (folder / "cuda_fp16.h").write_text("// stand-in")
    return folder


def test_cuda_headers_are_found_in_the_cuda_13_wheel_layout_and_toolkits(tmp_path, monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    from nanovllm.backends import kernel_library

    cu13 = _headers(tmp_path / "site" / "nvidia" / "cu13" / "include")
    specs = {
        "nvidia": SimpleNamespace(submodule_search_locations=[str(tmp_path / "site" / "nvidia")])
    }
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: specs.get(name))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "toolkit"))
    monkeypatch.setattr(kernel_library, "DEFAULT_TOOLKITS", ())
    assert kernel_library.cuda_include_dir() == cu13  # cupy-cuda13x's nvidia-cuda-runtime
    specs.clear()
    toolkit = _headers(tmp_path / "toolkit" / "include")
    assert kernel_library.cuda_include_dir() == toolkit  # $CUDA_PATH
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(NanovllmError, match="nvidia-cuda-runtime"):
        kernel_library.cuda_include_dir()


def test_the_cuda_extra_check_accepts_cuda_13_wheels(tmp_path, monkeypatch):
    """cupy-cuda13x with nvidia-cuda-nvrtc / nvidia-cuda-runtime 13 (what the lent GPU machines
    have): no nvidia.cuda_nvrtc or nvidia.cuda_runtime module, NVRTC and headers in nvidia/cu13."""
    import importlib.util
    from types import SimpleNamespace

    from nanovllm import extras
    from nanovllm.backends import kernel_library

    cu13 = tmp_path / "nvidia" / "cu13"
    _headers(cu13 / "include")
    specs = {
        "cupy": object(),
        "nvidia": SimpleNamespace(submodule_search_locations=[str(cu13.parent)]),
    }
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: specs.get(name))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(kernel_library, "DEFAULT_TOOLKITS", ())
    with pytest.raises(NanovllmError, match=r"missing: nvidia-cuda-nvrtc-cu12\)"):
        extras.require_cuda_extra("--device cuda")  # headers found, NVRTC not
    (cu13 / "lib").mkdir()
    (cu13 / "lib" / "libnvrtc.so.13").write_bytes(b"")
    extras.require_cuda_extra("--device cuda")
    del specs["cupy"]
    with pytest.raises(NanovllmError, match=r"missing: cupy-cuda12x\)"):
        extras.require_cuda_extra("--device cuda")
