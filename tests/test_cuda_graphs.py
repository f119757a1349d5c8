"""Decode through batch-size buckets (nanovllm/engine/cuda_graphs.py), without a GPU.

On the emulated CUDA device the padded-bucket path runs eagerly with the same static buffers,
padding and bucket choice a GPU's graphs replay, so these tests prove the padding logic, the
check of each bucket's first replay against the eager step, and the fall-back to eager decoding.
The capture code itself is exercised against a stand-in for CuPy's graph API.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from _fake_cupy import FakeCuPy
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine import cuda_graphs
from nanovllm.engine.batch import ForwardItem
from nanovllm.engine.cuda_graphs import (
    CapturedGraphs,
    DecodeGraphRunner,
    batch_buckets,
    bucket_for,
    relative_error,
)
from nanovllm.engine.model_runner import ModelRunner

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))


def make_llm(path: str, device: str = "cuda-emulated", **kwargs) -> LLM:
    dtype = "float32" if device == "cuda-emulated" else "auto"
    kwargs = {"num_blocks": 32, "block_size": 4, **kwargs}
    return LLM(path, device=device, dtype=dtype, **kwargs)


def generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def decode_item(block_table: list[int], position: int, token: int) -> ForwardItem:
    return ForwardItem(SimpleNamespace(block_table=block_table), position, [token], 1)


# ---- buckets --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("max_batch", "buckets"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (20, [1, 2, 4, 8, 16, 20]),
        (40, [1, 2, 4, 8, 16, 24, 32, 40]),
    ],
)
def test_buckets_are_powers_of_two_to_8_then_multiples_of_8_up_to_the_max(max_batch, buckets):
    assert batch_buckets(max_batch) == buckets


@pytest.mark.parametrize(("batch", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (17, 24), (40, 40)])  # fmt: skip
def test_a_batch_runs_in_the_smallest_bucket_that_holds_it(batch, bucket):
    assert bucket_for(batch_buckets(40), batch) == bucket


def test_relative_error_is_infinite_for_nan_or_another_shape():
    want = np.array([[10.0, -20.0]])
    assert relative_error(want + 0.2, want) == pytest.approx(0.01)
    assert relative_error(np.array([[np.nan, 0.0]]), want) == float("inf")
    assert relative_error(want[:, :1], want) == float("inf")


# ---- greedy parity ----------------------------------------------------------------------------
def test_padded_buckets_give_the_eager_and_cpu_tokens_as_the_batch_shrinks(model_path):
    """Five sequences finishing one after another: decode batches of 5, 4, 3, 2, 1 run in
    buckets 8, 4, 4, 2, 1, with 3, 0, 1, 0, 0 padding rows."""
    prompts = [prompt_ids(n) for n in (5, 8, 9, 12, 14)]
    max_tokens = [2, 3, 4, 5, 6]
    llm = make_llm(model_path)
    got = generate(llm, prompts, max_tokens)
    graphs = llm.engine.runner.decode_graphs
    assert dict(graphs.bucket_steps) == {8: 1, 4: 2, 2: 1, 1: 1}
    assert not graphs.eager
    assert got == generate(make_llm(model_path, enforce_eager=True), prompts, max_tokens)
    assert got == generate(make_llm(model_path, device="cpu-reference"), prompts, max_tokens)


def test_a_batch_of_three_pads_to_four_and_matches_the_cpu(model_path):
    prompts = [prompt_ids(n) for n in (6, 10, 13)]
    llm = make_llm(model_path)
    got = generate(llm, prompts, [4, 4, 4])
    assert dict(llm.engine.runner.decode_graphs.bucket_steps) == {4: 3}
    assert got == generate(make_llm(model_path, device="cpu-reference"), prompts, [4, 4, 4])


def test_speculative_verification_stays_eager_and_plain_decodes_use_buckets(model_path):
    prompts = [prompt_ids(n) for n in (6, 10, 13)]
    spec = dict(speculative_method="ngram", num_speculative_tokens=2)
    llm = make_llm(model_path, **spec)
    got = generate(llm, prompts, [8, 8, 8])
    assert llm.engine.stats().spec.num_drafts > 0  # verification steps ran (eagerly)
    assert sum(llm.engine.runner.decode_graphs.bucket_steps.values()) > 0
    assert got == generate(make_llm(model_path, device="cpu-reference", **spec), prompts, [8, 8, 8])


# ---- padding rows -------------------------------------------------------------------------------
def test_padding_rows_write_nothing_into_the_kv_cache(model_path):
    runner = make_llm(model_path).engine.runner
    rng = np.random.default_rng(0)
    for k_cache, v_cache in runner.kv_caches:  # noise everywhere, so any write shows
        k_cache[...] = rng.standard_normal(k_cache.shape)
        v_cache[...] = rng.standard_normal(v_cache.shape)
    before = [(k.copy(), v.copy()) for k, v in runner.kv_caches]
    items = [decode_item([3, 7], 5, 11), decode_item([9], 2, 12), decode_item([4, 5, 6], 9, 13)]
    logits = runner.decode_graphs.logits(items)  # three rows in bucket 4: one padding row
    assert runner.decode_graphs.bucket_steps == {4: 1}
    real_slots = {7 * 4 + 1, 9 * 4 + 2, 6 * 4 + 1}  # block * block_size + position % block_size
    for (k, v), (k0, v0) in zip(runner.kv_caches, before, strict=True):
        for cache, old in ((k, k0), (v, v0)):
            changed = np.any(cache != old, axis=(2, 3)).reshape(-1)
            assert set(np.flatnonzero(changed)) == real_slots
    np.testing.assert_allclose(logits, runner.eager_logits(items), rtol=1e-5, atol=1e-5)


def test_a_smaller_batch_turns_the_rows_left_over_from_a_larger_one_into_padding(model_path):
    graphs = make_llm(model_path).engine.runner.decode_graphs
    five = [decode_item([i + 1, i + 9], 6, 20 + i) for i in range(5)]
    graphs.logits(five)
    graphs.logits(five[:3])
    host = graphs.host
    assert host.slot_mapping[:4].tolist() == [9 * 4 + 2, 10 * 4 + 2, 11 * 4 + 2, -1]
    assert host.context_lens[:4].tolist() == [7, 7, 7, 1]
    assert host.block_tables[3].tolist() == [0] * graphs.max_blocks
    assert host.input_ids[3] == 0 and host.positions[3] == 0


def test_only_plain_decode_batches_take_the_bucket_path(model_path):
    graphs = make_llm(model_path, max_num_seqs=2).engine.runner.decode_graphs
    decode = decode_item([1], 2, 5)
    assert graphs.accepts([decode, decode])
    assert not graphs.accepts([])
    assert not graphs.accepts([decode] * 3)  # more rows than the largest bucket
    prefill = ForwardItem(SimpleNamespace(block_table=[1]), 0, [5, 6, 7], 1)
    assert not graphs.accepts([decode, prefill])
    verify = ForwardItem(SimpleNamespace(block_table=[1]), 2, [5, 6], 2)  # speculation
    assert not graphs.accepts([verify])
    chunk = ForwardItem(SimpleNamespace(block_table=[1]), 2, [5], 0)  # a prompt chunk
    assert not graphs.accepts([chunk])
    too_long = decode_item(list(range(graphs.max_blocks + 1)), 2, 5)
    assert not graphs.accepts([too_long])


# ---- first replay against the eager step, and the fall-back ------------------------------------
def reversed_vocab(monkeypatch) -> None:
    """Every replay returns its logits with the vocabulary reversed: a wrong, different argmax."""
    replay = DecodeGraphRunner._replay
    monkeypatch.setattr(DecodeGraphRunner, "_replay", lambda self, b: replay(self, b)[:, ::-1])


def test_a_replay_that_disagrees_with_eager_warns_and_decoding_continues_eagerly(
    model_path, monkeypatch, caplog
):
    prompts = [prompt_ids(n) for n in (6, 10, 13)]
    want = generate(make_llm(model_path, device="cpu-reference"), prompts, [4, 4, 4])
    reversed_vocab(monkeypatch)
    llm = make_llm(model_path)
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine"):
        got = generate(llm, prompts, [4, 4, 4])
    graphs = llm.engine.runner.decode_graphs
    assert graphs.eager
    assert graphs.bucket_steps == {4: 1}  # the first replay only; eager from then on
    assert "decoding eagerly" in caplog.text and "bucket 4" in caplog.text
    assert got == want


def test_self_check_replays_every_bucket_and_passes(model_path):
    graphs = make_llm(model_path, max_num_seqs=3).engine.runner.decode_graphs
    compared = []
    original = graphs._replay_checked
    graphs._replay_checked = lambda bucket, batch: (
        compared.append(bucket) or original(bucket, batch)
    )
    assert graphs.self_check()
    assert not graphs.eager
    assert compared == graphs.buckets
    # Serving does not compare a bucket's first replay again: the self-check did.
    graphs.logits([decode_item([1], 0, 5)])
    assert compared == graphs.buckets


def test_self_check_fails_on_a_wrong_replay_and_turns_graphs_off(model_path, monkeypatch, caplog):
    reversed_vocab(monkeypatch)
    graphs = make_llm(model_path, max_num_seqs=2).engine.runner.decode_graphs
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine"):
        assert not graphs.self_check()
    assert graphs.eager and "bucket 1" in caplog.text
    assert not graphs.accepts([decode_item([1], 2, 5)])


def test_a_capture_that_fails_leaves_the_engine_decoding_eagerly(model_path, monkeypatch, caplog):
    graphs = make_llm(model_path).engine.runner.decode_graphs

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "CapturedGraphs", fail)
    with caplog.at_level(logging.WARNING, logger="nanovllm.engine"):
        graphs.capture()
    assert graphs.eager and graphs.graphs is None
    assert "capturing failed: RuntimeError" in caplog.text


# ---- enforce_eager and the CPU ------------------------------------------------------------------
def test_enforce_eager_flag_is_parsed_into_the_engine_config():
    from nanovllm.cli import build_parser, engine_config

    parser = build_parser()
    base = ["generate", "--model", "m", "--prompt", "p"]
    assert engine_config(parser.parse_args(base)).enforce_eager is False
    assert engine_config(parser.parse_args([*base, "--enforce-eager"])).enforce_eager is True
    assert engine_config(parser.parse_args(["serve", "--enforce-eager"])).enforce_eager is True


def test_enforce_eager_must_be_a_bool():
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(model="m", enforce_eager="yes")


def test_the_cli_flag_turns_the_bucket_path_off(model_path, monkeypatch, capsys):
    from nanovllm.cli import main

    enabled = []
    enable = ModelRunner.enable_decode_graphs
    monkeypatch.setattr(
        ModelRunner,
        "enable_decode_graphs",
        lambda self, *args: enabled.append(args) or enable(self, *args),
    )
    argv = ["generate", "--model", model_path, "--device", "cuda-emulated", "--dtype", "float32",
            "--prompt", "Simple is", "--max-tokens", "2", "--ignore-eos", "--num-blocks", "16"]  # fmt: skip
    assert main(argv) == 0
    with_buckets = capsys.readouterr().out
    assert main([*argv, "--enforce-eager"]) == 0
    assert len(enabled) == 1  # only the run without the flag
    assert capsys.readouterr().out == with_buckets


def test_enforce_eager_and_the_cpu_backend_never_take_the_bucket_path(model_path):
    assert make_llm(model_path).engine.runner.decode_graphs is not None
    assert make_llm(model_path, enforce_eager=True).engine.runner.decode_graphs is None
    assert make_llm(model_path, device="cpu").engine.runner.decode_graphs is None


# ---- capture, against the stand-in for CuPy (tests/_fake_cupy.py) -------------------------------
def test_graphs_are_captured_largest_first_after_a_warm_up_on_a_private_pool():
    cupy, calls = FakeCuPy(), []

    def forward(bucket: int):
        stream = cupy.capturing()
        private = cupy.allocator is not None and cupy.allocator.__self__ is not cupy.default_pool
        calls.append((bucket, stream is not None, private))
        return cupy.full((bucket,), float(bucket), np.float32)  # from the private pool

    graphs = CapturedGraphs(cupy, forward, [1, 2, 4])
    # Each bucket: an eager warm-up, then the capture, on the private pool and the side stream.
    assert calls == [(4, False, True), (4, True, True), (2, False, True), (2, True, True),
                     (1, False, True), (1, True, True)]  # fmt: skip
    assert cupy.allocator is None and cupy.current is cupy.null_stream  # both restored
    assert cupy.default_pool.used_bytes() == 0 and graphs.pool.used_bytes() > 0
    assert graphs.replay(2).get().tolist() == [2.0, 2.0]  # the capture's output, filled by replay
    pool = graphs.pool
    graphs.release()
    assert pool.total_bytes() == pool.used_bytes() and not graphs.graphs


def test_a_failing_capture_still_ends_capture_mode():
    cupy = FakeCuPy()

    def forward(bucket: int):
        if cupy.capturing() is not None:
            raise RuntimeError("not capturable")

    with pytest.raises(RuntimeError, match="not capturable"):
        CapturedGraphs(cupy, forward, [1])
    assert all(stream.recording is None for stream in cupy.streams)
    assert cupy.current is cupy.null_stream and cupy.allocator is None
