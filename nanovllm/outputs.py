"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Logprob:
    """One token's entry in vLLM's logprob dicts ({token id: Logprob})."""

    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# vLLM's prompt_logprobs: one entry per prompt token, None for the first (nothing precedes it),
# else {token id: Logprob} holding the prompt's token and the most likely alternatives.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[Any] | None = None
    # What is new since the previous RequestOutput of this request (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Any] | None = None
    error: str | None = None  # with finish_reason "error": what went wrong

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """A request's timeline (time.monotonic() seconds), as vLLM's metrics split it: queued from
    arrival to first scheduled, prefill until the first token, decode until the last one."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_generation_tokens: int
    scheduled_time: float | None = None
    last_token_time: float | None = None
    max_num_generation_tokens: int = 0  # of the longest of its n samples

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return _since(self.arrival_time, self.scheduled_time)

    @property
    def prefill_time(self) -> float | None:
        return _since(self.scheduled_time, self.first_token_time)

    @property
    def decode_time(self) -> float | None:
        return _since(self.first_token_time, self.last_token_time)

    @property
    def inference_time(self) -> float | None:
        return _since(self.scheduled_time, self.last_token_time)


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs
