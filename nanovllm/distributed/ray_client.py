"""N data-parallel engine replicas on Ray behind the one HTTP front end: the server's engine client.

What runs where. The front end process (waitress, request threads, this client) holds no model:
it tokenizes only what routing needs and renders chat templates with the tokenizer replica 0
sent. Each replica is a Ray actor (nanovllm/distributed/replica.py) with its own engine on its
own device: one GPU on a GPU node (or T GPUs through its tensor-parallel ranks), CPU threads
otherwise. One event-loop thread here drives every stream: a request thread submits, the router
(nanovllm/distributed/router.py) picks a replica, and a coroutine iterates the replica's Ray
streaming generator, putting outputs on the submission's queue in order; the request thread
waits on that queue exactly as with the single-process engine thread.

Faults. A replica's death reaches its streams as a Ray exception: each of its requests ends
with an EngineFailure (an error chunk, or a 503), the replica is taken out of routing and its
prefixes forgotten; a request it had not accepted yet goes to another replica. Ray restarts the
actor (`max_restarts`, bounded; requests are never retried: at-most-once, `max_task_retries=0`)
and the watchers (nanovllm/distributed/replica_set.py) put it back into routing when it answers
again. When every replica is down, /health and new requests answer 503.

Shutdown: the server's drain waits for the requests in flight on every replica; then the
replicas' engine threads stop, their actors are killed, and a Ray instance this process started
is stopped with them.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nanovllm.config import EngineConfig
from nanovllm.distributed import ray_runtime
from nanovllm.distributed.replica import Accepted, Failed, Refused
from nanovllm.distributed.replica_set import DataParallelOptions, ReplicaHandle, ReplicaSet
from nanovllm.distributed.router import Router
from nanovllm.engine.stats import EngineStats
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.engine_client import (
    ClientGone,
    EngineFailure,
    Prompt,
    Submission,
    submission_results,
    wait_accepted,
)

STOP_TIMEOUT_S = 10.0


@dataclass(eq=False)
class _Route:
    """A request on its way: where it may still go, and what it counts for the router."""

    sub: Submission
    keys: list[int]  # prefix keys
    sequences: int  # prompts x n: its outstanding work
    tried: set[int] = field(default_factory=set)  # replicas that died before accepting it
    released: ReplicaHandle | None = None  # the replica whose count it gave back


class RayEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        options: DataParallelOptions,
        on_finished: Callable[..., None],  # (output, engine=label)
        on_aborted: Callable[..., None],  # (count, engine=label)
    ) -> None:
        self.options = options
        self._on_finished, self._on_aborted = on_finished, on_aborted
        self._started_ray = ray_runtime.connect(options.ray_address)
        self.ray = ray_runtime.import_ray()
        self._lock = threading.Lock()  # the router's tables: request threads and the loop
        self._routes: dict[str, tuple[Submission, ReplicaHandle]] = {}
        self._ids = itertools.count()
        self._refusal: str | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nanovllm-router", daemon=True)  # fmt: skip
        try:
            self.set = ReplicaSet(self.ray, config, options, self._forget)
        except BaseException:
            ray_runtime.disconnect(self._started_ray)
            raise
        self.replicas = self.set.handles
        self.facts = self.set.facts
        self.router = Router(options.size, self.facts.block_size, self.facts.max_num_seqs)

    def start(self) -> None:
        self._thread.start()
        for replica in self.replicas:
            asyncio.run_coroutine_threadsafe(self.set.watch(replica), self.loop)

    def _forget(self, index: int) -> None:
        with self._lock:
            self.router.forget(index)  # its cache died with it

    # ---- the engine-client interface ---------------------------------------------------------
    def is_alive(self) -> bool:
        return self._thread.is_alive() and any(r.up for r in self.replicas)

    def submit(
        self, prompts: list[Prompt], params: SamplingParams, add_special_tokens: bool
    ) -> Submission:
        if self._refusal is not None:
            raise EngineFailure(self._refusal, "shutting_down")
        sub = Submission(f"req-{next(self._ids)}", prompts, params, add_special_tokens)
        encode = lambda text: self.facts.tokenizer.encode(text, add_special_tokens)  # noqa: E731
        route = _Route(sub, self.router.prefix_keys(prompts[0], encode), len(prompts) * params.n)
        self._dispatch(route)
        return wait_accepted(sub, self._thread.is_alive)

    def _dispatch(self, route: _Route) -> None:
        """Route to a living replica and start its stream, or fail the request with 503."""
        with self._lock:
            alive = [r.up and r.index not in route.tried for r in self.replicas]
            decision = self.router.choose(route.sub.id, route.keys, alive)
            if decision is not None:
                self.router.started(decision.engine, route.sequences)
        if decision is None:
            _fail(route.sub, EngineFailure("no engine replica is available: all are restarting or failed"))  # fmt: skip
            return
        replica = self.replicas[decision.engine]
        route.tried.add(replica.index)
        self._routes[route.sub.id] = (route.sub, replica)
        asyncio.run_coroutine_threadsafe(self._stream(route, replica), self.loop)

    def results(self, sub: Submission) -> Iterator[tuple[int, RequestOutput]]:
        return submission_results(sub, self._thread.is_alive)

    def abort(self, sub: Submission) -> None:
        route = self._routes.get(sub.id)
        if sub.done or route is None or not route[1].up:
            return
        replica = route[1]
        done = replica.actor.abort.remote(sub.id).future()
        done.add_done_callback(lambda f: self._count_aborted(f, replica))

    @staticmethod
    def client_gone(sub: Submission) -> None:
        if not sub.done:
            sub.outputs.put(ClientGone(sub.id))

    def shut_down(self, message: str) -> None:
        self._refusal = message
        for replica in self.replicas:
            if replica.up:
                replica.actor.shut_down.remote(message)
        for sub, _ in list(self._routes.values()):  # whether or not its replica answers
            _fail(sub, EngineFailure(message, "shutting_down"))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.set.stop(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread.ident is not None:  # it was started
            self._thread.join(timeout)
        ray_runtime.disconnect(self._started_ray)

    def engine_stats(self) -> list[EngineStats]:
        return self.set.stats()

    def state(self) -> dict:
        replicas = [self.set.describe(r, self.router.loads[r.index]) for r in self.replicas]
        return {
            "object": "engine.state",
            "data_parallel_size": len(replicas),
            "num_blocks": sum(r["num_blocks"] for r in replicas),
            "block_size": self.facts.block_size,
            "max_num_seqs": self.facts.max_num_seqs,  # per replica
            "blocks": "".join(r["blocks"] for r in replicas),
            "sequences": [seq for r in replicas for seq in r["sequences"]],
            "replicas": replicas,
            "router": self.router.describe(),
        }

    # ---- streams (on the loop thread) --------------------------------------------------------
    async def _stream(self, route: _Route, replica: ReplicaHandle) -> None:
        sub, finished = route.sub, 0
        try:
            stream = replica.actor.generate.options(num_returns="streaming").remote(
                sub.id, sub.prompts, sub.params, sub.add_special_tokens
            )
            async for ref in stream:
                item = await ref
                if not isinstance(item, list):
                    if not _verdict(sub, item):
                        return
                    continue
                for index, output in item:
                    sub.outputs.put((index, output))
                    if output.finished:
                        finished += 1
                        self._on_finished(output, engine=replica.label)
            if finished < len(sub.prompts):  # aborted, or a replica bug: never leave it waiting
                _fail(sub, EngineFailure("the engine replica ended the request early"))
        except self.ray.exceptions.RayError as e:
            self.set.mark_down(replica, e)
            if not sub.accepted.is_set():  # it never ran there: another replica may take it
                self._release(route, replica)
                self._dispatch(route)
                return
            if len(sub.prompts) > finished:
                self._on_aborted(len(sub.prompts) - finished, engine=replica.label)
            _fail(sub, EngineFailure(f"engine replica {replica.index} stopped while serving the request; retry it", "engine_failure"))  # fmt: skip
        finally:
            self._release(route, replica)

    def _release(self, route: _Route, replica: ReplicaHandle) -> None:
        if route.released is replica:
            return
        route.released = replica
        if self._routes.get(route.sub.id, (None, None))[1] is replica:
            del self._routes[route.sub.id]
        with self._lock:
            self.router.finished(replica.index, route.sequences)

    def _count_aborted(self, done, replica: ReplicaHandle) -> None:
        try:
            count = done.result()
        except Exception:  # the replica died meanwhile: its streams count their own failures
            return
        if count:
            self._on_aborted(count, engine=replica.label)


def _verdict(sub: Submission, item: Accepted | Refused | Failed) -> bool:
    """Apply a replica's record to `sub`; False when the stream ends with it."""
    if isinstance(item, Accepted):
        sub.accepted.set()
        return True
    if isinstance(item, Refused):
        sub.error = ValueError(item.message)
        sub.accepted.set()
    else:
        _fail(sub, EngineFailure(item.message, item.code))
    return False


def _fail(sub: Submission, error: EngineFailure) -> None:
    if not sub.accepted.is_set():
        sub.error = error
        sub.accepted.set()
    elif not sub.done:
        sub.outputs.put(error)
