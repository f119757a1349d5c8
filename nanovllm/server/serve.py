"""Run the server: load the engine, size waitress, serve, and shut down gracefully on a signal.

waitress holds one worker thread per open stream, so its thread pool is sized from the
admission bound (max-requests + max-waiting) plus a few spare threads that answer /health,
/metrics and the 503s beyond the bound. On SIGINT/SIGTERM the server stops listening, lets the
requests in flight finish within a grace period, ends the rest with a final error, and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import waitress
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.wasyncore import dispatcher

from nanovllm.config import EngineConfig
from nanovllm.engine.assembly import build_engine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.server.admission import Admission
from nanovllm.server.app import ServerState, build_app
from nanovllm.server.engine_thread import EngineThread
from nanovllm.server.metrics import ServerMetrics
from nanovllm.server.protocol import ProtocolContext

logger = logging.getLogger("nanovllm.server")

SPARE_THREADS = 4  # beyond the admission bound: health, metrics, tokenize, 503 answers
# How long, after the grace period, ended streams get to write their last chunk.
FINAL_WRITE_S = 2.0


@dataclass(slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int = 64
    grace_period: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    log_interval: float = 5.0


def build_state(
    engine: LLMEngine, config: ServerConfig, sampling_overrides: dict, model_name: str
) -> ServerState:
    """Wire the engine thread, metrics and validation context around a loaded engine."""
    tokenizer = engine.tokenizer

    def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    # The metrics read the thread's stats snapshot; the thread reports finishes to the metrics.
    metrics = ServerMetrics(model_name, lambda: thread.stats)
    thread = EngineThread(engine, metrics.on_finished, metrics.on_aborted, config.log_interval)
    protocol = ProtocolContext(
        defaults=engine.default_sampling_params().clone(**sampling_overrides),
        model_name=model_name,
        accepted_names=frozenset({model_name, engine.config.model}),
        render_chat=render_chat,
        vocab_size=tokenizer.vocab_size,
    )
    return ServerState(
        engine=thread,
        tokenizer=tokenizer,
        protocol=protocol,
        metrics=metrics,
        admission=Admission(engine.config.max_num_seqs + config.max_waiting),
        max_model_len=engine.max_model_len,
        model_root=engine.config.model,
        max_body_bytes=config.max_body_bytes,
        api_key=config.api_key,
    )


def serve(engine_config: EngineConfig, config: ServerConfig, sampling_overrides: dict) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code (0 after a graceful shutdown)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_loading)  # nothing is in flight yet: just leave
    engine = build_engine(engine_config)
    state = build_state(engine, config, sampling_overrides, engine_config.name)
    server = _waitress_server(state, config)
    state.engine.start()
    shutdown = GracefulShutdown(server, state, config.grace_period)
    shutdown.install()
    logger.info(
        "serving %s on http://%s:%s (max %d running + %d waiting requests, %d worker threads)",
        engine_config.name, config.host, server.effective_port, engine_config.max_num_seqs,
        config.max_waiting, server.adj.threads,
    )  # fmt: skip
    server.run()
    state.engine.stop()
    logger.info("server stopped")
    return 0


def _waitress_server(state: ServerState, config: ServerConfig) -> BaseWSGIServer:
    threads = state.admission.limit + SPARE_THREADS
    return waitress.create_server(
        build_app(state),
        host=config.host,
        port=config.port,
        threads=threads,
        # Idle keep-alive connections count too; leave room so a 503 can always get through.
        connection_limit=2 * threads + 16,
        # Above our own limit, so that our handler (not waitress) answers 413 in OpenAI's shape.
        max_request_body_size=4 * config.max_body_bytes,
        ident="nanovllm",
        # Lets a handler see that its client left (waitress.client_disconnected), so a
        # non-streamed request is aborted instead of generating for nobody.
        channel_request_lookahead=1,
    )


def _stop_loading(signum: int, frame) -> None:
    logger.info("received %s while loading the model; exiting", signal.Signals(signum).name)
    raise SystemExit(0)


class GracefulShutdown:
    """First signal: stop listening, drain within the grace period, then stop. Second: hurry."""

    def __init__(self, server: BaseWSGIServer, state: ServerState, grace_period: float) -> None:
        self.server = server
        self.state = state
        self.grace_period = grace_period
        self.started = False
        self.hurry = threading.Event()  # a second signal: end the requests in flight now
        self.drained = threading.Event()  # the drain is over: the next SIGINT stops the loop

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        # Runs in the main thread, which also runs waitress' event loop.
        if self.drained.is_set():
            raise SystemExit(0)  # waitress' run() catches it and stops its workers
        if self.started:
            logger.warning("second signal: ending the requests in flight now")
            self.hurry.set()
            return
        self.started = True
        admission = self.state.admission
        admission.close()
        logger.info(
            "received %s: no longer accepting requests; %d in flight get up to %.0f s to finish",
            signal.Signals(signum).name, admission.in_flight, self.grace_period,
        )  # fmt: skip
        # Refuse new connections at once; open ones (and waitress' trigger) keep working. The
        # close runs from the event loop (the trigger), not here: this handler may interrupt a
        # select() that is about to be retried on the listening socket.
        self.server.trigger.pull_trigger(lambda: dispatcher.close(self.server))
        threading.Thread(target=self._drain, name="nanovllm-shutdown", daemon=True).start()

    def _drain(self) -> None:
        admission = self.state.admission
        deadline = time.monotonic() + self.grace_period
        while not self.hurry.is_set() and time.monotonic() < deadline:
            if admission.wait_idle(min(0.1, max(0.0, deadline - time.monotonic()))):
                break
        if admission.in_flight:
            logger.warning("grace period over: ending %d requests", admission.in_flight)
        # Also refuses anything that slipped in between admission and submission.
        self.state.engine.shut_down("the server is shutting down")
        admission.wait_idle(FINAL_WRITE_S)
        _wait_flushed(self.server, FINAL_WRITE_S)
        self.drained.set()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _wait_flushed(server: BaseWSGIServer, timeout: float) -> None:
    """Wait until waitress has sent every response byte (the last chunks of ended streams)."""
    # waitress has no public API for this; its channels' pending requests and output buffers
    # say whether anything is still on its way.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channels = [c for c in list(server._map.values()) if isinstance(c, HTTPChannel)]
        if all(not c.requests and not c.total_outbufs_len for c in channels):
            return
        time.sleep(0.02)
