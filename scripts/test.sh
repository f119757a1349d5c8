#!/usr/bin/env bash
# Install nanovllm with its test extra into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is a test-only oracle; the pin takes the local CPU wheel (an unpinned torch pulls CUDA builds).
.venv/bin/python -m pip install --quiet ".[test]"
.venv/bin/ruff check nanovllm tests tui kernels
# `pytest` (not `python -m pytest`) so the tests import the installed package, not the source tree.
.venv/bin/pytest -q "$@"
