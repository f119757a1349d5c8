"""Scheduler policy (token budget, chunked prefill, max_num_seqs, preemption of the newest) and
block accounting under random programs of add_request / step / abort_request.

The property test drives the real LLMEngine, Scheduler, BlockManager and ModelRunner with a
fake model (TokenCacheModel below) in place of the transformer. Why a fake and not a 1-layer
model: it is far cheaper per step, so hypothesis runs hundreds of programs in seconds, and it
checks more than a model could. Its "KV cache" holds token ids: each step it writes every
input token into the slot the runner gave it, and computes each row's next token from the
context it reads back through the row's block table. The next token is a pure function of
that context, so every request has exactly one right output whatever the batching,
preemption or prefix hits, and a block shared or recycled while still in use shows up as a
wrong token at a known position, not as a slightly different logit.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nanovllm.backends import get_backend
from nanovllm.config import EngineConfig
from nanovllm.engine.assembly import Models, assemble, length_limit, model_info
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Request, Sequence, SequenceStatus
from nanovllm.engine.step import SchedulerOutput
from nanovllm.models.loader import load_checkpoint
from nanovllm.sampling_params import SamplingParams

# ---- the scheduler alone --------------------------------------------------------------------


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=512) -> Scheduler:
    config = EngineConfig(
        model="unused",
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
    )
    return Scheduler(config, BlockManager(num_blocks, block_size))


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    token_ids = [1000 * (seq_id + 1) + i for i in range(num_tokens)]
    params = SamplingParams(max_tokens=100)
    return Sequence(seq_id, Request(str(seq_id), None, token_ids, params), 0, token_ids, params)


def finish_step(scheduler: Scheduler, batch: SchedulerOutput) -> None:
    """What the engine does after the model ran: advance, cache, append a token where due."""
    for item in batch.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_tokens
        scheduler.block_manager.cache_computed_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


def scheduled(batch: SchedulerOutput) -> list[tuple[int, int]]:
    return [(item.seq.seq_id, item.num_tokens) for item in batch.scheduled]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    scheduler = make_scheduler(budget=8)
    scheduler.add(make_seq(0, 20))
    steps = []
    for _ in range(4):
        batch = scheduler.schedule()
        steps.append(scheduled(batch))
        finish_step(scheduler, batch)
    assert steps == [[(0, 8)], [(0, 8)], [(0, 4)], [(0, 1)]]


def test_running_decodes_come_first_and_waiting_prefills_fill_the_rest_of_the_budget():
    scheduler = make_scheduler(budget=8)
    scheduler.add(make_seq(0, 3))
    finish_step(scheduler, scheduler.schedule())
    scheduler.add(make_seq(1, 20))
    scheduler.add(make_seq(2, 5))
    batch = scheduler.schedule()
    assert scheduled(batch) == [(0, 1), (1, 7)]
    assert batch.num_tokens == 8
    assert [seq.seq_id for seq in scheduler.waiting] == [2]


def test_admission_stops_at_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    for seq_id in range(3):
        scheduler.add(make_seq(seq_id, 4))
    batch = scheduler.schedule()
    assert scheduled(batch) == [(0, 4), (1, 4)]
    assert [seq.seq_id for seq in scheduler.waiting] == [2]


def test_waiting_sequences_are_admitted_first_come_first_served():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    scheduler.add(make_seq(0, 12))  # 3 blocks
    scheduler.add(make_seq(1, 8))  # 2 blocks: does not fit next to seq 0
    scheduler.add(make_seq(2, 3))  # 1 block: would fit, but must not overtake seq 1
    batch = scheduler.schedule()
    assert scheduled(batch) == [(0, 12)]
    assert [seq.seq_id for seq in scheduler.waiting] == [1, 2]


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_seq(0, 8), make_seq(1, 7)
    scheduler.add(old)
    scheduler.add(new)
    finish_step(scheduler, scheduler.schedule())  # 2 + 2 blocks; old now needs a third
    manager = scheduler.block_manager
    assert manager.num_free_blocks == 0

    batch = scheduler.schedule()
    assert batch.preempted == [new]
    assert scheduled(batch) == [(0, 1)]
    assert list(scheduler.waiting) == [new] and scheduler.running == [old]
    assert new.status is SequenceStatus.WAITING
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    assert len(old.block_table) == 3
    assert manager.num_free_blocks == 1


def test_a_preempted_sequence_goes_back_in_front_of_the_queue():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new, queued = make_seq(0, 8), make_seq(1, 7), make_seq(2, 2)
    scheduler.add(old)
    scheduler.add(new)
    finish_step(scheduler, scheduler.schedule())
    scheduler.add(queued)
    scheduler.schedule()
    assert [seq.seq_id for seq in scheduler.waiting] == [1, 2]


def test_the_newest_sequence_preempts_itself_rather_than_an_older_one():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    old, new = make_seq(0, 6), make_seq(1, 4)
    scheduler.add(old)
    scheduler.add(new)
    finish_step(scheduler, scheduler.schedule())  # old: 2 blocks, room left; new: 1 full block
    batch = scheduler.schedule()
    assert batch.preempted == [new]
    assert scheduled(batch) == [(0, 1)]


def test_no_sequence_is_admitted_in_a_step_that_preempted():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_seq(0, 8), make_seq(1, 7)
    scheduler.add(old)
    scheduler.add(new)
    finish_step(scheduler, scheduler.schedule())
    batch = scheduler.schedule()
    assert batch.preempted == [new]
    assert [seq.seq_id for seq in batch.seqs] == [0]  # new is not re-admitted into the free block


def test_a_preempted_sequence_is_recomputed_from_its_cached_blocks():
    scheduler = make_scheduler(num_blocks=5, block_size=4)
    old, new = make_seq(0, 8), make_seq(1, 9)
    scheduler.add(old)
    scheduler.add(new)
    finish_step(scheduler, scheduler.schedule())  # old 2 blocks, new 3 blocks (2 full, cached)
    new_full_blocks = new.block_table[:2]
    finish_step(scheduler, scheduler.schedule())  # old takes its third block: new is preempted
    assert list(scheduler.waiting) == [new]
    scheduler.finish(old)
    batch = scheduler.schedule()
    assert new.block_table[:2] == new_full_blocks
    # 11 known tokens (9 prompt + 1 sampled + the one pending): 2 cached blocks, 3 recomputed.
    assert scheduled(batch) == [(1, new.num_tokens - 8)]
    assert new.num_computed_tokens == 8


# ---- block accounting under random programs -------------------------------------------------

EOS = 2
VOCAB = 300


def next_token(context: list[int]) -> int:
    """The fake model's next token; one in 8 is EOS, so requests also stop on their own."""
    h = zlib.crc32(np.asarray(context, dtype=np.int64).tobytes())
    return EOS if h % 8 == 0 else 3 + h % (VOCAB - 3)


class TokenCacheModel:
    """Has the model interface the runner uses (config, forward, compute_logits)."""

    def __init__(self, config, num_blocks: int, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.cache = np.full(num_blocks * block_size, -1, dtype=np.int64)

    def read(self, block_table, length: int) -> list[int]:
        positions = np.arange(length)
        table = np.asarray(block_table, dtype=np.int64)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        return self.cache[slots].tolist()

    def forward(self, input_ids, positions, meta, kv_caches):
        input_ids, positions = np.asarray(input_ids), np.asarray(positions)
        slots = np.asarray(meta.slot_mapping)
        assert len(np.unique(slots)) == len(slots), "two tokens written to one KV slot in one step"
        self.cache[slots] = input_ids
        hidden = np.zeros((len(input_ids), 1), dtype=np.float32)
        starts = meta.query_start_host
        for i in range(len(starts) - 1):
            for row in range(starts[i], starts[i + 1]):
                context = self.read(meta.block_tables_host[i], int(positions[row]) + 1)
                hidden[row, 0] = next_token(context)
        return hidden

    def compute_logits(self, hidden):
        tokens = np.asarray(hidden)[:, 0].astype(np.int64)
        logits = np.zeros((len(tokens), self.config.vocab_size), dtype=np.float32)
        logits[np.arange(len(tokens)), tokens] = 10.0
        return logits


def expected_output(prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    token_ids = list(prompt)
    while True:
        token_ids.append(next_token(token_ids))
        out = token_ids[len(prompt) :]
        if not params.ignore_eos and out[-1] == EOS:
            return out
        if len(out) >= params.max_tokens or len(token_ids) >= max_model_len:
            return out


class Harness:
    """An LLMEngine running the fake model, and the checks that must hold after every operation."""

    def __init__(self, model: str, num_blocks, block_size, max_num_seqs, budget, caching) -> None:
        config = EngineConfig(
            model=model,
            device="cpu",
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            enable_prefix_caching=caching,
        )
        checkpoint = load_checkpoint(model)
        self.model = TokenCacheModel(checkpoint.config, num_blocks, block_size)
        info = model_info(checkpoint, length_limit(config, checkpoint.config))
        self.engine = assemble(config, info, get_backend("cpu"), Models(self.model))
        assert set(self.engine.eos_token_ids) == {0, EOS}  # next_token never gives 0
        self.requests: list[Request] = []
        self.aborted: set[str] = set()
        self.finished: dict[str, list[list[int]]] = {}

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def add(self, prompt: list[int], max_tokens: int, n: int, ignore_eos: bool) -> None:
        prompt = prompt[: self.max_model_len - 1]
        max_tokens = min(max_tokens, self.max_model_len - len(prompt))
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=0)
        self.requests.append(self.engine.add_request(str(len(self.requests)), prompt, params))

    def step(self) -> None:
        for output in self.engine.step():
            if output.finished:
                assert output.request_id not in self.finished, "a request finished twice"
                self.finished[output.request_id] = [c.token_ids for c in output.outputs]

    def abort(self, pick: int) -> None:
        live = [r for r in self.requests if not r.is_finished and r.request_id not in self.aborted]
        if not live:
            return
        request = live[pick % len(live)]
        assert self.engine.abort_request(request.request_id)
        self.aborted.add(request.request_id)
        assert all(not seq.block_table for seq in request.seqs), "abort kept blocks"

    def check(self) -> None:
        engine, manager = self.engine, self.engine.block_manager
        scheduler = engine.scheduler
        seqs = [seq for request in self.requests for seq in request.seqs]
        holders = [0] * manager.num_blocks
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
            for block_id in seq.block_table:
                holders[block_id] += 1
        assert [b.ref_count for b in manager.blocks] == holders, "ref counts != table holders"
        assert set(manager.free) == {b for b, n in enumerate(holders) if n == 0}
        assert len(manager.free) + sum(1 for n in holders if n) == manager.num_blocks
        for h, block_id in manager.cached.items():
            assert manager.blocks[block_id].hash == h
        for seq in seqs:
            if seq.is_finished or seq.status is SequenceStatus.WAITING:
                assert seq.block_table == [], f"{seq.status.name} seq {seq.seq_id} holds blocks"
        assert len(scheduler.running) <= engine.config.max_num_seqs
        for seq in scheduler.running:
            assert seq.status is SequenceStatus.RUNNING
            context = self.model.read(seq.block_table, seq.num_computed_tokens)
            assert context == seq.token_ids[: seq.num_computed_tokens], "KV of another sequence"
        stats = engine.stats()
        assert stats.num_blocks == manager.num_blocks
        assert 0 <= stats.num_free_blocks <= stats.num_blocks
        assert stats.num_free_blocks == holders.count(0)
        cached_free = sum(1 for b in manager.free if manager.blocks[b].hash is not None)
        assert stats.num_cached_free_blocks == cached_free, "cached-free counter drifted"

    def drain(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.engine.has_unfinished_requests():
                break
            self.step()
            self.check()
        assert not self.engine.has_unfinished_requests(), "requests never finish (livelock)"


PROMPT_BASE = list(range(10, 60))  # shared prefixes give prefix-cache hits and shared blocks

add_op = st.tuples(
    st.just("add"),
    st.integers(0, 20),  # tokens shared with PROMPT_BASE
    st.lists(st.integers(3, VOCAB - 1), min_size=0, max_size=12),
    st.integers(1, 12),  # max_tokens
    st.integers(1, 3),  # n
    st.booleans(),  # ignore_eos
)
operation = st.one_of(
    add_op,
    add_op,
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
)


@pytest.fixture(scope="module")
def model_folder(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))  # only its tokenizer and config are used


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    num_blocks=st.integers(3, 16),
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(2, 32),
    caching=st.booleans(),
    program=st.lists(operation, min_size=3, max_size=40),
)
def test_random_programs_keep_block_accounting_exact(
    model_folder, num_blocks, block_size, max_num_seqs, budget, caching, program
):
    harness = Harness(model_folder, num_blocks, block_size, max_num_seqs, budget, caching)
    for op, *args in program:
        if op == "add":
            shared, suffix, max_tokens, n, ignore_eos = args
            prompt = PROMPT_BASE[:shared] + suffix
            if not prompt:
                continue
            harness.add(prompt, max_tokens, n, ignore_eos)
        elif op == "step":
            for _ in range(args[0]):
                harness.step()
                harness.check()
        else:
            harness.abort(args[0])
        harness.check()
    harness.drain()

    stats = harness.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_running == stats.num_waiting == 0
    # Shown by --hypothesis-show-statistics: how often the programs meet each situation.
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hits > 0}")
    event(f"aborted: {bool(harness.aborted)}")
    stopped = any(seq.finish_reason == "stop" for r in harness.requests for seq in r.seqs)
    event(f"stopped at EOS: {stopped}")
    for request in harness.requests:
        if request.request_id in harness.aborted:
            assert request.request_id not in harness.finished
            continue
        expected = expected_output(request.prompt_token_ids, request.params, harness.max_model_len)
        assert harness.finished[request.request_id] == [expected] * request.params.n


@pytest.fixture
def crowded(model_folder) -> Harness:
    harness = Harness(
        model_folder, num_blocks=6, block_size=2, max_num_seqs=4, budget=8, caching=True
    )
    for i in range(4):
        harness.add(PROMPT_BASE[: 2 + i], max_tokens=8, n=1, ignore_eos=True)
    return harness


def test_a_crowded_fixed_program_preempts_and_still_gives_the_right_outputs(crowded):
    crowded.drain()
    assert crowded.engine.stats().num_preemptions > 0
    for request in crowded.requests:
        expected = expected_output(request.prompt_token_ids, request.params, crowded.max_model_len)
        assert crowded.finished[request.request_id] == [expected]
    assert crowded.engine.stats().num_free_blocks == 6
