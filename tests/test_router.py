"""The data-parallel pieces without Ray: the router's policy, one replica driven by asyncio in this
process, and the single-process server's imports.

The router's prefix keys must be the block manager's own cache keys (the oracle: a BlockManager
that admitted the same prompt), or affinity would send requests to a replica that cannot hit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest
from test_block_manager import admit

from nanovllm import LLM
from nanovllm.config import EngineConfig
from nanovllm.distributed.replica import Accepted, EngineReplica, Failed, Refused
from nanovllm.distributed.router import AFFINITY_BLOCKS, Router
from nanovllm.engine.block_manager import BlockManager
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

BLOCK = 16


def token_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, size=length).tolist()


# ---- the router ------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [15, 16, 17, 33, 48, 49, 200])
def test_prefix_keys_are_the_block_managers_cache_keys_of_the_blocks_a_hit_can_use(length):
    prompt = token_prompt(length, seed=length)
    manager = BlockManager(32, BLOCK)
    seq, _ = admit(manager, prompt)
    manager.free_seq(seq)
    again, hits = admit(manager, prompt, seq_id=1)  # what a second request hits
    keys = Router(2, BLOCK, 8).prefix_keys(prompt, encode=None)
    assert len(keys) == min(len(hits), AFFINITY_BLOCKS)
    assert keys == again.block_hashes[: len(keys)]


def test_a_text_prompt_is_keyed_by_its_leading_tokens_only():
    router = Router(2, BLOCK, 8)
    calls = []

    def encode(text: str) -> list[int]:
        calls.append(len(text))
        return [ord(c) for c in text]  # one token per character

    long_text = "x" * 100_000
    keys = router.prefix_keys(long_text, encode)
    [tokenized] = calls  # a prefix of the text, long enough for the keys, not all of it
    assert AFFINITY_BLOCKS * BLOCK < tokenized < 1000
    assert keys == router.prefix_keys([ord("x")] * 200, encode=None)


def test_least_loaded_replica_takes_a_request_without_a_known_prefix():
    router = Router(3, BLOCK, 8)
    router.started(0, 2)
    router.started(1, 1)
    decision = router.choose("r", router.prefix_keys(token_prompt(40, 1), None), [True] * 3)
    assert (decision.engine, decision.reason) == (2, "least_loaded")
    router.started(2, 1)  # 2, 1, 1: ties go to the lower index
    assert router.choose("s", [], [True] * 3).engine == 1


def test_a_shared_prefix_goes_back_to_its_replica_unless_it_is_much_busier():
    router = Router(2, BLOCK, max_imbalance=3)
    shared = token_prompt(70, 2)  # 4 full blocks
    keys = router.prefix_keys(shared + [1, 2, 3], None)
    router.started(0, 1)  # replica 0 busy: the first request goes to 1
    assert router.choose("a", keys, [True, True]).engine == 1
    router.finished(0, 1)
    other_keys = router.prefix_keys(shared[:40] + token_prompt(30, 3), None)  # 2 shared blocks
    decision = router.choose("b", other_keys, [True, True])
    assert (decision.engine, decision.reason, decision.prefix_blocks) == (1, "prefix", 2)
    router.started(1, 4)  # 4 more than replica 0: more than max_imbalance
    decision = router.choose("c", keys, [True, True])
    assert (decision.engine, decision.reason, decision.affine) == (0, "prefix_too_busy", 1)


def test_a_replica_that_died_is_skipped_and_its_prefixes_forgotten():
    router = Router(2, BLOCK, 8)
    keys = router.prefix_keys(token_prompt(40, 4), None)
    router.started(0, 1)
    assert router.choose("a", keys, [True, True]).engine == 1
    assert router.choose("b", keys, [True, False]).engine == 0  # 1 is down
    router.choose("c", keys, [True, True])  # remembered on 0 now... then 0 dies:
    router.forget(0)
    router.finished(0, 1)
    decision = router.choose("d", keys, [True, True])
    assert (decision.engine, decision.reason) == (0, "least_loaded")
    assert router.choose("e", keys, [False, False]) is None


# ---- one replica, in this process ------------------------------------------------------------
@pytest.fixture(scope="module")
def replica(checkpoint_factory):
    config = EngineConfig(model=str(checkpoint_factory("llama3_long")), device="cpu")
    replica = EngineReplica(config, 0)
    yield replica
    replica.thread.stop()


def generate(replica, prompt, params, request_id="r", after_first=None) -> list:
    async def run():
        items = []
        async for item in replica.generate(request_id, [prompt], params, True):
            items.append(item)
            if after_first is not None and len(items) == 2:
                await after_first()
        return items

    return asyncio.run(run())


def test_a_replica_streams_accepted_then_the_engines_outputs(replica, checkpoint_factory):
    prompt = token_prompt(20, 5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = LLM(str(checkpoint_factory("llama3_long")), device="cpu").generate([prompt], params, use_tqdm=False)  # fmt: skip
    items = generate(replica, prompt, params.clone(output_kind=RequestOutputKind.DELTA))
    assert isinstance(items[0], Accepted)
    outputs = [output for batch in items[1:] for _, output in batch]
    assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == expected[0].outputs[0].token_ids  # fmt: skip
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])


def test_a_replica_refuses_what_add_request_refuses(replica):
    items = generate(replica, token_prompt(20, 6), SamplingParams(max_tokens=9000))
    assert len(items) == 1 and isinstance(items[0], Refused)
    assert "maximum length is 8192" in items[0].message


def test_an_aborted_stream_ends_and_frees_its_blocks(replica):
    params = SamplingParams(max_tokens=4000, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    counts = []

    async def abort():
        counts.append(await replica.abort("long"))

    generate(replica, token_prompt(20, 7), params, "long", after_first=abort)
    assert counts == [1]
    assert replica.subs == {}
    stats = wait_idle(replica)
    assert stats.num_free_blocks == stats.num_blocks == 512
    assert stats.num_running == stats.num_waiting == 0


def wait_idle(replica, timeout: float = 30.0):
    """The replica's stats once its engine has no request left (the abort is a command its
    engine thread runs between steps)."""
    deadline = time.monotonic() + timeout
    while replica.thread.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.01)
    while replica.thread.stats.num_free_blocks != replica.thread.stats.num_blocks:
        assert time.monotonic() < deadline, "the blocks never came back"
        time.sleep(0.01)
    return replica.thread.stats


def test_a_shutting_down_replica_ends_its_streams_with_a_failure(replica):
    params = SamplingParams(max_tokens=4000, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def shut_down():
        await replica.shut_down("the server is shutting down")

    items = generate(replica, token_prompt(20, 8), params, "s", after_first=shut_down)
    assert items[-1] == Failed("the server is shutting down", "shutting_down")


# ---- the single-process server ---------------------------------------------------------------
def test_the_single_process_server_never_imports_ray(checkpoint_factory):
    model = str(checkpoint_factory("llama3"))
    code = f"""
import sys
import time
import nanovllm.cli, nanovllm.server.cli, nanovllm.server.app
from nanovllm.config import EngineConfig
from nanovllm.server.serve import ServerConfig, build_state, start_engines
client, metrics = start_engines(EngineConfig(model={model!r}, device="cpu"), ServerConfig())
state = build_state(client, metrics, ServerConfig(), {{}}, "m")
client.start()
client.stop()
assert "ray" not in sys.modules, "ray was imported"
assert "nanovllm.distributed.ray_client" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
