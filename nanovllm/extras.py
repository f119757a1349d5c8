"""Optional dependencies (pyproject.toml's extras): which extra a feature needs, checked before
the feature is used, so that a missing one is one line naming the extra to install, never an
ImportError from deep inside a call.
"""

from __future__ import annotations

import importlib.util

from nanovllm.errors import NanovllmError

# The `cuda` extra: module -> the pip package that provides it. CUDA 13's wheels (the `cuda13`
# extra) hold NVRTC and the headers under nvidia/cu13 instead, and a CUDA toolkit serves too:
# `require_cuda_extra` accepts those.
CUDA_MODULES = {
    "cupy": "cupy-cuda12x",
    "nvidia.cuda_nvrtc": "nvidia-cuda-nvrtc-cu12",
    "nvidia.cuda_runtime": "nvidia-cuda-runtime-cu12",
}


def missing_packages(modules: dict[str, str]) -> list[str]:
    """The packages whose module cannot be found (nothing is imported but parent packages)."""
    absent = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a missing parent package ("nvidia") raises
            found = False
        if not found:
            absent.append(package)
    return absent


def require_cuda_extra(feature: str) -> None:
    """Raise one line naming the `cuda` extra if any of its packages is missing: CuPy, NVRTC and
    the CUDA headers (from the CUDA 12 or CUDA 13 wheels, or a toolkit)."""
    absent = missing_packages({"cupy": CUDA_MODULES["cupy"]})
    if missing_packages({"nvidia.cuda_nvrtc": "nvrtc"}) and not _cuda13_or_toolkit("nvrtc"):
        absent.append(CUDA_MODULES["nvidia.cuda_nvrtc"])
    if missing_packages({"nvidia.cuda_runtime": "headers"}) and not _cuda13_or_toolkit("headers"):
        absent.append(CUDA_MODULES["nvidia.cuda_runtime"])
    if absent:
        raise NanovllmError(
            f"{feature} needs the `cuda` extra: pip install 'nanovllm[cuda]' "
            f"(missing: {', '.join(absent)})"
        )


def _cuda13_or_toolkit(what: str) -> bool:
    """Whether NVRTC ("nvrtc") or the CUDA headers ("headers") come from CUDA 13's wheels
    (nvidia/cu13) or a CUDA toolkit instead of the CUDA 12 wheels."""
    from nanovllm.backends.kernel_library import cuda_include_dir

    try:
        include = cuda_include_dir()
    except NanovllmError:
        return False
    if what == "headers":
        return True
    root = include.parent  # nvidia/cu13, or the toolkit's root
    return any(root.glob("lib*/libnvrtc.so*")) or any(root.glob("bin/nvrtc*"))
