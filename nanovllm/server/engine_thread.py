"""The engine loop in one background thread, and the queues request threads talk to it through.

The engine is single-threaded, so only this thread calls it. A request thread hands it work
as a `Submission` (one HTTP request: one or more prompts, one SamplingParams) and waits for
the verdict of `add_request`; afterwards the engine thread puts `(prompt_index, RequestOutput)`
items on the submission's own queue, or an `EngineFailure` if the request cannot finish
(shutdown, internal error), or a `ClientGone` when the connection closed (`client_gone`, called
by the server's event loop): a request thread only ever waits on that queue. Aborts travel the
same command queue, so a dropped client's blocks are free before the next step.

It is the single-process implementation of the server's engine-client interface
(nanovllm/server/engine_client.py); a data-parallel replica runs one inside a Ray actor.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.stats import EngineSnapshot, EngineStats, IterationStats
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.engine_client import (
    ClientGone,
    EngineFailure,
    ModelFacts,
    Outbox,
    Prompt,
    Submission,
    submission_results,
    wait_accepted,
)

logger = logging.getLogger("nanovllm.server")

_SNAPSHOT_INTERVAL_S = 0.1  # /v1/engine/state is at most this old


class EngineThread:
    def __init__(
        self,
        engine: LLMEngine,
        on_finished: Callable[[RequestOutput, SamplingParams], None] | None = None,
        on_aborted: Callable[[int], None] | None = None,
        log_interval: float = 5.0,
        on_step: Callable[[IterationStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self.stats: EngineStats = engine.stats()  # the latest snapshot, for /metrics and logs
        # Sequences and block states for /v1/engine/state. Refreshed after every step: it costs
        # ~35 us for 512 blocks and 8 sequences (a tiny model's CPU step takes ~2 ms).
        self.snapshot: EngineSnapshot = engine.snapshot()
        self._snapshot_time = time.monotonic()
        self._on_finished = on_finished or (lambda output, params: None)
        self._on_aborted = on_aborted or (lambda count: None)
        self._on_step = on_step or (lambda iteration: None)
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._routes: dict[str, tuple[Submission, int]] = {}
        self._ids = itertools.count()
        self._refusal: str | None = None  # set at shutdown: why new work is refused
        self._running = True
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._log = _ThroughputLog(log_interval, self.stats)
        config = engine.config
        self.facts = ModelFacts(
            engine.tokenizer, engine.default_sampling_params(), engine.max_model_len,
            config.model, config.max_num_seqs, config.block_size,
        )  # fmt: skip

    # ---- called from request threads -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        add_special_tokens: bool,
        sub_id: str | None = None,
        outputs: Outbox | None = None,
    ) -> Submission:
        """Queue the prompts; wait until the engine accepts them. Raises what add_request raised.
        A replica (nanovllm/distributed/replica.py) names the submission and where its outputs go."""
        sub = Submission(sub_id or f"req-{next(self._ids)}", prompts, params, add_special_tokens)
        if outputs is not None:
            sub.outputs = outputs
        self._commands.put(lambda: self._add(sub))
        return wait_accepted(sub, self.is_alive)

    def results(self, sub: Submission) -> Iterator[tuple[int, RequestOutput]]:
        """Every output of `sub` as the engine produces it, until all its prompts finished.
        Raises EngineFailure, or ClientGone once `client_gone(sub)` was called."""
        return submission_results(sub, self.is_alive)

    def abort(self, sub: Submission) -> None:
        if not sub.done:
            self._commands.put(lambda: self._abort(sub))

    @staticmethod
    def client_gone(sub: Submission) -> None:
        """Wake the thread waiting on `sub`'s results: its client closed the connection."""
        if not sub.done:
            sub.outputs.put(ClientGone(sub.id))

    def shut_down(self, message: str) -> None:
        """End every request in flight with `message` and refuse new ones."""
        self._commands.put(lambda: self._refuse_all(message))

    def stop(self, timeout: float = 5.0) -> None:
        self._commands.put(self._exit)
        if self._thread.ident is not None:  # it was started
            self._thread.join(timeout)

    def engine_stats(self) -> list[EngineStats]:
        return [self.stats]

    def state(self) -> dict:
        snapshot, config = self.snapshot, self.engine.config
        return {
            "object": "engine.state",
            "num_blocks": len(snapshot.blocks),
            "block_size": config.block_size,
            "max_num_seqs": config.max_num_seqs,
            "blocks": snapshot.blocks,
            "sequences": [asdict(seq) for seq in snapshot.sequences],
        }

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._running:
                self._run_commands(block=not self.engine.has_unfinished_requests())
                if self._running and self.engine.has_unfinished_requests():
                    self._step()
                self.stats = self.engine.stats()
                self._publish_snapshot()
                self._log.maybe_log(self.stats)
        except BaseException:
            logger.exception("the engine thread crashed")
            raise
        finally:
            self._fail_all("the engine has stopped")

    def _publish_snapshot(self) -> None:
        # One character per KV block: with a large GPU pool that is worth skipping on most steps.
        # Always when idle: the thread then blocks, and the last state must be the one shown.
        now = time.monotonic()
        idle = not self.engine.has_unfinished_requests()
        if idle or now - self._snapshot_time >= _SNAPSHOT_INTERVAL_S:
            self.snapshot, self._snapshot_time = self.engine.snapshot(), now

    def _run_commands(self, block: bool) -> None:
        try:
            # Idle: sleep until work arrives, waking now and then for the periodic log.
            command = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, sub: Submission) -> None:
        try:
            if self._refusal is not None:
                raise EngineFailure(self._refusal, "shutting_down")
            for index, prompt in enumerate(sub.prompts):
                request_id = f"{sub.id}-{index}"
                try:
                    self.engine.add_request(request_id, prompt, sub.params, sub.add_special_tokens)
                except BaseException:
                    self.engine.abort_request(request_id)  # in case it got half way
                    raise
                self._routes[request_id] = (sub, index)
                sub.request_ids.append(request_id)
        except Exception as e:
            self._abort(sub)
            sub.error = e
        sub.accepted.set()

    def _abort(self, sub: Submission) -> None:
        aborted = 0
        for request_id in sub.request_ids:
            if self._routes.pop(request_id, None) is not None:
                aborted += self.engine.abort_request(request_id)
        if aborted:
            self._on_aborted(aborted)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; ending every request in flight")
            self._fail_all("internal error in the engine (see the server log)")
            return
        self._on_step(self.engine.iteration_stats)
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue
            sub, index = route
            sub.outputs.put((index, output))
            if output.finished:
                del self._routes[output.request_id]
                self._on_finished(output, sub.params)

    def _fail_all(self, message: str, code: str = "engine_failure") -> None:
        failed = 0
        for request_id, (sub, _) in list(self._routes.items()):
            try:
                failed += self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort request %s", request_id)
            sub.outputs.put(EngineFailure(message, code))
        self._routes.clear()
        if failed:
            self._on_aborted(failed)

    def _refuse_all(self, message: str) -> None:
        self._refusal = message
        self._fail_all(message, "shutting_down")

    def _exit(self) -> None:
        self._running = False


class _ThroughputLog:
    """vLLM's periodic log line: throughput since the last line, queue sizes, cache usage."""

    def __init__(self, interval: float, stats: EngineStats) -> None:
        self.interval = interval
        self.last_time = time.monotonic()
        self.last = stats

    def maybe_log(self, stats: EngineStats) -> None:
        now = time.monotonic()
        elapsed = now - self.last_time
        if elapsed < self.interval:
            return
        last, self.last, self.last_time = self.last, stats, now
        prompt = stats.prompt_tokens - last.prompt_tokens
        generated = stats.generation_tokens - last.generation_tokens
        busy = stats.num_running or stats.num_waiting or last.num_running or last.num_waiting
        if not (busy or prompt or generated):
            return  # idle: nothing new to say
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            prompt / elapsed,
            generated / elapsed,
            stats.num_running,
            stats.num_waiting,
            100 * stats.kv_cache_usage,
            100 * stats.prefix_cache_hit_rate,
        )
        if stats.spec is not None and stats.spec.num_drafts:
            spec = stats.spec
            logger.info(
                "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted: %d tokens, "
                "Drafted: %d tokens, Per-position acceptance rate: %s, Avg Draft acceptance rate: %.1f%%",
                spec.mean_acceptance_length,
                spec.num_accepted_tokens,
                spec.num_draft_tokens,
                ", ".join(f"{n / spec.num_drafts:.3f}" for n in spec.accepted_per_pos),
                100 * spec.acceptance_rate,
            )
