"""Shared fixtures. Checkpoint builders live in checkpoints.py; torch loads only when one is asked for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


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
