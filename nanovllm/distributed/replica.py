"""One data-parallel engine replica: an engine thread behind async methods, run as a Ray actor.

`EngineReplica` builds its engine (its own device: one GPU, or CPU threads) and runs it in an
`EngineThread`, exactly as the single-process server does; the front end's router
(nanovllm/distributed/ray_client.py) calls it through Ray:

- `generate(...)` is a streaming generator (called with `num_returns="streaming"`): first
  `Accepted` or `Refused` (add_request's verdict, so the front end can still answer 400), then
  lists of `(prompt_index, RequestOutput)` as the engine produces them, in order, each list all
  that accumulated since the last (fewer Ray messages when the caller falls behind), until every
  prompt finished; or a `Failed` record when the engine ends the request (shutdown, an engine
  error). Errors are data: only the replica's death reaches the caller as a Ray exception.
- `abort(request_id)` frees the request's blocks and ends its stream.
- `state()` reports stats, the KV block map and the process, for /metrics, /v1/engine/state and
  the router's health checks.

The actor is asynchronous: every call is a coroutine on one event loop, thousands of streams
wait at no cost, and the engine thread hands outputs over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.assembly import build_engine
from nanovllm.engine.stats import EngineSnapshot, EngineStats
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.engine_client import ClientGone, EngineFailure, ModelFacts, Submission
from nanovllm.server.engine_thread import EngineThread

logger = logging.getLogger("nanovllm.replica")
# add_request runs on the engine thread between steps; this many submissions wait for it at once.
_SUBMIT_THREADS = 32


@dataclass(slots=True)
class Accepted:
    pass


@dataclass(slots=True)
class Refused:
    message: str  # add_request's ValueError: the front end answers 400


@dataclass(slots=True)
class Failed:
    message: str
    code: str  # EngineFailure.code: "shutting_down" or "engine_failure"


@dataclass(slots=True)
class ReplicaState:
    stats: EngineStats
    snapshot: EngineSnapshot
    pid: int
    node: str
    engine_alive: bool  # False: the engine thread died; the router restarts the actor


class _LoopOutbox:
    """A submission's outbox that wakes a coroutine: the engine thread puts, the loop gets."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is gone (the actor stops): nobody reads this stream
            pass

    async def get_all(self) -> list[Any]:
        items = [await self.items.get()]
        while not self.items.empty():
            items.append(self.items.get_nowait())
        return items


class EngineReplica:
    def __init__(self, config: EngineConfig, index: int, log_interval: float = 5.0) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s [replica {index}] %(message)s")  # fmt: skip
        self.index = index
        self.thread = EngineThread(build_engine(config), log_interval=log_interval)
        self.thread.start()
        self.subs: dict[str, Submission] = {}
        self.pool = ThreadPoolExecutor(_SUBMIT_THREADS, thread_name_prefix="replica-submit")
        self.node = socket.gethostname()
        logger.info("replica %d ready (pid %d on %s)", index, os.getpid(), self.node)

    async def facts(self) -> ModelFacts:
        return self.thread.facts

    async def generate(
        self,
        request_id: str,
        prompts: list[str | list[int]],
        params: SamplingParams,
        add_special_tokens: bool,
    ) -> AsyncIterator[Any]:
        outbox = _LoopOutbox(asyncio.get_running_loop())
        submit = self.thread.submit
        try:
            sub = await asyncio.get_running_loop().run_in_executor(
                self.pool, submit, prompts, params, add_special_tokens, request_id, outbox
            )
        except ValueError as e:
            yield Refused(str(e))
            return
        except EngineFailure as e:
            yield Failed(str(e), e.code)
            return
        self.subs[request_id] = sub
        try:
            yield Accepted()
            async for item in self._outputs(sub, outbox):
                yield item
        finally:
            self.subs.pop(request_id, None)
            self.thread.abort(sub)  # a no-op once every prompt finished

    async def _outputs(self, sub: Submission, outbox: _LoopOutbox) -> AsyncIterator[Any]:
        while not sub.done:
            batch = []
            for item in await outbox.get_all():
                if isinstance(item, ClientGone):  # aborted by the front end
                    return
                if isinstance(item, EngineFailure):
                    if batch:
                        yield batch
                    yield Failed(str(item), item.code)
                    return
                index, output = item
                sub.num_done += output.finished
                batch.append((index, output))
            yield batch

    async def abort(self, request_id: str) -> int:
        """End the request's stream and free its blocks; how many of its prompts were running."""
        sub = self.subs.pop(request_id, None)
        if sub is None:
            return 0
        self.thread.abort(sub)
        EngineThread.client_gone(sub)
        return len(sub.prompts) - sub.num_done

    async def state(self) -> ReplicaState:
        thread = self.thread
        return ReplicaState(
            thread.stats, thread.snapshot, os.getpid(), self.node, thread.is_alive()
        )

    async def shut_down(self, message: str) -> None:
        self.thread.shut_down(message)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self.thread.stop)


def state_json(state: ReplicaState) -> dict:
    """A replica's KV map and sequences, as /v1/engine/state shows one engine."""
    return {
        "num_blocks": len(state.snapshot.blocks),
        "blocks": state.snapshot.blocks,
        "sequences": [asdict(seq) for seq in state.snapshot.sequences],
        "pid": state.pid,
        "node": state.node,
    }
