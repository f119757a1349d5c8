"""Device memory on the CUDA path, without a GPU: KV-cache sizing against a faked device, and
GGUF weights kept at about their file's size.

The faked device is tests/_fake_cupy.py: a device of a given size with other processes' memory
on it, CuPy's memory pools (freed blocks stay cached) and every array counted while it lives.
An engine sized with `--num-blocks auto` then serves prefills at the token budget, sampled and
greedy decodes through CUDA graphs, and speculative verification with a draft model; the most
memory its pools ever held, plus the other processes', must stay within
`--gpu-memory-utilization` of the device.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from _fake_cupy import FakeCuPy
from _gguf_fixtures import write_quantized_qwen2
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.backends import memory
from nanovllm.backends.cuda import CUDABackend
from nanovllm.demo import demo_model_path
from nanovllm.engine import assembly
from nanovllm.engine.logits_processors import SamplingRow
from nanovllm.engine.sampler import Sampler, VerifyGroup

BACKEND = assembly.get_backend
MIB = 2**20


def fake_device(monkeypatch, total: int, other: int) -> FakeCuPy:
    fake = FakeCuPy(total_bytes=total, other_bytes=other)

    def backend(*args, **kwargs):
        backend = BACKEND(*args, **kwargs)
        return fake.attach(backend) if isinstance(backend, CUDABackend) else backend

    monkeypatch.setattr(assembly, "get_backend", backend)
    # The stand-in allocates nothing outside its pools (no cuBLAS workspace, no modules).
    monkeypatch.setattr(memory, "RUNTIME_BYTES", 0)
    return fake


def workload(llm: LLM) -> None:
    """Prompts longer than the token budget (chunked prefill), mixed sampling with logprobs."""
    vocab = llm.engine.model_config.vocab_size
    prompts = [[t % vocab for t in prompt_ids(16)] * (3 + i % 3) for i in range(10)]
    params = [
        SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=50, logprobs=5, seed=i)
        if i % 2
        else SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        for i in range(10)
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in outputs)


@pytest.mark.parametrize("draft", [None, "qwen3_qk_norm"])
def test_a_sized_engine_stays_within_the_memory_utilization(monkeypatch, checkpoint_factory, draft):
    total, other, utilization = 64 * MIB, 6 * MIB, 0.5
    fake = fake_device(monkeypatch, total, other)
    args = dict(device="cuda-emulated", dtype="float16", num_blocks="auto", block_size=4,
                gpu_memory_utilization=utilization, max_num_seqs=8, max_num_batched_tokens=64)  # fmt: skip
    if draft:
        args |= dict(draft_model=str(checkpoint_factory(draft)), num_speculative_tokens=2)
    llm = LLM(str(checkpoint_factory("llama3")), **args)
    graphs = llm.engine.runner.decode_graphs
    assert graphs.graphs is not None and not graphs.eager  # their pool is part of the peak
    runner = llm.engine.runner
    caches = runner.kv_caches + (runner.proposer.runner.kv_caches if draft else [])
    kv = sum(k.nbytes + v.nbytes for k, v in caches)
    assert kv > 0.5 * utilization * total  # the cache took most of the budget...
    workload(llm)
    if draft is None:
        assert sum(graphs.bucket_steps.values()) > 0  # decodes replayed graphs
    else:
        assert llm.engine.stats().spec.num_drafts > 0  # verification steps ran
    assert fake.peak_bytes <= utilization * total  # ...and steps never went past it


def test_sizing_without_the_reserve_would_overrun_the_budget(monkeypatch, checkpoint_factory):
    """The check above can fail: with no reserve for steps, the same engine goes past the
    budget."""
    total, other, utilization = 64 * MIB, 6 * MIB, 0.5
    fake = fake_device(monkeypatch, total, other)
    none = memory.Reserve(0, 0, 0, 0)
    monkeypatch.setattr(memory, "activation_reserve", lambda *args, **kwargs: none)
    llm = LLM(str(checkpoint_factory("llama3")), device="cuda-emulated", dtype="float16",
              num_blocks="auto", block_size=4, gpu_memory_utilization=utilization,
              max_num_seqs=8, max_num_batched_tokens=64)  # fmt: skip
    workload(llm)
    assert fake.peak_bytes > utilization * total


def test_the_sampler_stays_within_its_reserved_copies_of_the_logits():
    """Sampled rows of every kind (top-p, top-k with min-p, penalties, a nucleus past the first
    2048 candidates) with logprobs, then verification of k = 2 guesses: the most the sampler
    holds beyond its logits, in float32 [rows, vocab] copies."""
    fake = FakeCuPy()
    backend = SimpleNamespace(xp=fake, to_numpy=lambda x: x.get())
    rows, vocab = 24, 20000
    rng = np.random.default_rng(0)
    logits = fake.asarray((rng.standard_normal((rows, vocab)) * 3).astype(np.float32))
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=1.0, top_k=40, min_p=0.05),
        dict(temperature=0.7, top_p=0.5, repetition_penalty=1.2, frequency_penalty=0.3),
        dict(temperature=1.0, top_p=0.999),
    ]
    sampling = [
        SamplingRow(SamplingParams(logprobs=20, **kinds[i % 5]), [1, 2], [4, 5], None, [2])
        for i in range(rows)
    ]
    sampler = Sampler(0, backend)
    before = fake.peak_bytes
    sampler(logits, sampling)
    guesses = np.full((2, vocab), 1.0 / vocab, np.float32)
    sampler.verify(
        logits, [VerifyGroup(sampling[3 * g : 3 * g + 3], [5, 6], guesses) for g in range(8)]
    )
    copies = (fake.peak_bytes - before) / (rows * vocab * 4)
    assert 1 < copies <= memory.SAMPLER_ROW_COPIES


@pytest.mark.parametrize("max_num_seqs", [8, 32])
def test_the_graphs_pool_stays_within_its_reserve(monkeypatch, tmp_path, max_num_seqs):
    """What the decode graphs' private pool holds after capturing every bucket (the warm-up
    runs the same kernels as the capture: no dequantize scratch or cuBLAS there)."""
    fake = fake_device(monkeypatch, 1 << 40, 0)
    path = str(write_quantized_qwen2(tmp_path / "mix.gguf"))
    llm = LLM(path, device="cuda-emulated", dtype="float16", num_blocks=64, block_size=4,
              max_num_seqs=max_num_seqs)  # fmt: skip
    pool = llm.engine.runner.decode_graphs.graphs.pool
    reserve = memory.activation_reserve(llm.engine.config, [llm.engine.model_config],
                                        np.float16, graphs=True)  # fmt: skip
    logits_buffer = max_num_seqs * llm.engine.model_config.vocab_size * 4
    assert 0 < pool.total_bytes() <= reserve.decode_graphs - logits_buffer
    assert fake.default_pool.used_bytes() > 0  # weights, caches, the logits buffer elsewhere


def test_gguf_weights_take_about_their_file_size_on_the_device():
    """SmolLM2's Q4_1 file (Q8_0 embedding, tied) on the CUDA path: its blocks as stored, norms
    in the compute dtype, and the rotary table."""
    from nanovllm.models import load_model

    path = demo_model_path()
    model = load_model(str(path), device="cuda-emulated", dtype="float16").model
    weights = memory.weight_memory(model)
    assert weights.matrices == {"q4_1": 120, "q8_0": 1}  # 30 layers x (qkv, o, gate_up, down)
    file_size = path.stat().st_size
    assert 0.9 * file_size < weights.nbytes < 1.05 * file_size
    dense = load_model(str(path), device="cuda-emulated", dtype="float16", quantization="none")
    assert memory.weight_memory(dense.model).nbytes > 2.5 * file_size  # float16 everywhere


def test_the_dequantize_scratch_is_the_largest_matrix_or_the_slice_that_fits():
    backend = CUDABackend("float16", emulated=True)
    blocks = np.zeros((300, 34), np.uint8)  # 300 rows of one Q8_0 block (32 values)
    import gguf

    weight = backend.quantized_weight(gguf.GGMLQuantizationType.Q8_0, (300, 32), blocks)
    model = type("Model", (), {})()
    model.layers = [weight]
    assert memory.dequantize_scratch_bytes([model], np.float16, 2**20) == 300 * 32 * 2
    assert memory.dequantize_scratch_bytes([model], np.float16, 100 * 64) == 100 * 32 * 2


def test_start_up_logs_what_the_weights_take_on_the_device(tmp_path, caplog):
    import logging

    path = str(write_quantized_qwen2(tmp_path / "mix.gguf"))
    with caplog.at_level(logging.INFO, logger="nanovllm.engine"):
        LLM(path, device="cuda-emulated", dtype="float16", num_blocks=16)
    line = next(r.message for r in caplog.records if "model weights" in r.message)
    assert "in device memory" in line
    assert "2 Q4_1, 2 Q4_K, 2 Q5_0, 3 Q6_K, 3 Q8_0" in line  # q/k and v parts of the fused qkv


def test_quantization_flag_is_parsed_and_validated():
    from nanovllm.args import engine_config
    from nanovllm.cli import build_parser
    from nanovllm.config import EngineConfig

    parser = build_parser()
    base = ["generate", "--model", "m", "--prompt", "p"]
    assert engine_config(parser.parse_args(base)).quantization == "auto"
    assert (
        engine_config(parser.parse_args([*base, "--quantization", "none"])).quantization == "none"
    )
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--quantization", "awq"])
    with pytest.raises(ValueError, match="quantization must be one of auto, none"):
        EngineConfig(model="m", quantization="gguf")
