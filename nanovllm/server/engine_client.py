"""What the HTTP server asks of whatever runs its engines: the engine-client interface.

Two implementations: `EngineThread` (nanovllm/server/engine_thread.py), one engine in a
background thread of this process, and `RayEngineClient` (nanovllm/distributed/ray_client.py),
N engine replicas as Ray actors behind a router. Request threads only ever `submit` a
`Submission` and wait on its queue (`results`), so every guarantee of the server holds for both:
an accepted request ends with its outputs, an `EngineFailure` (shutdown, a failed engine or
replica) or a `ClientGone` (the connection closed; `abort` then frees its blocks).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from nanovllm.engine.stats import EngineStats
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]
# How often a waiting request thread checks that the engine is still alive: only a safety net,
# since the engine fails every request when it stops. A thousand threads polling each second
# cost 3.6% of a core; every five seconds, nothing measurable.
LIVENESS_POLL_S = 5.0


class ClientGone(Exception):
    """The client closed its connection; the request is aborted."""


class EngineFailure(Exception):
    """The engine could not finish a request: the server is shutting down or the engine failed.
    `code` is the error code clients see: "shutting_down" (as /health says) or "engine_failure"."""

    def __init__(self, message: str, code: str = "engine_failure") -> None:
        super().__init__(message)
        self.code = code


class Outbox(Protocol):
    """Where a submission's outputs go: a queue.Queue, or a bridge into an event loop."""

    def put(self, item: Any) -> None: ...


@dataclass(eq=False)
class Submission:
    """One HTTP request's prompts on their way through the engine."""

    id: str
    prompts: list[Prompt]
    params: SamplingParams
    add_special_tokens: bool
    request_ids: list[str] = field(default_factory=list)
    outputs: Outbox = field(default_factory=queue.Queue)
    accepted: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None  # why add_request refused it
    num_done: int = 0  # prompts whose final output the request thread has seen

    @property
    def done(self) -> bool:
        return self.num_done == len(self.prompts)


@dataclass(slots=True)
class ModelFacts:
    """What the front end needs to know about the model its engines serve."""

    tokenizer: Any  # nanovllm.models.tokenizer.Tokenizer
    default_params: SamplingParams  # the model's generation_config defaults
    max_model_len: int
    model: str  # what --model pointed at
    max_num_seqs: int  # per engine
    block_size: int
    num_engines: int = 1  # data-parallel replicas


def wait_accepted(sub: Submission, is_alive: Callable[[], bool]) -> Submission:
    """Wait for the engine's verdict on `sub`; raise what it refused it with."""
    while not sub.accepted.wait(LIVENESS_POLL_S):
        if not is_alive():
            raise EngineFailure("the engine has stopped")
    if sub.error is not None:
        raise sub.error
    return sub


def submission_results(
    sub: Submission, is_alive: Callable[[], bool]
) -> Iterator[tuple[int, RequestOutput]]:
    """Every output of `sub` as the engine produces it, until all its prompts finished. Raises
    EngineFailure, or ClientGone once the connection closed."""
    while not sub.done:
        try:
            item = sub.outputs.get(timeout=LIVENESS_POLL_S)
        except queue.Empty:
            if not is_alive():
                raise EngineFailure("the engine has stopped") from None
            continue
        if isinstance(item, Exception):  # EngineFailure or ClientGone
            raise item
        index, output = item
        if output.finished:
            sub.num_done += 1
        yield index, output


class EngineClient(Protocol):
    """The server's view of its engine(s). `stats` and `state` are snapshots, at most a few
    tenths of a second old."""

    facts: ModelFacts

    def start(self) -> None: ...
    def is_alive(self) -> bool:
        """Whether new requests can be served (the engine runs; some replica is up)."""

    def submit(
        self, prompts: list[Prompt], params: SamplingParams, add_special_tokens: bool
    ) -> Submission:
        """Queue the prompts; wait until an engine accepts them. Raises ValueError (bad input)
        or EngineFailure."""

    def results(self, sub: Submission) -> Iterator[tuple[int, RequestOutput]]: ...
    def abort(self, sub: Submission) -> None:
        """Free what `sub` holds in its engine, unless it finished."""

    def client_gone(self, sub: Submission) -> None:
        """Wake the thread waiting on `sub`'s results: its client closed the connection."""

    def shut_down(self, message: str) -> None:
        """End every request in flight with `message` and refuse new ones."""

    def stop(self, timeout: float = 5.0) -> None: ...
    def engine_stats(self) -> list[EngineStats]:
        """The latest stats of each engine, in engine order (label "0", "1", ...)."""

    def state(self) -> dict:
        """The body of /v1/engine/state."""
