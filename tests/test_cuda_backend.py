"""The CUDA backend without a GPU: device selection, dtype rules, KV-cache sizing, the start-up
self-check, `nanovllm check`, and the tiny checkpoints end to end on the emulated device giving
the CPU backend's greedy tokens."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest
from checkpoints import KINDS, prompt_ids

from nanovllm import check
from nanovllm.backends import cuda_available, get_backend, self_check
from nanovllm.backends.cuda import CUDABackend, bf16_from_float32, float32_from_bf16
from nanovllm.backends.kernel_cases import CheckResult
from nanovllm.backends.kernel_library import ATTENTION_HEAD_DIMS, GGUF_FORMATS
from nanovllm.backends.memory import kv_cache_block_bytes, num_blocks_for_budget
from nanovllm.errors import NanovllmError

NEW_TOKENS = 4
PROMPT = prompt_ids(12)


# ---- device and dtype ----------------------------------------------------------------------
def test_cuda_emulated_device_gives_the_cuda_backend_in_float16() -> None:
    backend = get_backend("cuda-emulated")
    assert isinstance(backend, CUDABackend)
    assert (backend.name, backend.dtype, backend.xp) == ("cuda-emulated", np.float16, np)


def test_cuda_emulated_accepts_float32() -> None:
    assert get_backend("cuda-emulated", "float32").dtype == np.float32


def test_bfloat16_compute_is_refused_with_the_way_out() -> None:
    with pytest.raises(NanovllmError, match="float16 or float32"):
        get_backend("cuda-emulated", "bfloat16")


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_says_what_to_use_instead() -> None:
    with pytest.raises(NanovllmError, match="cuda-emulated"):
        get_backend("cuda")


def test_float16_conversion_warns_when_a_weight_overflows() -> None:
    backend = CUDABackend("float16", emulated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.asarray(np.array([1.0, -65504.0], np.float32), np.float16)
    with pytest.warns(UserWarning, match="beyond float16"):
        out = backend.asarray(np.array([1.0, 7e4], np.float32), np.float16)
    assert np.isinf(out[1])


def test_qkv_views_reach_kernels_without_a_copy() -> None:
    backend = CUDABackend("float32", emulated=True)
    qkv = np.zeros((5, (4 + 2 * 2) * 16), np.float32)
    k = qkv[:, 64:96].reshape(5, 2, 16)
    rows, stride = backend._token_rows(k)
    assert rows is k and stride == qkv.shape[1]
    transposed = np.zeros((2, 5, 16), np.float32).transpose(1, 0, 2)
    rows, stride = backend._token_rows(transposed)
    assert rows.flags.c_contiguous and stride == 32


def test_bfloat16_bits_round_to_nearest_even() -> None:
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-9, -3.0], np.float32)
    assert bf16_from_float32(x).tolist() == [0x3F80, 0x3F80, 0x3F81, 0xC040]
    assert float32_from_bf16(bf16_from_float32(x)).tolist() == [1.0, 1.0, 1 + 2**-7, -3.0]


# ---- KV cache sizing -----------------------------------------------------------------------
def test_num_blocks_fill_the_utilization_budget_after_what_is_in_use() -> None:
    block = kv_cache_block_bytes(
        num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=np.float16
    )
    assert block == 2 * 2 * 16 * 2 * 64 * 2
    gib = 2**30
    # 10 GiB card, 2 GiB in use, 90%: 9 - 2 - 1 (reserve) = 6 GiB of blocks.
    blocks = num_blocks_for_budget(8 * gib, 10 * gib, 0.9, block, reserve_bytes=gib)
    assert blocks == (int(10 * gib * 0.9) - 2 * gib - gib) // block


def test_num_blocks_refuses_when_nothing_fits() -> None:
    with pytest.raises(NanovllmError, match="no room for the KV cache"):
        num_blocks_for_budget(1000, 10_000, 0.5, block_bytes=100, reserve_bytes=0)
    with pytest.raises(NanovllmError, match="gpu-memory-utilization"):
        num_blocks_for_budget(1000, 10_000, 1.5, block_bytes=100)


# ---- start-up self-check and `nanovllm check` ----------------------------------------------
def test_self_check_failure_stops_with_the_failing_kernel(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    failing = [CheckResult("rotary float16", False, "max error 9.00 x tolerance")]
    monkeypatch.setattr(self_check, "kernel_checks", lambda *a, **k: failing)
    with pytest.raises(NanovllmError, match="rotary float16: max error 9.00"):
        self_check.startup_self_check(CUDABackend("float16", emulated=True), [64])


def test_self_check_runs_once_per_kernel_sources_and_arch(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    calls = []

    def passing(*args, **kwargs):
        calls.append(args)
        return [CheckResult("rotary float16", True, "")]

    monkeypatch.setattr(self_check, "kernel_checks", passing)
    backend = CUDABackend("float16", emulated=True)
    self_check.startup_self_check(backend, [64])
    self_check.startup_self_check(backend, [64])
    assert len(calls) == 1
    assert len(list((tmp_path / "selfcheck").iterdir())) == 1


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_check_without_gpu_reports_registers_and_says_runtime_needs_a_gpu(capsys) -> None:
    parser = argparse.ArgumentParser()
    check.add_check_parser(parser.add_subparsers())
    args = parser.parse_args(["check", "--arch", "sm_90"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "paged_attention_f16_d128" in out and "sm_90" in out
    assert "need a CUDA GPU" in out and "--emulated" in out


def test_check_emulated_runs_every_kernel_and_the_tiny_model(capsys) -> None:
    parser = argparse.ArgumentParser()
    check.add_check_parser(parser.add_subparsers())
    args = parser.parse_args(["check", "--emulated", "--arch", "sm_80", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "CUDA emulator (CPU)"
    names = [c["name"] for c in report["checks"]]
    assert "paged_attention d128 bfloat16" in names and "tiny model greedy float16" in names
    assert {"linear Q4_K float16", "embedding Q6_K float32", "matmul bfloat16"} <= set(names)
    assert "linear fused Q8_0+Q4_0 float16" in names
    # per float32 and float16: dense and 8 formats x (kernel, linear, embedding), one fused
    matmuls = 2 * (3 + 3 * len(GGUF_FORMATS) + 1) + 1
    assert len(names) == 3 * (11 + len(ATTENTION_HEAD_DIMS)) + matmuls + 2
    assert all(c["passed"] for c in report["checks"])
    assert {b["arch"] for b in report["builds"]} == {"sm_80"}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tiny_model_check_passes_on_the_emulator(dtype) -> None:
    result = self_check.model_check(CUDABackend(dtype, emulated=True), new_tokens=3)
    assert result.passed, result.detail


# ---- end to end on the emulated device -----------------------------------------------------
@pytest.fixture(scope="module")
def on_cpu():
    """path -> (CPU LoadedModel, its greedy tokens), loaded once per checkpoint."""
    from nanovllm.models.loader import load_model

    cache = {}

    def get(path):
        if path not in cache:
            model = load_model(str(path))
            cache[path] = model, model.greedy(PROMPT, NEW_TOKENS)
        return cache[path]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_float32_greedy_tokens_match_cpu_on_emulated_cuda(
    checkpoint_factory, on_cpu, kind
) -> None:
    from nanovllm.models.loader import load_model

    path = checkpoint_factory(kind)
    model = load_model(str(path), device="cuda-emulated", dtype="float32")
    assert model.greedy(PROMPT, NEW_TOKENS) == on_cpu(path)[1]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_float16_matches_cpu_up_to_near_ties(checkpoint_factory, on_cpu, kind) -> None:
    """float16 logits stay within 0.25 of the CPU's (std ~4), and greedy tokens agree until the
    first step where the CPU's top two logits are closer than twice that error."""
    from nanovllm.models.loader import load_model

    path = checkpoint_factory(kind)
    cpu, want = on_cpu(path)
    model = load_model(str(path), device="cuda-emulated")
    error = float(np.abs(model.logits(PROMPT) - cpu.logits(PROMPT)).max())
    assert error < 0.25
    must_agree = self_check.decisive_prefix(self_check.greedy_margins(cpu, PROMPT, want), error)
    assert model.greedy(PROMPT, NEW_TOKENS)[:must_agree] == want[:must_agree]


# Gemma 2 (sliding window over 8 of the 9 and 16 prompt tokens, soft caps, GeGLU) and Mixtral
# (grouped MoE kernels) through the engine's batched steps and padded decode buckets.
@pytest.mark.parametrize("kind", ["llama3", "gemma2", "mixtral"])
def test_llm_generate_on_emulated_cuda_matches_the_cpu_reference(checkpoint_factory, kind) -> None:
    from nanovllm import LLM, SamplingParams

    path = str(checkpoint_factory(kind))
    prompts = [prompt_ids(9), prompt_ids(16)]  # two lengths: one batch mixes prefill and decode
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outputs = {}
    for device in ("cpu-reference", "cuda-emulated"):
        llm = LLM(path, device=device, num_blocks=16, block_size=4)
        outputs[device] = [
            o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)
        ]
    assert outputs["cuda-emulated"] == outputs["cpu-reference"]
