"""The data-parallel replicas as the front end holds them: started on Ray, watched, reported.

`ReplicaSet` asks Ray for N `EngineReplica` actors (nanovllm/distributed/replica.py) with the
resources each needs, waits until every one has loaded the model, and keeps a `ReplicaHandle`
per replica: whether it takes requests, its restarts, its latest stats and KV map. A watcher
coroutine per replica probes `state()` every POLL_S: a probe the replica cannot answer yet (busy,
or restarting) is awaited again rather than sent twice; an error takes the replica out of
routing; an answer from a new process after that counts a restart and puts it back. Ray does the
restarting (`max_restarts`); a replica whose engine thread died inside a live process is killed
so that Ray restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.distributed import ray_runtime
from nanovllm.distributed.ray_runtime import cause
from nanovllm.distributed.replica import EngineReplica, ReplicaState, state_json
from nanovllm.engine.stats import EngineStats
from nanovllm.errors import NanovllmError
from nanovllm.server.engine_client import ModelFacts

logger = logging.getLogger("nanovllm.distributed")

POLL_S = 0.25  # the watchers' period: stats, block maps and health are at most this old
START_TIMEOUT_S = 900.0  # every replica placed and its model loaded


@dataclass(slots=True)
class DataParallelOptions:
    size: int
    ray_address: str | None = None
    max_restarts: int = 3  # per replica, by Ray
    max_in_flight: int = 1032  # requests the front end admits: each replica's concurrency
    log_interval: float = 5.0


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

    @property
    def status(self) -> str:
        return "up" if self.up else "failed" if self.failed else "restarting"


class ReplicaSet:
    def __init__(
        self,
        ray: Any,
        config: EngineConfig,
        options: DataParallelOptions,
        on_down: Callable[[int], None],
    ) -> None:
        """Start the replicas and wait for all of them; `on_down(index)` is called when one
        leaves routing."""
        self.ray = ray
        self.on_down = on_down
        self.stopping = False
        actor = ray.remote(EngineReplica).options(
            max_restarts=options.max_restarts,
            max_task_retries=0,  # at most once: a request is never run twice
            max_concurrency=options.max_in_flight + 16,
            **replica_resources(config, options.size, ray.cluster_resources()),
        )
        self.handles = [
            ReplicaHandle(i, actor.remote(config, i, options.log_interval))
            for i in range(options.size)
        ]
        facts = self._wait([h.actor.facts.remote() for h in self.handles], "load the model")
        self.facts: ModelFacts = dataclasses.replace(facts[0], num_engines=options.size)
        states = self._wait([h.actor.state.remote() for h in self.handles], "report")
        for handle, state in zip(self.handles, states, strict=True):
            handle.state, handle.pid, handle.polled = state, state.pid, time.time()
        logger.info("%d replicas up: %s", options.size, ", ".join(f"{s.pid}@{s.node}" for s in states))  # fmt: skip

    def _wait(self, refs: list, what: str) -> list:
        late = (
            f"the replicas did not {what} within {START_TIMEOUT_S:.0f} s (is the Ray cluster "
            "short of the CPUs or GPUs they ask for?)"
        )
        return ray_runtime.get_within(
            self.ray, refs, START_TIMEOUT_S, late, "a replica failed to start"
        )

    # ---- health (on the client's event loop) -------------------------------------------------
    async def watch(self, replica: ReplicaHandle) -> None:
        exceptions = self.ray.exceptions
        probe = None
        while not self.stopping:
            probe = probe or replica.actor.state.remote()
            try:
                state = await asyncio.wait_for(asyncio.wrap_future(probe.future()), 4 * POLL_S)
            except asyncio.TimeoutError:
                continue
            except exceptions.RayError as e:
                probe = None
                self.mark_down(replica, e, failed=isinstance(e, exceptions.ActorDiedError))
                await asyncio.sleep(4 * POLL_S)
                continue
            probe = None
            self._update(replica, state)
            await asyncio.sleep(POLL_S)

    def _update(self, replica: ReplicaHandle, state: ReplicaState) -> None:
        if not state.engine_alive:  # the process lives but its engine thread died
            logger.error("replica %d: its engine stopped; restarting the actor", replica.index)
            self.mark_down(replica, RuntimeError("its engine thread stopped"))
            self.ray.kill(replica.actor, no_restart=False)
            return
        if not replica.up and not self.stopping:
            if replica.pid is not None and state.pid != replica.pid:
                replica.restarts += 1
            logger.info("replica %d is up again (pid %d, %d restarts)", replica.index, state.pid, replica.restarts)  # fmt: skip
            replica.up, replica.failed, replica.error = True, False, None
        replica.pid, replica.state, replica.polled = state.pid, state, time.time()

    def mark_down(self, replica: ReplicaHandle, error: Exception, failed: bool = False) -> None:
        """Out of routing until a probe finds it again."""
        if replica.up:
            logger.warning("replica %d is down: %s", replica.index, cause(error))
            self.on_down(replica.index)
        replica.up, replica.failed, replica.error = False, failed, cause(error)

    # ---- reports -----------------------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        """Each replica's latest stats; a replica that is down runs and holds nothing."""
        out = []
        for replica in self.handles:
            if replica.state is None:
                out.append(EngineStats(0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0))
                continue
            stats = replica.state.stats
            if not replica.up:
                stats = dataclasses.replace(stats, num_running=0, num_waiting=0, num_free_blocks=stats.num_blocks)  # fmt: skip
            out.append(stats)
        return out

    def describe(self, replica: ReplicaHandle, outstanding: int) -> dict:
        """One entry of /v1/engine/state's `replicas`."""
        body = state_json(replica.state) if replica.state is not None else {}
        sequences = [{**seq, "engine": replica.label} for seq in body.get("sequences", [])]
        return {
            **body,
            "engine": replica.label,
            "status": replica.status,
            "restarts": replica.restarts,
            "error": replica.error,
            "polled": replica.polled,
            "outstanding": outstanding,
            "sequences": sequences if replica.up else [],
        }

    def stop(self, timeout: float) -> None:
        """Stop every engine thread that still runs, then the actors."""
        self.stopping = True
        stops = [r.actor.stop.remote() for r in self.handles if r.up]
        self.ray.wait(stops, num_returns=len(stops), timeout=timeout)
        for replica in self.handles:
            self.ray.kill(replica.actor, no_restart=True)


def replica_resources(config: EngineConfig, size: int, cluster: dict) -> dict:
    """What each replica asks Ray for: a GPU (or its ranks take T), or a share of the CPUs, whose
    count also sets its BLAS threads unless the server's environment sets them. Refuses a cluster
    that could never place them all."""
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
    # A thread count set for the server (OMP_NUM_THREADS=1 ...) applies to its replicas too.
    threads = str(cpus // size)
    env = {name: os.environ.get(name, threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}  # fmt: skip
    return {"num_cpus": cpus // size, "runtime_env": {"env_vars": env}}
