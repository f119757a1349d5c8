"""Scheduler: which sequences run this step, and how many of their tokens (policy only, no arrays).

Every step packs a mixed batch under a token budget: running sequences first, oldest first
(a decode needs one token, an unfinished prefill takes the next chunk), then waiting
sequences first come first served while blocks and `max_num_seqs` allow. When blocks run out,
the newest running sequence is preempted by recomputation: its blocks are freed and it goes
back to the front of the queue (the prefix cache usually gives most of them back).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        lookahead: Callable[[Sequence], int] | None = None,
    ) -> None:
        self.lookahead = lookahead  # speculative slots a decoding sequence may use this step
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_front(self, seq: Sequence) -> None:
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch) -> int:
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self.lookahead is not None and seq.is_decoding:
                num_tokens += min(self.lookahead(seq), budget - num_tokens)
            if self._make_room(seq, seq.num_computed_tokens + num_tokens, batch):
                self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens)
                batch.add(seq, num_tokens)
                budget -= num_tokens
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until seq fits; False if seq itself was preempted."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        manager = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = manager.match_prefix(seq)
            num_cached = len(hits) * manager.block_size
            num_tokens = min(seq.num_tokens - num_cached, budget)
            if not manager.can_allocate(seq, num_cached + num_tokens, hits):
                break
            manager.record_query(seq.num_tokens, num_cached)
            manager.allocate(seq, num_cached + num_tokens, hits)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            batch.add(seq, num_tokens)
            budget -= num_tokens

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
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
