"""CUDA-graph capture of the real model's decode step, without a GPU.

The engine runs on the emulated CUDA device with tests/_fake_cupy.py standing in for CuPy: the
backend's kernels are the real kernels/ on the CPU emulator, and the stand-in enforces CuPy
14.2's rules while a stream captures (cuBLAS refused, no host transfers or synchronization,
allocations from the graph's private pool) and records the captured work, which runs only when
the graph is launched. So `CapturedGraphs` captures the real model's padded decode forward
(dense or GGUF weights, fused parts of mixed types), every bucket's first replay is compared
with the eager step at start-up, and decoding then replays the graphs; the tokens must be the
CPU reference's.

A decode step that calls cuBLAS, as every linear() did before the decode matmul kernels, cannot
be captured: CuPy raises, and the engine falls back to eager decoding.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from _fake_cupy import DeviceArray, FakeCuPy, Graph, MemoryPool
from _gguf_fixtures import write_quantized_qwen2
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.backends.cuda import CUDABackend
from nanovllm.engine import assembly
from nanovllm.engine.batch import ForwardItem

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
BACKEND = assembly.get_backend


@pytest.fixture(scope="module")
def llama_path(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))


@pytest.fixture(scope="module")
def quantized_path(tmp_path_factory) -> str:
    return str(write_quantized_qwen2(tmp_path_factory.mktemp("gguf") / "qwen2-mix.gguf"))


def fake_llm(monkeypatch, path: str, dtype: str, **kwargs) -> tuple[LLM, FakeCuPy]:
    """An engine on the emulated device whose array module is the CuPy stand-in (the one in use
    from now on: arrays of an earlier one must not be used after this)."""
    fake = FakeCuPy()

    def backend(*args, **kwargs):
        backend = BACKEND(*args, **kwargs)
        return fake.attach(backend) if isinstance(backend, CUDABackend) else backend

    monkeypatch.setattr(assembly, "get_backend", backend)
    kwargs = {"num_blocks": 32, "block_size": 4, "max_num_seqs": 4, **kwargs}
    llm = LLM(path, device="cuda-emulated", dtype=dtype, **kwargs)
    return llm, fake


def generate(llm: LLM, lengths=(5, 9, 12)) -> list[list[int]]:
    vocab = llm.engine.model_config.vocab_size
    prompts = [[token % vocab for token in prompt_ids(n)] for n in lengths]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


# ---- the real model's decode step --------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "dtype"), [("llama", "float32"), ("llama", "float16"), ("quantized", "float32")]
)
def test_the_decode_step_is_captured_and_replays_give_the_eager_and_cpu_tokens(
    monkeypatch, llama_path, quantized_path, model, dtype
):
    path = llama_path if model == "llama" else quantized_path
    llm, fake = fake_llm(monkeypatch, path, dtype)
    graphs = llm.engine.runner.decode_graphs
    assert graphs.graphs is not None and not graphs.eager  # captured, and the self-check passed
    assert sorted(graphs.graphs.graphs) == graphs.buckets == [1, 2, 4]
    launches = fake.graph_launches
    assert launches == len(graphs.buckets)  # the self-check replayed each bucket once
    got = generate(llm)
    assert dict(graphs.bucket_steps) == {4: 5} and fake.graph_launches == launches + 5
    eager, _ = fake_llm(monkeypatch, path, dtype, enforce_eager=True)
    assert got == generate(eager)
    if dtype == "float32":  # float16 may break a near-tie of the CPU's float32 either way
        assert got == generate(LLM(path, device="cpu", num_blocks=32, block_size=4))


@pytest.mark.parametrize("kind", ["gemma2", "qwen2_moe"])
def test_gemma_and_moe_decode_steps_are_captured_too(monkeypatch, checkpoint_factory, kind):
    """Gemma scales its embedding by a NumPy scalar (a 0-d NumPy array is no CuPy operand);
    the experts' routing and grouped matmuls run on device-sized grids, never reading back."""
    path = str(checkpoint_factory(kind))
    llm, _ = fake_llm(monkeypatch, path, "float32", max_num_seqs=2)
    graphs = llm.engine.runner.decode_graphs
    assert graphs.graphs is not None and not graphs.eager
    assert generate(llm, (6, 9)) == generate(
        LLM(path, device="cpu", num_blocks=32, block_size=4), (6, 9)
    )


def test_a_replay_reads_the_inputs_of_its_step_not_those_of_the_capture(
    monkeypatch, quantized_path
):
    """Three sequences at other positions and blocks than any the graphs saw: the replayed
    logits must be those of the eager step on the same rows."""
    llm, fake = fake_llm(monkeypatch, quantized_path, "float32")
    runner = llm.engine.runner
    rng = np.random.default_rng(0)
    for k_cache, v_cache in runner.kv_caches:  # a context to attend to
        k_cache[...] = fake.asarray(rng.standard_normal(k_cache.shape).astype(np.float32))
        v_cache[...] = fake.asarray(rng.standard_normal(v_cache.shape).astype(np.float32))
    items = [decode(5, [3, 7, 2], 9), decode(17, [1], 2), decode(40, [4, 5, 6], 10)]
    before = fake.graph_launches
    got = runner.backend.to_numpy(runner.decode_graphs.logits(items))
    assert fake.graph_launches == before + 1  # bucket 4, checked at start-up: one replay
    want = runner.backend.to_numpy(runner.eager_logits(items))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_graph_that_misses_a_step_is_caught_at_start_up(monkeypatch, llama_path, caplog):
    """Replays that skip the last recorded step (the copy into the logits buffer) leave what
    capture allocated: the start-up check sees the difference and turns graphs off."""
    launch = Graph.launch
    monkeypatch.setattr(Graph, "launch", lambda self, stream=None: launch(Graph(self.work[:-1])))
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine"):
        llm, _ = fake_llm(monkeypatch, llama_path, "float32")
    assert llm.engine.runner.decode_graphs.eager
    assert "the replay of batch-size bucket 1 differs from the eager step" in caplog.text


def decode(token: int, block_table: list[int], position: int) -> ForwardItem:
    return ForwardItem(SimpleNamespace(block_table=block_table), position, [token], 1)


def test_a_decode_step_that_calls_cublas_cannot_be_captured(monkeypatch, llama_path, caplog):
    """Before the decode matmul kernels every linear() went to cuBLAS through CuPy."""
    monkeypatch.setattr(CUDABackend, "_kernel_rows", lambda self, rows, weight: False)
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine"):
        llm, _ = fake_llm(monkeypatch, llama_path, "float32")
    graphs = llm.engine.runner.decode_graphs
    assert graphs.eager and graphs.graphs is None
    assert "calling cuBLAS API during stream capture is currently unsupported" in caplog.text
    assert generate(llm) == generate(LLM(llama_path, device="cpu", num_blocks=32, block_size=4))


# ---- the stand-in's rules, on their own ----------------------------------------------------------
@pytest.fixture
def capturing():
    """A FakeCuPy with a side stream capturing on a private pool."""
    fake = FakeCuPy()
    pool, stream = MemoryPool(), fake.cuda.Stream(non_blocking=True)
    with fake.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        yield fake, stream


def test_captured_work_runs_only_at_launch_with_the_inputs_of_that_time():
    fake = FakeCuPy()
    x = fake.asarray(np.arange(4, dtype=np.float32))
    pool, stream = MemoryPool(), fake.cuda.Stream(non_blocking=True)
    with fake.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        y = x * 2 + 1
        graph = stream.end_capture()
    assert np.isnan(y.get()).all()  # recorded, not run: the new array is poison
    x[...] = 10.0
    graph.launch()
    assert y.get().tolist() == [21.0] * 4
    assert pool.used_bytes() > 0 and fake.default_pool.used_bytes() == 512  # x only


def test_cublas_is_refused_during_capture(capturing):
    fake, _ = capturing
    a = DeviceArray.fake.empty((2, 2), np.float32)
    with pytest.raises(NotImplementedError, match="cuBLAS API during stream capture"):
        a @ a
    with pytest.raises(NotImplementedError, match="cuBLAS"):
        fake.dot(a, a)


def test_host_transfers_are_refused_during_capture(capturing):
    fake, _ = capturing
    a = fake.empty((3,), np.float32)
    with pytest.raises(RuntimeError, match="D2H transfers are disallowed"):
        a.get()
    with pytest.raises(RuntimeError, match="D2H"):
        bool(a.sum() > 0)
    with pytest.raises(RuntimeError, match="H2D transfers are disallowed"):
        fake.asarray(np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="H2D"):
        a[np.array([0, 1])]  # a NumPy index is uploaded


def test_synchronizing_during_capture_fails_and_invalidates_it(capturing):
    fake, stream = capturing
    with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureUnsupported"):
        stream.synchronize()
    with pytest.raises(RuntimeError, match="invalidated"):
        stream.end_capture()


def test_allocations_during_capture_must_come_from_a_private_pool():
    fake = FakeCuPy()
    stream = fake.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="shared memory pool during graph capture"):
            fake.empty((4,), np.float32)
        stream.end_capture()
    with pytest.raises(RuntimeError, match="legacy"):
        fake.null_stream.begin_capture()


def test_numpy_arrays_are_no_operands_of_device_work():
    fake = FakeCuPy()
    a = fake.zeros((3,), np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        a * np.asarray(2.0, np.float32)  # a 0-d array is no scalar to CuPy
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        a[...] = np.ones(3, np.float32)
    assert (a + np.float32(2)).get().tolist() == [2.0] * 3  # a NumPy scalar is
