"""Checks of a CUDA device before it serves, and the tiny-model check of `nanovllm check`.

The start-up self-check (the engine runs it on a GPU, `backend.needs_startup_check`): every
kernel against the NumPy reference in the engine's dtype and head dims; the matmul paths of
linear() (our kernel, cuBLAS, dequantize + cuBLAS) and embedding() for dense weights and each
GGUF format the models hold, a fused weight of mixed formats if they hold one; and one step of
each real model on the device against the same checkpoint on the reference backend. A pass is
remembered under the nanovllm cache directory, keyed by the kernel sources, the GPU, the dtype,
the formats, the CuPy, NVRTC, CUDA runtime and driver versions and the models' files; a home
directory that cannot be written only means the check runs again at the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanovllm.backends.cpu_reference import ReferenceBackend
from nanovllm.backends.cuda import CUDABackend
from nanovllm.backends.kernel_cases import CheckResult, kernel_checks, run_checks
from nanovllm.backends.kernel_library import ATTENTION_HEAD_DIMS, sources_digest
from nanovllm.backends.matmul_cases import matmul_checks
from nanovllm.backends.memory import weight_memory
from nanovllm.engine.numerics import first_nonfinite, nonfinite_message
from nanovllm.errors import NanovllmError
from nanovllm.models.quantized import FusedWeight, QuantizedTensor

logger = logging.getLogger("nanovllm.engine")

# The real model's step against the reference: the largest logit difference, relative to
# max(1, the largest |logit|), each dtype may show (float16 rounds every activation).
MODEL_TOLERANCE = {"float32": 1e-3, "float16": 0.05}
MODEL_STEP_TOKENS = 8


@dataclass(slots=True)
class LoadedForCheck:
    """A model loaded on the device, the checkpoint it came from, and where that lives."""

    model: Any
    checkpoint: Any  # nanovllm.models.loader.Checkpoint
    source: str  # --model: a path or Hub id


# ---- the tiny model of `nanovllm check` ---------------------------------------------------------
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


# ---- one step of a real model ---------------------------------------------------------------------
class StreamingReference(ReferenceBackend):
    """The reference backend, dequantizing a stored weight when a matmul uses it (a slice of
    rows at a time) instead of at load: a model's float32 copy never exists whole, so a
    quantized model checks against the reference in about its file's memory."""

    ROWS_PER_SLICE = 8192

    def weight(self, tensor: Any) -> Any:
        if isinstance(tensor, QuantizedTensor | FusedWeight):
            return tensor
        return super().weight(tensor)

    def embedding(self, ids: np.ndarray, weight: Any) -> np.ndarray:
        if isinstance(weight, QuantizedTensor):
            return (
                weight.take_rows(np.asarray(ids).reshape(-1))
                .dequantize()
                .reshape(*np.shape(ids), weight.shape[1])
            )
        return super().embedding(ids, weight)

    def linear(self, x: np.ndarray, weight: Any, bias: np.ndarray | None = None) -> np.ndarray:
        if isinstance(weight, FusedWeight):
            out = np.concatenate([self.linear(x, part) for part in weight.parts], axis=-1)
            return out if bias is None else out + bias
        if not isinstance(weight, QuantizedTensor):
            return super().linear(x, weight, bias)
        rows = weight.shape[0]
        out = np.empty((*x.shape[:-1], rows), dtype=np.float32)
        for start in range(0, rows, self.ROWS_PER_SLICE):
            part = weight.take_rows(slice(start, start + self.ROWS_PER_SLICE)).dequantize()
            out[..., start : start + len(part)] = super().linear(x, part)
        return out if bias is None else out + bias


def model_step_check(backend: CUDABackend, loaded: LoadedForCheck) -> CheckResult:
    """The logits of a short prompt, at every position, on the device and on the reference
    backend from the same checkpoint: within the dtype's tolerance, and the same top token
    wherever the reference's top two are further apart than twice the difference."""
    from nanovllm.models.loader import LoadedModel

    config = loaded.model.config
    name = f"{loaded.source}: one step against the reference ({backend.dtype.name})"
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, MODEL_STEP_TOKENS).tolist()
    try:
        device = LoadedModel(loaded.checkpoint, backend, MODEL_STEP_TOKENS, loaded.model)
        got = device.logits(prompt)
        reference = LoadedModel(loaded.checkpoint, StreamingReference(), MODEL_STEP_TOKENS)
        want = reference.logits(prompt)
    except Exception as exc:
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}")
    if not np.isfinite(got).all():
        bad = int((~np.isfinite(got).all(axis=1)).sum())
        where = first_nonfinite(lambda inspect: device.logits(prompt, inspect), backend.xp)
        message = nonfinite_message(bad, len(got), where, config.num_layers, backend.dtype)
        return CheckResult(name, False, message)
    error = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
    top2 = np.sort(want, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * float(np.abs(got - want).max())
    same_top = (got.argmax(axis=1) == want.argmax(axis=1))[decisive].all()
    tolerance = MODEL_TOLERANCE[backend.dtype.name]
    detail = f"relative logits error {error:.2g} (tolerance {tolerance:g}); top token " + (
        "as on the reference" if same_top else "differs from the reference"
    )
    return CheckResult(name, error <= tolerance and bool(same_top), detail)


# ---- the start-up self-check ------------------------------------------------------------------------
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


def device_versions(backend: CUDABackend) -> dict[str, str]:
    """What a kernel's behaviour on this machine depends on besides its source: CuPy, NVRTC (the
    compiler), the CUDA runtime and the driver."""
    if backend.emulated:
        return {"device": "emulated"}
    import cupy

    runtime = cupy.cuda.runtime
    return {
        "cupy": cupy.__version__,
        "nvrtc": ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
        "runtime": str(runtime.runtimeGetVersion()),
        "driver": str(runtime.driverGetVersion()),
    }


def formats_in_use(models: Sequence[Any]) -> list[str]:
    """The GGUF formats of the models' matrices, and "dense" if any matrix is dense."""
    found: set[str] = set()
    for model in models:
        found |= set(weight_memory(model).matrices)
    return sorted(found)


def model_fingerprint(source: str) -> str:
    """A model's identity for the pass marker: its path with the sizes and modification times of
    its files (a folder's weights and config), or the Hub id as given."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"] if path.is_dir() else [path]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return json.dumps(stats) if stats else source


def self_check_results(
    backend: CUDABackend, head_dims: Sequence[int], loaded: Sequence[LoadedForCheck]
) -> list[CheckResult]:
    """Every check of the start-up self-check, in the engine's dtype: the kernels, linear() and
    embedding() for the formats the models hold, and one step of each model."""
    dtype = backend.dtype.name
    formats = formats_in_use([item.model for item in loaded]) or ["dense"]
    results = kernel_checks(backend, (dtype,), head_dims)
    results += run_checks(matmul_checks(backend, (dtype,), formats))
    return results + [model_step_check(backend, item) for item in loaded]


def startup_self_check(
    backend: CUDABackend,
    head_dims: Sequence[int] = ATTENTION_HEAD_DIMS,
    loaded: Sequence[LoadedForCheck] = (),
) -> None:
    """Check what the engine will run here before it serves: a kernel or a model step that
    gives wrong numbers on this GPU stops the engine with a clear message, instead of serving
    garbage. A pass is remembered (see the module docstring)."""
    dtype = backend.dtype.name
    formats = formats_in_use([item.model for item in loaded]) or ["dense"]
    key = {
        "sources": sources_digest(), "arch": device_arch(backend), "dtype": dtype,
        "head_dims": sorted(head_dims), "formats": formats, **device_versions(backend),
        "models": [model_fingerprint(item.source) for item in loaded],
    }  # fmt: skip
    marker = _marker(key)
    if _passed(marker):
        return
    start = time.perf_counter()
    results = self_check_results(backend, head_dims, loaded)
    failed = [r for r in results if not r.passed]
    if failed:
        first = failed[0]
        raise NanovllmError(
            f"CUDA self-check failed on {device_name(backend)} ({device_arch(backend)}): "
            f"{first.name}: {first.detail} ({len(failed)} of {len(results)} checks failing); "
            "run `nanovllm check` for the kernels' table, or use --device cpu"
        )
    logger.info(
        "self-check: %d checks passed on %s in %.1f s", len(results), device_name(backend),
        time.perf_counter() - start,
    )  # fmt: skip
    _remember(marker, key)


def _marker(key: dict) -> Path:
    from nanovllm.demo import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "selfcheck" / digest


def _passed(marker: Path) -> bool:
    try:
        return marker.is_file()
    except OSError:  # an unreadable cache directory: check again
        return False


def _remember(marker: Path, key: dict) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"passed": time.strftime("%Y-%m-%dT%H:%M:%S"), **key}) + "\n")
    except OSError as exc:
        logger.info(
            "could not remember the self-check's pass in %s (%s); it will run again at the next "
            "start (set NANOVLLM_CACHE to a writable directory)", marker.parent, exc,
        )  # fmt: skip
