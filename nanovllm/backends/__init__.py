"""Array backends: `cpu` (compiled kernels on stored weights), `cpu-reference` (NumPy, float32),
`cuda` (CuPy + kernels/) and `cuda-emulated` (kernels/ on the CPU)."""

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


def get_backend(
    device: str = "auto",
    dtype: str = "auto",
    num_threads: int | None = None,
    quantization: str = "auto",
) -> Backend:
    """The backend for a device. num_threads: CPU threads of the compiled kernels and of BLAS
    (None: the default of nanovllm/backends/cpu.py); ignored on a GPU. quantization "auto"
    keeps quantized weights (GGUF blocks) in their stored form where the backend has kernels
    for them, "none" dequantizes every weight at load (the reference backend always does),
    "q8-activations" (cpu only) also rounds decode matmuls' inputs to Q8_0 blocks."""
    device = resolve_device(device)
    if quantization == "q8-activations" and device != "cpu":
        raise NanovllmError(
            f"--quantization q8-activations is a mode of the cpu backend, not of {device}"
        )
    if device in ("cpu", "cpu-reference"):
        if dtype not in ("auto", "float32"):
            raise NanovllmError(
                f"the {device} backend computes in float32; --dtype {dtype} needs --device cuda"
            )
        if device == "cpu":
            from nanovllm.backends.cpu import CPUBackend

            return CPUBackend(num_threads, quantization)
        from nanovllm.backends.cpu_reference import ReferenceBackend

        return ReferenceBackend(np.float32)
    if device in ("cuda", "cuda-emulated"):
        from nanovllm.backends.cuda import CUDABackend

        require_cuda_extra(f"--device {device}")

        return CUDABackend(dtype, emulated=device == "cuda-emulated", quantization=quantization)
    raise NanovllmError(f"unknown device {device!r}; use cpu, cpu-reference, cuda or cuda-emulated")
