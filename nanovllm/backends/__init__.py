"""Array backends: `cpu` (NumPy), `cuda` (CuPy + kernels/), `cuda-emulated` (kernels/ on the CPU)."""

from __future__ import annotations

import numpy as np

from nanovllm.backends.base import Backend
from nanovllm.errors import NanovllmError
from nanovllm.extras import require_cuda_extra


def cuda_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def get_backend(device: str = "auto", dtype: str = "auto") -> Backend:
    device = resolve_device(device)
    if device == "cpu":
        if dtype not in ("auto", "float32"):
            raise NanovllmError(
                f"the cpu backend computes in float32; --dtype {dtype} needs --device cuda"
            )
        from nanovllm.backends.cpu import CPUBackend

        return CPUBackend(np.float32)
    if device in ("cuda", "cuda-emulated"):
        from nanovllm.backends.cuda import CUDABackend

        require_cuda_extra(f"--device {device}")

        return CUDABackend(dtype, emulated=device == "cuda-emulated")
    raise NanovllmError(f"unknown device {device!r}; use cpu, cuda or cuda-emulated")
