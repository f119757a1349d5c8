"""The step contract: the records that pass between the parts of one engine step.

    Scheduler.schedule() -> SchedulerOutput      which sequences run, how many tokens each
    ModelRunner.execute(SchedulerOutput) -> RunnerOutput      what each sequence gained
    OutputProcessor.process(SchedulerOutput, RunnerOutput)    tokens appended, stop rules
    Scheduler.update(SchedulerOutput, RunnerOutput)           KV bookkeeping, blocks freed

They are plain records: no part reaches into another through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nanovllm.engine.logprobs import TokenLogprobs
from nanovllm.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    num_tokens: int  # known tokens computed this step: a prefill chunk, or 1 for a decode
    num_spec_tokens: int = 0  # slots reserved after them for speculative tokens (at most k)

    @property
    def num_slots(self) -> int:
        return self.num_tokens + self.num_spec_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # this step, by recomputation

    def add(self, seq: Sequence, num_tokens: int, num_spec_tokens: int = 0) -> None:
        self.scheduled.append(ScheduledSeq(seq, num_tokens, num_spec_tokens))

    @property
    def seqs(self) -> list[Sequence]:
        return [item.seq for item in self.scheduled]

    @property
    def num_tokens(self) -> int:
        """Token slots of the step, speculative ones included: what the budget counts."""
        return sum(item.num_slots for item in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass(slots=True)
class Proposal:
    """A proposer's guesses for one sequence."""

    token_ids: list[int]
    probs: np.ndarray | None  # [k, V] draft distributions; None for a deterministic proposer


@dataclass(slots=True)
class SampledSeq:
    """What one scheduled sequence gained from a step."""

    token_ids: list[int]  # accepted drafts, then one sampled token; [] mid-prefill
    logprobs: list[TokenLogprobs | None]  # one per token
    num_computed: int  # input tokens whose KV is now valid (a rejected draft's is not)
    num_drafted: int = 0
    num_accepted: int = 0
    # Prompt logprobs computed this step (params.prompt_logprobs): entry i scores prompt token
    # prompt_logprobs_start + i given the tokens before it.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs_start: int = 1


@dataclass(slots=True)
class RunnerOutput:
    seqs: list[SampledSeq]  # in the order of SchedulerOutput.scheduled
