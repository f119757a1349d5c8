"""The `cpu` backend on the real demo models, against the `cpu-reference` backend on the same
file: next-token logits at every position of a 64-token text, and the memory the quantized
weights take (Qwen2.5-Coder-0.5B Q4_K_M: a mix of Q5_0, Q8_0, Q4_K and Q6_K, with fused q/k/v
groups of mixed types)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from _text_fixtures import PARITY_TEXT as TEXT

from nanovllm.demo import demo_model_path
from nanovllm.models import load_model

MODELS = ["smollm2-demo", "qwen2.5-coder-demo"]


@pytest.fixture(scope="module", params=MODELS)
def both(request):
    """(name, cpu model, reference logits over the 64-token text), one model at a time."""
    path = str(demo_model_path(request.param))
    reference = load_model(path, device="cpu-reference")
    ids = reference.tokenizer.encode(TEXT)[:64]
    assert len(ids) == 64
    want = reference.logits(ids)
    del reference  # Qwen's float32 weights take 3 GB
    return request.param, load_model(path, device="cpu"), ids, want


@pytest.mark.parametrize("chunks", [[64], [1] * 64], ids=["prefill", "decode"])
def test_next_token_is_the_references_at_every_position(both, chunks):
    name, ours, ids, want = both
    got = ours.logits(ids, chunks=chunks)
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |cpu - cpu-reference| logit over 64 positions = {diff:.2e}")
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # logits spread over ~30-50; a prefill is float32 on both sides, summed in another order
    # (~1e-4), a decode step rounds the matmuls' inputs to 16-bit codes (~1e-2)
    assert diff < (1e-3 if chunks == [64] else 2e-2)


def test_q8_activations_round_as_llama_cpp_does_and_keep_the_top_token(both):
    """With --quantization q8-activations, decode matmuls read activation rows rounded to Q8_0
    (integer dot products; the kernels are checked exactly in tests/test_cpu_int8.py). Over
    the model that rounding moves logits:
    llama.cpp's own logits for this text differ from the float reference by max 0.97 / mean
    0.149 (SmolLM2) and 0.75 / 0.054 (Qwen), flipping the top token twice where the reference's
    margin was 0.06 and 0.01 (docs/benchmarks.md). The same bounds hold here: a flip only where
    the top two were closer than 0.25."""
    name, _, ids, want = both
    ours = load_model(str(demo_model_path(name)), device="cpu", quantization="q8-activations")
    margin = np.diff(np.sort(want, -1)[:, -2:], axis=-1)[:, 0]
    for chunks in ([1] * 64, [4] * 16):
        got = ours.logits(ids, chunks=chunks)
        diff = np.abs(got - want)
        flips = got.argmax(-1) != want.argmax(-1)
        print(f"{name} {chunks[0]}-token steps: |cpu - cpu-reference| max {diff.max():.3f} "
              f"mean {diff.mean():.4f}, top token differs at margins {margin[flips]}")  # fmt: skip
        assert diff.mean() < 0.2 and diff.max() < 2.0
        assert (margin[flips] < 0.25).all()


def test_weights_stay_in_the_files_bytes(both):
    name, ours, _, _ = both
    model = ours.model
    matrices = [model.embed_tokens] + [
        m
        for layer in model.layers
        for m in (layer.qkv, layer.o_proj, layer.mlp.gate_up, layer.mlp.down)
    ]
    if model.lm_head is not model.embed_tokens:
        matrices.append(model.lm_head)
    held = sum(m.nbytes for m in matrices)
    tensors = gguf.GGUFReader(demo_model_path(name)).tensors
    stored = sum(int(t.n_bytes) for t in tensors if len(t.shape) == 2)
    assert held == stored  # every matrix in its file blocks, none widened to float32


RSS_SCRIPT = """
import json, sys

def rss(key):
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status[key].split()[0]) * 1024

import nanovllm.backends.cpu  # the interpreter, NumPy, numba and LLVM, before any model
base = rss("VmRSS")
from nanovllm.models import load_model
model = load_model(sys.argv[1], device="cpu", max_model_len=512)
ids = model.tokenizer.encode("def quicksort(items):")
model.greedy(ids, 16)  # touches every weight
cfg = model.config
kv = 2 * cfg.num_layers * 512 * cfg.num_kv_heads * cfg.head_dim * 4
print(json.dumps({"peak_rss": rss("VmHWM"), "base_rss": base, "kv": kv}))
"""


def test_qwen_peak_resident_memory_stays_within_1_3x_the_file_plus_kv_cache():
    """What a 491 MB Q4_K_M file costs to serve: the peak resident set above the process before
    the model (interpreter, NumPy, numba and LLVM: ~170 MB that any model shares) within 1.3x
    the file plus the KV cache, and the whole process within issue 17's ~0.8 GB (float32
    weights took 3.1 GB)."""
    path = str(demo_model_path("qwen2.5-coder-demo"))
    # The first run compiles the kernels for Qwen's formats (LLVM's memory counts in its peak)
    # and caches them on disk; the second measures what serving the model takes.
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, path], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, measured = runs
    budget = 1.3 * (os.path.getsize(path) + measured["kv"])
    peak, base = measured["peak_rss"], measured["base_rss"]
    print(f"Qwen2.5-Coder on cpu: peak RSS {peak / 1e6:.0f} MB, {base / 1e6:.0f} MB before the "
          f"model, {first['peak_rss'] / 1e6:.0f} MB while compiling; budget above the base "
          f"{budget / 1e6:.0f} MB")  # fmt: skip
    assert peak - base <= budget
    assert peak <= 0.8e9
