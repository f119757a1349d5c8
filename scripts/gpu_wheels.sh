#!/usr/bin/env bash
# Download, on a machine with internet, the wheels scripts/gpu_validate.sh installs on a lent GPU
# machine, which has none: Python 3.12, x86-64, with CuPy (cupy-cuda13x 14.2), NumPy, tokenizers,
# safetensors, jinja2, prometheus-client, transformers, torch, pytest and hypothesis already there
# (/work/.library/device/KINDS.md lists them). What nanovllm needs beyond that is pure Python or
# abi3: gguf, falcon, waitress, llguidance, and textual with the two dependencies it lacks.
#
#   bash scripts/gpu_wheels.sh [folder]      # default .whl (ignored by git)
#
# The folder then travels with the working tree (the device tool's `carry`, 64 MiB in all; these
# wheels take about 10 MB). Versions are the ones the test suite runs with here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
PACKAGES=(
    gguf==0.19.0
    falcon==4.4.0
    waitress==3.0.2
    llguidance==1.9.1
    textual==8.2.8
    mdit-py-plugins==0.7.0
    platformdirs==4.14.9
)
PLATFORMS=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
    manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
for package in "${PACKAGES[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$package"
done
ls -1 "$DEST"
du -sh "$DEST"
