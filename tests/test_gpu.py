"""On a real CUDA GPU (marker `cuda`; `scripts/gpu_validate.sh` runs these on a lent machine): the
engine's start-up self-check, decode steps captured as CUDA graphs and replayed with the CPU
reference's tokens, GGUF weights kept quantized in device memory, and `--num-blocks auto`
keeping the process within `--gpu-memory-utilization` (read from the device itself).

Without a GPU these are skipped: everything else in the suite runs the same code on the CUDA
emulator, and the GPU-only glue against tests/_fake_cupy.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gguf_fixtures import write_quantized_qwen2
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.backends import cuda_available
from nanovllm.backends.memory import weight_memory

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU"),
]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def generate(llm: LLM, lengths=(5, 9, 12)) -> list[list[int]]:
    vocab = llm.engine.model_config.vocab_size
    prompts = [[t % vocab for t in prompt_ids(n)] for n in lengths]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    """The self-check runs for real here (a pass remembered from another run would skip it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOVLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.mark.parametrize("kind", ["llama3", "gemma2", "mixtral"])
def test_decode_graphs_are_captured_and_give_the_cpu_tokens_in_float32(checkpoint_factory, kind):
    path = str(checkpoint_factory(kind))
    llm = LLM(path, device="cuda", dtype="float32", num_blocks=64, block_size=4, max_num_seqs=4)
    graphs = llm.engine.runner.decode_graphs
    assert graphs.graphs is not None and not graphs.eager  # captured, first replays checked
    got = generate(llm)
    assert sum(graphs.bucket_steps.values()) > 0 and not graphs.eager
    assert got == generate(LLM(path, device="cpu-reference", num_blocks=64, block_size=4))
    eager = LLM(path, device="cuda", dtype="float32", num_blocks=64, block_size=4,
                enforce_eager=True)  # fmt: skip
    assert got == generate(eager)


def test_float16_logits_stay_close_to_the_reference(checkpoint_factory):
    from nanovllm.models.loader import load_model

    path = str(checkpoint_factory("llama3"))
    ids = prompt_ids(16)
    got = load_model(path, device="cuda", dtype="float16").logits(ids, chunks=[12, 4])
    want = load_model(path, device="cpu-reference").logits(ids)
    assert np.abs(got - want).max() < 0.25


def test_the_self_check_runs_and_remembers_its_pass(checkpoint_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    path = str(checkpoint_factory("llama3"))
    LLM(path, device="cuda", dtype="float16", num_blocks=16)
    markers = list((tmp_path / "cache" / "selfcheck").iterdir())
    assert len(markers) == 1 and '"driver"' in markers[0].read_text()


def test_gguf_weights_stay_quantized_on_the_device_and_match_the_reference(tmp_path):
    path = str(write_quantized_qwen2(tmp_path / "mix.gguf"))
    llm = LLM(path, device="cuda", dtype="float32", num_blocks=64, block_size=4, max_num_seqs=4)
    model = llm.engine.runner.model
    assert set(weight_memory(model).matrices) == {"q8_0", "q6_k", "q5_0", "q4_1", "q4_k"}
    dense = LLM(path, device="cuda", dtype="float32", num_blocks=64, quantization="none")
    assert weight_memory(model).nbytes < 0.4 * weight_memory(dense.engine.runner.model).nbytes
    assert generate(llm) == generate(LLM(path, device="cpu-reference", num_blocks=64, block_size=4))


def test_auto_kv_sizing_keeps_the_process_within_the_utilization(checkpoint_factory):
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    pool = cupy.get_default_memory_pool()
    in_use = total - free - pool.free_bytes()
    utilization = min(1.0, (in_use + 2**30) / total)  # one GiB for this engine
    llm = LLM(str(checkpoint_factory("llama3")), device="cuda", dtype="float16",
              num_blocks="auto", gpu_memory_utilization=utilization, max_num_seqs=16,
              max_num_batched_tokens=256)  # fmt: skip
    prompts = [prompt_ids(24) * 4 for _ in range(16)]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, logprobs=5)
    llm.generate(prompts, params, use_tqdm=False)
    free, total = cupy.cuda.runtime.memGetInfo()
    assert total - free <= utilization * total  # pools keep their blocks: this is the peak
