"""Tensor parallelism with the in-process reference communicator: a model split over T ranks
(Megatron-style, nanovllm/models/sharding.py) computes what the whole model computes.

The oracle is the same checkpoint run whole (T = 1) on the same backend. Every tiny
architecture runs at T = 2 and T = 4; their models have 4 query heads and 2 KV heads (1 for
`tied`), so T = 4 (and T = 2 for `tied`) is above the KV-head count and replicates KV heads.

Tolerance: float32 logits of magnitude ~17 carry rounding noise of ~2e-5 wherever a sum is
split differently: the whole model at T = 1 is itself 1.3e-5 to 2.2e-5 away from the same model
in float64. A split matmul adds the same kind of noise, so the bound is 1e-5 of the largest logit
(2e-4 at most here); a sharding mistake moves logits by whole units.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from checkpoints import KINDS

from nanovllm import LLM, SamplingParams
from nanovllm.backends import get_backend
from nanovllm.backends.base import AttentionInputs
from nanovllm.config import EngineConfig
from nanovllm.distributed.communicator import CollectiveMismatch, ReferenceGroup
from nanovllm.distributed.ranks import LocalRanks
from nanovllm.engine.batch import StepInputs
from nanovllm.errors import NanovllmError
from nanovllm.models.loader import LoadedModel, load_checkpoint
from nanovllm.models.sharding import check_tensor_parallel

RELATIVE_TOLERANCE = 1e-5
MAX_POSITIONS = 256
BLOCK = 16
# Ids from every quarter of the 320-token vocabularies, so every rank's embedding shard is read.
PROMPT = [0, 5, 17, 42, 79, 80, 81, 99, 120, 159, 160, 161, 200, 239, 240, 241, 280, 300, 319, 7]


def one_sequence(ids: list[int]) -> StepInputs:
    """The prefill of one sequence in blocks 0, 1, ...: logits at every position."""
    n = len(ids)
    blocks = np.arange(-(-n // BLOCK), dtype=np.int32)[None, :]
    host = AttentionInputs.from_lists(np.arange(n), blocks, [0, n], [n])
    return StepInputs(np.asarray(ids, np.int64), np.arange(n, dtype=np.int64), host, np.arange(n))


def sharded_logits(checkpoint, backend, size: int, ids: list[int]) -> np.ndarray:
    ranks = LocalRanks.reference(checkpoint, backend, MAX_POSITIONS, size)
    ranks.allocate_kv_cache(-(-len(ids) // BLOCK), BLOCK)
    return ranks.execute(one_sequence(ids), BLOCK)


@pytest.mark.parametrize("device", ["cpu", "cuda-emulated"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_of_two_and_four_ranks_match_the_whole_model(checkpoint_factory, kind, device):
    checkpoint = load_checkpoint(str(checkpoint_factory(kind)))
    backend = get_backend(device, "float32")
    expected = LoadedModel(checkpoint, backend, MAX_POSITIONS).logits(PROMPT)
    bound = RELATIVE_TOLERANCE * float(np.abs(expected).max())
    for size in (2, 4):
        got = sharded_logits(checkpoint, backend, size, PROMPT)
        assert got.shape == expected.shape
        assert float(np.abs(got - expected).max()) <= bound, f"T = {size}"


def test_ranks_beyond_the_kv_heads_hold_copies_of_their_kv_head(checkpoint_factory):
    checkpoint = load_checkpoint(str(checkpoint_factory("llama3")))  # 2 KV heads
    ranks = LocalRanks.reference(checkpoint, get_backend("cpu-reference"), MAX_POSITIONS, 4)
    kv_rows = checkpoint.config.head_dim  # one KV head per rank
    whole = dict(checkpoint.weights())["model.layers.0.self_attn.k_proj.weight"]
    for rank, worker in enumerate(ranks.workers):
        model = worker.model
        assert (model.config.num_heads, model.config.num_kv_heads) == (1, 1)
        q_rows = model.config.num_heads * model.config.head_dim
        k = model.layers[0].qkv[q_rows : q_rows + kv_rows]
        head = rank // 2  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        np.testing.assert_array_equal(k, whole[head * kv_rows : (head + 1) * kv_rows])


GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=16)
ENGINE = dict(block_size=4, num_blocks=24, max_num_seqs=4, max_num_batched_tokens=16)


ENGINE_CASES = [("llama3", "cpu"), ("mistral", "cpu"), ("gemma2", "cpu"), ("qwen2_moe", "cpu"),
                ("qwen3_qk_norm", "cuda-emulated")]  # fmt: skip


@pytest.mark.parametrize("kind, device", ENGINE_CASES)
def test_a_sharded_engine_generates_what_the_whole_engine_generates(
    checkpoint_factory, kind, device
):
    """Batched, chunked and preempted (24 blocks of 4 tokens for 6 sequences; Mistral, whose
    window lets blocks go, is not preempted): the scheduler and sampler are the engine's own,
    only the forward runs on the ranks, so the schedule is the same step for step."""
    path = str(checkpoint_factory(kind))
    prompts = [PROMPT[i : i + n] for i, n in enumerate((13, 19, 9, 17, 11, 15))]
    whole = LLM(path, device=device, dtype="float32", **ENGINE)
    expected = [out.outputs[0].token_ids for out in whole.generate(prompts, GREEDY, use_tqdm=False)]
    sharded = LLM(path, device=device, dtype="float32", tensor_parallel_size=2, **ENGINE)
    got = [out.outputs[0].token_ids for out in sharded.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == expected
    stats, whole_stats = sharded.engine.stats(), whole.engine.stats()
    assert (stats.num_steps, stats.num_preemptions) == (whole_stats.num_steps, whole_stats.num_preemptions)  # fmt: skip
    assert stats.num_preemptions > 0 or kind == "mistral"
    assert stats.num_free_blocks == 24


def test_sizes_the_heads_cannot_be_split_into_are_refused_before_loading(checkpoint_factory):
    config = load_checkpoint(str(checkpoint_factory("llama3"))).config  # 4 heads, 2 KV heads
    with pytest.raises(NanovllmError, match="4 attention heads.*not divisible by 3"):
        check_tensor_parallel(config, 3)
    with pytest.raises(NanovllmError, match="intermediate_size 130 is not divisible by 4"):
        check_tensor_parallel(dataclasses.replace(config, intermediate_size=130), 4)
    with pytest.raises(ValueError, match="draft model is not supported"):
        EngineConfig(model="m", draft_model="d", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(model="m", tensor_parallel_size=0)


# ---- the reference group -------------------------------------------------------------------
def test_all_reduce_sums_and_all_gather_joins_in_rank_order():
    group = ReferenceGroup(3)
    comms = group.communicators()
    parts = [np.full((2, 2), 10.0**rank, dtype=np.float32) for rank in range(3)]

    def rank_main(rank):
        return comms[rank].all_reduce(parts[rank]), comms[rank].all_gather(parts[rank])

    results = group.run([lambda r=r: rank_main(r) for r in range(3)])
    for total, joined in results:
        np.testing.assert_array_equal(total, np.full((2, 2), 111.0))
        np.testing.assert_array_equal(joined, np.concatenate(parts, axis=-1))
    assert results[0][0] is not results[1][0]  # each rank owns its result


def run_bounded(group: ReferenceGroup, fns, seconds: float = 30.0):
    """group.run in a thread; fails (instead of hanging the suite) if it never returns."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = group.run(fns)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the group hung"
    return outcome


def test_a_rank_that_raises_ends_the_group_with_its_error():
    group = ReferenceGroup(2)
    comms = group.communicators()

    def fails():
        raise ValueError("rank 1 is broken")

    outcome = run_bounded(group, [lambda: comms[0].all_reduce(np.ones(3)), fails])
    assert isinstance(outcome["error"], ValueError)


def test_ranks_that_disagree_on_their_collectives_get_an_error_not_a_hang():
    group = ReferenceGroup(2)
    comms = group.communicators()
    twice = lambda: [comms[0].all_reduce(np.ones(3)) for _ in range(2)]  # noqa: E731
    outcome = run_bounded(group, [twice, lambda: comms[1].all_reduce(np.ones(3))])
    assert isinstance(outcome["error"], CollectiveMismatch)
    outcome = run_bounded(
        group, [lambda: comms[0].all_reduce(np.ones(3)), lambda: comms[1].all_reduce(np.ones(4))]
    )
    assert isinstance(outcome["error"], CollectiveMismatch)
    assert "(3,) float64, (4,) float64" in str(outcome["error"])
