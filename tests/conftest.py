"""Shared fixtures. Checkpoint builders live in checkpoints.py; torch loads only when one is asked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Python processes the tests start (`python -m nanovllm.cli`, `python -c ...`) import the installed
# package, as a user's would, not the source tree beside them: with the working directory first
# on sys.path they would find `nanovllm/` here, which has no `nanovllm.tui` (that lives in `tui/`
# and is mapped into the package only by installing it).
os.environ["PYTHONSAFEPATH"] = "1"


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """kind -> folder of a tiny random HF checkpoint (see checkpoints.KINDS), built once per session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            from checkpoints import build_checkpoint

            built[kind] = build_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def emulated():
    """schedule (or "asan") -> an emulated CUDA backend, kernels compiled once per session."""
    from nanovllm.backends.cuda import CUDABackend

    backends = {}

    def get(schedule: str):
        if schedule not in backends:
            options = {"sanitize": True} if schedule == "asan" else {"schedule": schedule}
            backends[schedule] = CUDABackend("float32", emulated=True, emulator_options=options)
        return backends[schedule]

    return get


def assert_matches(results, dtype: str) -> None:
    """A kernel case's outputs within the dtype's tolerance of the NumPy reference."""
    from nanovllm.backends.kernel_cases import compare

    ok, worst = compare(*results, dtype)
    assert ok, f"max error {worst:.2f} x the {dtype} tolerance"
