"""Scheduler: which sequences run this step, and how many of their tokens (policy only, no arrays).

Every step packs a mixed batch under a token budget: running sequences first, oldest first
(a decode needs one token, plus up to k speculative slots; an unfinished prefill takes the next
chunk), then waiting sequences first come first served while blocks and `max_num_seqs` allow
(one whose grammar is still compiling is passed by and keeps its place). When blocks run out,
the newest running sequence is preempted by recomputation: its blocks are freed and it goes
back to the front of the queue (the prefix cache usually gives most of them back).
`schedule()` returns the step's record; `update()` takes the runner's result back: the KV now
computed, blocks cached, rejected speculative slots trimmed, finished sequences freed.
"""

from __future__ import annotations

import time
from collections import deque

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.engine.step import RunnerOutput, SchedulerOutput


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
        attention_window: int = 0,
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.num_speculative_tokens = num_speculative_tokens  # k: guesses a decode may verify
        self.max_model_len = max_model_len
        # > 0: every layer attends to at most this many positions, so blocks wholly before a
        # sequence's window go back to the pool as it advances.
        self.attention_window = attention_window
        # A draft model shares the block tables and catches up only when the target decodes,
        # from seq.draft_computed: its next query may sit far behind the target's.
        self.draft_lags = config.speculative_method == "draft"
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_front(self, seq: Sequence) -> None:
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        step = SchedulerOutput()
        budget = self._schedule_running(step)
        if not step.preempted:
            self._schedule_waiting(step, budget)
        return step

    def update(self, step: SchedulerOutput, result: RunnerOutput) -> None:
        """After the runner and the output processor: advance what each sequence has computed,
        register its full blocks in the prefix cache, and free the finished ones' blocks."""
        manager = self.block_manager
        for item, sampled in zip(step.scheduled, result.seqs, strict=True):
            seq = item.seq
            seq.num_computed_tokens += sampled.num_computed
            manager.cache_computed_blocks(seq)
            if seq.finish_reason is not None:
                self.finish(seq)
                continue
            if len(seq.block_table) > manager.blocks_needed(seq.num_tokens):
                manager.trim(seq, seq.num_tokens)  # slots of rejected guesses
            if self.attention_window:
                # The next query sits at num_computed_tokens (the draft's at draft_computed) and
                # sees window - 1 positions back.
                first = seq.num_computed_tokens
                if self.draft_lags:
                    first = min(first, seq.draft_computed)
                manager.release_before(seq, first - self.attention_window + 1)

    def spec_slots(self, seq: Sequence) -> int:
        """Speculative slots for a decoding seq: no more than it may still generate or fit."""
        if not self.num_speculative_tokens or not seq.is_decoding:
            return 0
        remaining = seq.params.max_tokens - seq.num_output_tokens - 1
        room = self.max_model_len - seq.num_tokens
        return max(0, min(self.num_speculative_tokens, remaining, room))

    def _schedule_running(self, step: SchedulerOutput) -> int:
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            num_spec = min(self.spec_slots(seq), budget - num_tokens)
            total = seq.num_computed_tokens + num_tokens + num_spec
            if self._make_room(seq, total, step):
                self.block_manager.allocate(seq, total)
                step.add(seq, num_tokens, num_spec)
                budget -= num_tokens + num_spec
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, step: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until seq fits; False if seq itself was preempted."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, step: SchedulerOutput, budget: int) -> None:
        # Sequences whose grammar is still compiling are passed by and keep their places, so
        # the queue behind them stays first come first served (vLLM's WAITING_FOR_FSM).
        passed: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.awaiting_grammar:
                passed.append(self.waiting.popleft())
                continue
            num_tokens = self._admit(seq, budget)
            if num_tokens is None:
                break
            self.waiting.popleft()
            step.add(seq, num_tokens)
            budget -= num_tokens
        self.waiting.extendleft(reversed(passed))

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Move seq to running with blocks for its first chunk: that chunk's size, or None if
        the blocks are not there."""
        manager = self.block_manager
        # A prompt that must be scored skips the prefix cache, as in vLLM V1: a cached
        # block's positions would be computed by nobody, so they would have no logprobs.
        scored = seq.wants_prompt_logprobs
        hits = [] if scored else manager.match_prefix(seq)
        num_cached = len(hits) * manager.block_size
        num_tokens = min(seq.num_tokens - num_cached, budget)
        if not manager.can_allocate(seq, num_cached + num_tokens, hits):
            return None
        if not scored:
            manager.record_query(seq.num_tokens, num_cached)
        manager.allocate(seq, num_cached + num_tokens, hits)
        seq.num_computed_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        if seq.request.scheduled_time is None:  # its queue time ends here
            seq.request.scheduled_time = time.monotonic()
        self.running.append(seq)
        return num_tokens

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.forget_computed()
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
