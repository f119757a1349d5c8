"""Optional dependencies (pyproject.toml's extras): which extra a feature needs, checked before
the feature is used, so that a missing one is one line naming the extra to install, never an
ImportError from deep inside a call.
"""

from __future__ import annotations

import importlib.util

from nanovllm.errors import NanovllmError

# The `cuda` extra: module -> the pip package that provides it.
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
    """Raise one line naming the `cuda` extra if any of its packages is missing."""
    absent = missing_packages(CUDA_MODULES)
    if absent:
        raise NanovllmError(
            f"{feature} needs the `cuda` extra: pip install 'nanovllm[cuda]' "
            f"(missing: {', '.join(absent)})"
        )
