"""Checks of a CUDA device before it serves: the start-up self-check (every kernel against the
NumPy reference, remembered per kernel sources, GPU and dtype) and the tiny-model check that
`nanovllm check` runs (greedy tokens on the device and on the CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from nanovllm.backends.cpu_reference import ReferenceBackend
from nanovllm.backends.cuda import CUDABackend
from nanovllm.backends.kernel_cases import CheckResult, kernel_checks
from nanovllm.backends.kernel_library import ATTENTION_HEAD_DIMS, sources_digest
from nanovllm.errors import NanovllmError


def greedy_margins(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Top-1 minus top-2 logit at each step of a greedy path (model: a LoadedModel)."""
    logits = model.logits(prompt + tokens[:-1])[len(prompt) - 1 :]
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def decisive_prefix(margins: np.ndarray, logits_error: float) -> int:
    """How many greedy steps must agree: up to the first step whose top-2 margin on the CPU is
    within twice the measured logits error, where rounding may pick either token."""
    close = np.flatnonzero(margins <= 2 * logits_error)
    return int(close[0]) if len(close) else len(margins)


def model_check(backend: CUDABackend, new_tokens: int = 8, seed: int = 0) -> CheckResult:
    """Greedy tokens of the tiny model on the backend and on the CPU must agree, up to the first
    near-tie that float16 rounding may break either way."""
    from nanovllm.models.loader import LoadedModel
    from nanovllm.models.synthetic import tiny_checkpoint

    checkpoint = tiny_checkpoint(seed)
    prompt = np.random.default_rng(seed).integers(3, 256, 12).tolist()
    name = f"tiny model greedy {backend.dtype.name}"
    try:
        device = LoadedModel(checkpoint, backend, 64)
        cpu = LoadedModel(checkpoint, ReferenceBackend(), 64)
        logits_error = float(np.abs(device.logits(prompt) - cpu.logits(prompt)).max())
        got, want = device.greedy(prompt, new_tokens), cpu.greedy(prompt, new_tokens)
        must_agree = decisive_prefix(greedy_margins(cpu, prompt, want), logits_error)
    except Exception as exc:
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}")
    same = sum(g == w for g, w in zip(got, want, strict=True))
    detail = (
        f"{same}/{new_tokens} tokens as on the CPU ({must_agree} before any near-tie); "
        f"logits max diff {logits_error:.3g}"
    )
    passed = got[:must_agree] == want[:must_agree] and logits_error < 0.25
    return CheckResult(name, passed, detail)


def device_arch(backend: CUDABackend) -> str:
    """sm_XY of the current GPU, or "emulated"."""
    if backend.emulated:
        return "emulated"
    import cupy

    return f"sm_{cupy.cuda.Device().compute_capability}"


def device_name(backend: CUDABackend) -> str:
    if backend.emulated:
        return "CUDA emulator (CPU)"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def startup_self_check(
    backend: CUDABackend, head_dims: Sequence[int] = ATTENTION_HEAD_DIMS
) -> None:
    """Check the kernels the engine will use (every head_dim of the target and the draft) once
    per (kernel sources, GPU arch, dtype): a kernel that gives wrong numbers on this GPU stops
    the engine with a clear message, instead of serving garbage. Passing runs are remembered in
    the nanovllm cache directory."""
    from nanovllm.demo import cache_dir

    dtype = backend.dtype.name
    dims = "-".join(map(str, head_dims))
    marker = (
        cache_dir() / "selfcheck" / f"{sources_digest()}-{device_arch(backend)}-{dtype}-d{dims}"
    )
    if marker.exists():
        return
    failed = [r for r in kernel_checks(backend, (dtype,), head_dims) if not r.passed]
    if failed:
        first = failed[0]
        raise NanovllmError(
            f"CUDA kernel self-check failed on {device_name(backend)} ({device_arch(backend)}): "
            f"{first.name}: {first.detail} ({len(failed)} failing); run `nanovllm check` for "
            "the full table, or use --device cpu"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
