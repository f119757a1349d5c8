"""Sequence (one sample being generated) and Request (a prompt with its n samples)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import numpy as np

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    params: SamplingParams
    generator: np.random.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of full, computed blocks
    num_released_blocks: int = 0  # leading table entries released outside the window (holes)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Any] = field(default_factory=list)
    detokenizer: Any = None  # set by the output processor
    constraint: Any = None  # a TokenConstraint on its next tokens (structured outputs), or None
    awaiting_grammar: bool = False  # its grammar is still compiling: the scheduler passes it by
    error: str | None = None  # why it ended with finish_reason "error"
    first_token_time: float | None = None
    last_token_time: float | None = None
    draft_computed: int = 0  # tokens whose KV the draft model holds (speculative decoding)
    # What the latest step that gave this sequence tokens added: from output token
    # `delta_start` on, and the text that became final.
    delta_step: int = -1
    delta_start: int = 0
    delta_text: str = ""

    @property
    def is_decoding(self) -> bool:
        """All known tokens but the last one are in the KV cache."""
        return self.num_computed_tokens == len(self.token_ids) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prefill must score the prompt: the request asked for prompt logprobs (computed
        by its first sample, once) and they are not complete yet."""
        return (
            self.index == 0
            and self.params.prompt_logprobs is not None
            and self.num_output_tokens == 0
        )

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def forget_computed(self) -> None:
        """Preempted by recomputation: no cache (target's or draft's) holds any of its tokens."""
        self.num_computed_tokens = 0
        self.draft_computed = 0


def sequence_generator(seed: int | None, index: int) -> np.random.Generator | None:
    """The generator of a seeded request's sample `index`, for its whole life (None: unseeded,
    the sampler's shared generator). Any 64-bit seed, negative ones included (OpenAI and vLLM
    accept them); each of the n samples draws its own stream."""
    return None if seed is None else np.random.default_rng((seed % 2**64, index))


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    finish_time: float | None = None
    constraints: Any = None  # RequestConstraints: what each sample's TokenConstraint is built from
    scheduled_time: float | None = None  # when it first left the waiting queue
    # TokenLogprobs of prompt tokens 1, 2, ... (the first token has none), with
    # params.prompt_logprobs; filled by the prefill's steps.
    prompt_logprobs: list[Any] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """Every sample has a finish reason (set as soon as a stop rule fires or on abort); a
        sample that failed ends the request without the samples not yet spawned."""
        spawned = len(self.seqs) == self.params.n or any(s.error is not None for s in self.seqs)
        return spawned and all(seq.finish_reason is not None for seq in self.seqs)
