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
prefixes forgotten. Ray restarts the actor (`max_restarts`, bounded; requests are never retried:
at-most-once, `max_task_retries=0`); a watcher probes each replica's state every POLL_S and puts
it back into routing when it answers again. A replica whose engine thread died while its
process lives is killed so that Ray restarts it. When every replica is down, /health and new
requests answer 503.

Shutdown: the server's drain waits for the requests in flight on every replica; then the
replicas' engine threads stop, their actors are killed, and a Ray instance this process started
is stopped with them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.distributed import ray_runtime
from nanovllm.distributed.replica import (
    Accepted,
    EngineReplica,
    Failed,
    Refused,
    ReplicaState,
    state_json,
)
from nanovllm.distributed.router import Router
from nanovllm.engine.stats import EngineStats
from nanovllm.errors import NanovllmError
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

logger = logging.getLogger("nanovllm.distributed")

POLL_S = 0.25  # the watchers' period: stats, block maps and health are at most this old
START_TIMEOUT_S = 900.0  # every replica placed and its model loaded
STOP_TIMEOUT_S = 10.0


@dataclass(slots=True)
class DataParallelOptions:
    size: int
    ray_address: str | None = None
    max_restarts: int = 3  # per replica, by Ray
    max_in_flight: int = (
        1032  # admitted requests (running + waiting + spares): the actor's concurrency
    )
    log_interval: float = 5.0


@dataclass(eq=False)
class _Route:
    """A request on its way: where it may still go, and what it counts for the router."""

    sub: Submission
    keys: list[int]  # prefix keys
    sequences: int  # prompts x n: its outstanding work
    tried: set[int] = field(default_factory=set)  # replicas that died before accepting it
    released: ReplicaHandle | None = None  # the replica whose count it gave back


@dataclass
class ReplicaHandle:
    index: int
    actor: Any
    up: bool = True  # takes new requests
    failed: bool = False  # Ray reports it dead for good (restarts exhausted)
    restarts: int = 0
    pid: int | None = None
    state: ReplicaState | None = None
    polled: float | None = None  # time.time() of the state above
    error: str | None = None

    @property
    def label(self) -> str:
        return str(self.index)


class RayEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        options: DataParallelOptions,
        on_finished: Callable[[RequestOutput, str], None],
        on_aborted: Callable[[int, str], None],
    ) -> None:
        self.options = options
        self._on_finished, self._on_aborted = on_finished, on_aborted
        self._started_ray = ray_runtime.connect(options.ray_address)
        self.ray = ray_runtime.import_ray()
        self._lock = threading.Lock()  # the router's tables: request threads and the loop
        self._routes: dict[str, tuple[Submission, ReplicaHandle]] = {}
        self._ids = itertools.count()
        self._refusal: str | None = None
        self._stopping = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nanovllm-router", daemon=True)  # fmt: skip
        try:
            self.replicas = self._start_replicas(config)
        except BaseException:
            ray_runtime.disconnect(self._started_ray)
            raise
        self.router = Router(options.size, self.facts.block_size, self.facts.max_num_seqs)

    # ---- start-up ----------------------------------------------------------------------------
    def _start_replicas(self, config: EngineConfig) -> list[ReplicaHandle]:
        size = self.options.size
        actor = self.ray.remote(EngineReplica).options(
            max_restarts=self.options.max_restarts,
            max_task_retries=0,  # at most once: a request is never run twice
            max_concurrency=self.options.max_in_flight + 16,
            **replica_resources(config, size, self.ray.cluster_resources()),
        )
        handles = [ReplicaHandle(i, actor.remote(config, i, self.options.log_interval)) for i in range(size)]  # fmt: skip
        facts = self._wait([h.actor.facts.remote() for h in handles], "load the model")
        self.facts = dataclasses.replace(facts[0], num_engines=size)
        states = self._wait([h.actor.state.remote() for h in handles], "report")
        for handle, state in zip(handles, states, strict=True):
            handle.state, handle.pid, handle.polled = state, state.pid, time.time()
        logger.info("%d replicas up: %s", size, ", ".join(f"{s.pid}@{s.node}" for s in states))
        return handles

    def _wait(self, refs: list, what: str) -> list:
        try:
            return self.ray.get(refs, timeout=START_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise NanovllmError(
                f"the replicas did not {what} within {START_TIMEOUT_S:.0f} s (is the Ray cluster "
                "short of the CPUs or GPUs they ask for?)"
            ) from None
        except self.ray.exceptions.RayActorError as e:
            raise NanovllmError(f"a replica failed to start: {_cause(e)}") from None

    def start(self) -> None:
        self._thread.start()
        for replica in self.replicas:
            asyncio.run_coroutine_threadsafe(self._watch(replica), self.loop)

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
        self._stopping = True
        ray = self.ray
        stops = [r.actor.stop.remote() for r in self.replicas if r.up]
        ray.wait(stops, num_returns=len(stops), timeout=timeout)
        for replica in self.replicas:
            ray.kill(replica.actor, no_restart=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread.ident is not None:  # it was started
            self._thread.join(timeout)
        ray_runtime.disconnect(self._started_ray)

    def engine_stats(self) -> list[EngineStats]:
        return [_stats_of(r) for r in self.replicas]

    def state(self) -> dict:
        replicas = [self._replica_json(r) for r in self.replicas]
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
                        self._on_finished(output, replica.label)
            if finished < len(sub.prompts):  # aborted, or a replica bug: never leave it waiting
                _fail(sub, EngineFailure("the engine replica ended the request early"))
        except self.ray.exceptions.RayError as e:
            self._replica_down(replica, e)
            if not sub.accepted.is_set():  # it never ran there: another replica may take it
                self._release(route, replica)
                self._dispatch(route)
                return
            if len(sub.prompts) > finished:
                self._on_aborted(len(sub.prompts) - finished, replica.label)
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
            self._on_aborted(count, replica.label)

    # ---- health (on the loop thread) ---------------------------------------------------------
    async def _watch(self, replica: ReplicaHandle) -> None:
        """Probe the replica's state every POLL_S; a probe it cannot answer yet (busy, or
        restarting) is awaited again rather than sent twice."""
        exceptions = self.ray.exceptions
        probe = None
        while not self._stopping:
            probe = probe or replica.actor.state.remote()
            try:
                state = await asyncio.wait_for(asyncio.wrap_future(probe.future()), 4 * POLL_S)
            except asyncio.TimeoutError:
                continue
            except exceptions.RayError as e:
                probe = None
                self._replica_down(replica, e, failed=isinstance(e, exceptions.ActorDiedError))
                await asyncio.sleep(4 * POLL_S)
                continue
            probe = None
            self._replica_state(replica, state)
            await asyncio.sleep(POLL_S)

    def _replica_state(self, replica: ReplicaHandle, state: ReplicaState) -> None:
        if not state.engine_alive:  # the process lives but its engine thread died
            logger.error("replica %d: its engine stopped; restarting the actor", replica.index)
            self._replica_down(replica, RuntimeError("its engine thread stopped"))
            self.ray.kill(replica.actor, no_restart=False)
            return
        if not replica.up and not self._stopping:
            if replica.pid is not None and state.pid != replica.pid:
                replica.restarts += 1
            logger.info("replica %d is up again (pid %d, %d restarts)", replica.index, state.pid, replica.restarts)  # fmt: skip
            replica.up, replica.failed, replica.error = True, False, None
        replica.pid, replica.state, replica.polled = state.pid, state, time.time()

    def _replica_down(self, replica: ReplicaHandle, error: Exception, failed: bool = False) -> None:
        with self._lock:
            if replica.up:
                logger.warning("replica %d is down: %s", replica.index, _cause(error))
                self.router.forget(replica.index)  # its cache died with it
            replica.up, replica.failed, replica.error = False, failed, _cause(error)

    def _replica_json(self, replica: ReplicaHandle) -> dict:
        body = state_json(replica.state) if replica.state is not None else {}
        status = "up" if replica.up else "failed" if replica.failed else "restarting"
        sequences = [{**seq, "engine": replica.label} for seq in body.get("sequences", [])]
        return {
            **body,
            "engine": replica.label,
            "status": status,
            "restarts": replica.restarts,
            "error": replica.error,
            "polled": replica.polled,
            "outstanding": self.router.loads[replica.index],
            "sequences": sequences if replica.up else [],
        }


def replica_resources(config: EngineConfig, size: int, cluster: dict) -> dict:
    """What each replica asks Ray for: a GPU (or its ranks take T), or a share of the CPUs, whose
    count also sets its BLAS threads. Refuses a cluster that could never place them all."""
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    on_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if on_gpu:
        needed = size * config.tensor_parallel_size
        if gpus < needed:
            raise NanovllmError(f"{size} replicas need {needed} GPUs; the Ray cluster has {gpus}")
        # With tensor parallelism the replica's ranks are actors of one GPU each.
        return {"num_gpus": 1 if config.tensor_parallel_size == 1 else 0, "num_cpus": 1}
    if cpus < size:
        raise NanovllmError(f"{size} CPU replicas need a CPU each; the Ray cluster has {cpus}")
    threads = str(cpus // size)
    env = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    return {"num_cpus": cpus // size, "runtime_env": {"env_vars": env}}


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


def _stats_of(replica: ReplicaHandle) -> EngineStats:
    if replica.state is None:
        return EngineStats(0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    stats = replica.state.stats
    if replica.up:
        return stats
    return dataclasses.replace(stats, num_running=0, num_waiting=0, num_free_blocks=stats.num_blocks)  # fmt: skip


def _cause(error: Exception) -> str:
    """The first line that says what happened, without Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):  # a creation task's own exception comes last
        if ": " in line and not line.startswith(("File ", "Traceback")):
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]
