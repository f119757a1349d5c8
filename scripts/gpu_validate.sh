#!/usr/bin/env bash
# The GPU validation run: one call on a lent GPU machine (Python 3.12, CuPy for CUDA 13, no
# internet), under ten minutes on one H100:
#   1. install what the machine lacks, from the wheels scripts/gpu_wheels.sh prepared (.whl), and
#      nanovllm itself, into a folder put on PYTHONPATH;
#   2. `nanovllm check`: NVRTC builds for the device (registers, spills), every kernel, matmul path
#      and GGUF format against the NumPy reference, a tiny model on the GPU against the CPU;
#   3. the GPU tests (tests/test_gpu.py, marker `cuda`: start-up self-check, decode graphs
#      captured and replayed with the reference's tokens, GGUF weights kept quantized, KV sizing
#      within --gpu-memory-utilization) and the NVRTC build tests with the machine's NVRTC;
#   4. `nanovllm bench decode`: random weights with Qwen3-0.6B's shapes, float16 and Q4_K, batch
#      1, 8, 64 and 256 with and without CUDA graphs, tokens/s next to the H100 projection.
# Each step has a time limit and a log in $OUT (the device tool's folder that comes back; else
# ./gpu-validate-out); the last lines printed are the summary and the benchmark's table.
#
#   bash scripts/gpu_wheels.sh                 # here, once: the wheels (.whl, about 5 MB)
#   bash scripts/gpu_validate.sh               # there (device tool: carry [".whl"])
#   bash scripts/gpu_validate.sh --dry-run     # here: the same steps on the CUDA emulator,
#                                              # tiny shapes, to test this script
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$REPO/gpu-validate-out}
mkdir -p "$OUT"
if [[ $DRY == 1 ]]; then PY=${PYTHON:-$REPO/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
SITE=$(mktemp -d /tmp/nanovllm-site.XXXX)
# Commands run from an empty folder: the repository root on sys.path would shadow the installed
# package with the source tree (which lacks nanovllm.kernels), and its kernels/ folder would pass
# for the `kernels` package that transformers imports when it finds one.
WORK=$(mktemp -d /tmp/nanovllm-work.XXXX)
cd "$WORK" || exit 1
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    local verdict="ok"
    [[ $rc == 124 ]] && verdict="TIMED OUT" || { [[ $rc != 0 ]] && verdict="FAILED (exit $rc)"; }
    SUMMARY+=("$(printf '%-8s %-18s %4ss  log: %s' "$name" "$verdict" "$(( $(date +%s) - start ))" "$OUT/$name.log")")
    tail -n 3 "$OUT/$name.log"
    return $rc
}

install_all() {
    if [[ $DRY == 0 ]] && compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
            "$REPO"/.whl/*.whl || return 1
    fi
    # nanovllm itself laid out as its wheel installs it (kernels/ and tui/ become
    # nanovllm.kernels and nanovllm.tui), as links to the working tree: no build, so neither
    # PyPI nor a recent setuptools is needed.
    mkdir -p "$SITE/nanovllm"
    ln -s "$REPO"/nanovllm/* "$SITE/nanovllm/"
    ln -s "$REPO/kernels" "$SITE/nanovllm/kernels"
    ln -s "$REPO/tui" "$SITE/nanovllm/tui"
    PYTHONPATH=$SITE "$PY" -c "import nanovllm, gguf, falcon, waitress, llguidance; print('imports ok')"
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    "$PY" - <<'PYTHON'
import platform, numpy, nanovllm
print("python", platform.python_version(), "numpy", numpy.__version__, "nanovllm from", nanovllm.__file__)
try:
    import cupy
    print("cupy", cupy.__version__, "runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "nvrtc", cupy.cuda.nvrtc.getVersion(), "gpu usable", cupy.cuda.is_available())
except Exception as exc:
    print("cupy:", type(exc).__name__, exc)
from nanovllm.backends.kernel_library import cuda_include_dir
print("CUDA headers", cuda_include_dir())
PYTHON
}

export REPO DRY PY SITE
export -f install_all environment  # `timeout` runs commands, not shell functions: bash -c them
step install 150 bash -c install_all || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
step env 60 bash -c environment

TESTS=("$REPO/tests/test_gpu.py" "$REPO/tests/test_nvrtc.py")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO")
if [[ $DRY == 1 ]]; then
    step check 300 "$PY" -m nanovllm.cli check --arch sm_90
    step tests 300 "${PYTEST[@]}" "${TESTS[@]}"
    step bench 300 "$PY" -m nanovllm.cli bench decode --shapes tiny --batch 1,3 --context 8 \
        --steps 2 --device cuda-emulated
else
    step check 150 "$PY" -m nanovllm.cli check
    step tests 170 "${PYTEST[@]}" "${TESTS[@]}"
    step bench 230 "$PY" -m nanovllm.cli bench decode --shapes qwen3-0.6b --batch 1,8,64,256 \
        --context 512 --steps 20
fi

echo
echo "== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
echo
grep -E "^(decode steps|weights| +(f16|q4_k) )" "$OUT/bench.log" || echo "no benchmark table"
echo "(H100 proj.: the projection of docs/kernels.md for graphs, not a measurement)"
rm -rf "$SITE" "$WORK"
