"""Run the server: load the engine, size waitress, serve, and shut down gracefully on a signal.

Connections live in waitress' event loop (connections.py: deadlines for slow and stalled
clients) and cost no thread; a request in flight holds one worker thread that waits on its
queue, so the pool has a thread for every request admission lets in (max-requests +
max-waiting) plus spares that answer /health, /metrics, /tokenize and the 503s beyond the
bound. Why this arrangement: docs/architecture.md. On SIGINT/SIGTERM the server stops
listening, lets the requests in flight finish within a grace period, ends the rest with a final
error, and exits 0.

The engine is one engine thread in this process, or, with --data-parallel-size N (or a
--ray-address), N replicas on Ray behind a router (nanovllm/distributed/ray_client.py): Ray is
imported only then.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

from waitress.channel import HTTPChannel
from waitress.wasyncore import dispatcher

from nanovllm.config import EngineConfig
from nanovllm.engine.assembly import build_engine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.errors import NanovllmError
from nanovllm.server import process
from nanovllm.server.admission import Admission
from nanovllm.server.app import ServerState, build_app
from nanovllm.server.connections import Deadlines, Server, create_servers
from nanovllm.server.engine_client import EngineClient
from nanovllm.server.engine_thread import EngineThread
from nanovllm.server.limits import PromptLimit
from nanovllm.server.metrics import ServerMetrics
from nanovllm.server.protocol import ProtocolContext

logger = logging.getLogger("nanovllm.server")

SPARE_THREADS = 8  # beyond the admission bound: health, metrics, tokenize, 503 answers
# How long, after the grace period, ended streams get to write their last chunk.
FINAL_WRITE_S = 5.0


@dataclass(slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int = 1024
    grace_period: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    log_interval: float = 5.0
    receive_timeout: float = 10.0
    send_timeout: float = 30.0
    keep_alive_timeout: float = 30.0
    access_log: bool = True
    tokenizer_info: bool = False
    data_parallel_size: int = 1
    ray_address: str | None = None
    max_replica_restarts: int = 3
    # Free-form tool calls (tool_choice "auto"): vLLM's two flags.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    @property
    def distributed(self) -> bool:
        return self.data_parallel_size > 1 or self.ray_address is not None

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(self.receive_timeout, self.send_timeout, self.keep_alive_timeout)


def start_engines(
    engine_config: EngineConfig, config: ServerConfig
) -> tuple[EngineClient, ServerMetrics]:
    """One engine in a background thread, or the router of data-parallel replicas on Ray; the
    metrics each reports to."""
    name = engine_config.name
    if not config.distributed:
        engine = build_engine(engine_config)
        metrics = ServerMetrics(
            name, lambda: thread.engine_stats(), engine.max_model_len, cache_config_info(engine)
        )
        thread = EngineThread(
            engine, metrics.on_finished, metrics.on_aborted, config.log_interval, metrics.on_step
        )
        return thread, metrics
    from nanovllm.distributed.ray_client import RayEngineClient
    from nanovllm.distributed.replica_set import DataParallelOptions

    size = config.data_parallel_size
    in_flight = size * engine_config.max_num_seqs + config.max_waiting + SPARE_THREADS
    options = DataParallelOptions(
        size, config.ray_address, config.max_replica_restarts, in_flight, config.log_interval
    )
    metrics = ServerMetrics(
        name, lambda: client.engine_stats(), engine_config.max_model_len or 8192,
        num_engines=size, step_feed=False,
    )  # fmt: skip
    client = RayEngineClient(engine_config, options, metrics.on_finished, metrics.on_aborted)
    return client, metrics


def build_state(
    client: EngineClient,
    metrics: ServerMetrics,
    config: ServerConfig,
    sampling_overrides: dict,
    model_name: str,
    reasoning_parser: str | None = None,
) -> ServerState:
    """Wire validation, admission and the routes' shared state around a started engine client."""
    facts = client.facts
    tokenizer = facts.tokenizer
    # One engine in this process compiles a request's grammar in the request's thread (a bad
    # one is a 400 before it is queued); replicas on Ray find it themselves (the same 400).
    engine = getattr(client, "engine", None)
    check_constraint = engine.structured.validate if isinstance(engine, LLMEngine) else None

    protocol = ProtocolContext(
        defaults=facts.default_params.clone(**sampling_overrides),
        model_name=model_name,
        accepted_names=frozenset({model_name, facts.model}),
        render_chat=tokenizer.apply_chat_template,  # tools, chat_template_kwargs as keywords
        vocab_size=tokenizer.vocab_size,
        tool_parser=config.tool_call_parser if config.enable_auto_tool_choice else None,
        reasoning_parser=reasoning_parser,
        check_constraint=check_constraint,
    )
    running = facts.max_num_seqs * facts.num_engines
    return ServerState(
        engine=client,
        tokenizer=tokenizer,
        protocol=protocol,
        metrics=metrics,
        admission=Admission(running + config.max_waiting, running),
        max_model_len=facts.max_model_len,
        prompt_limit=PromptLimit.of(tokenizer, facts.max_model_len),
        model_root=facts.model,
        max_body_bytes=config.max_body_bytes,
        api_key=config.api_key,
        access_log=config.access_log,
        tokenizer_info=config.tokenizer_info,
    )


def cache_config_info(engine: LLMEngine) -> dict[str, str]:
    """The labels of vllm:cache_config_info (vLLM: CacheConfig.metrics_info(), as strings)."""
    config = engine.config
    return {
        "block_size": str(config.block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": str(config.enable_prefix_caching),
        "gpu_memory_utilization": str(config.gpu_memory_utilization),
        "num_gpu_blocks": str(engine.block_manager.num_blocks),
    }


def serve(engine_config: EngineConfig, config: ServerConfig, sampling_overrides: dict) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code (0 after a graceful shutdown)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_loading)  # nothing is in flight yet: just leave
    if not process.limit_malloc_arenas():
        logger.warning("could not limit malloc arenas (not glibc?); RSS may grow with threads")
    open_files = process.raise_open_files_limit()
    client, metrics = start_engines(engine_config, config)
    try:
        state = build_state(client, metrics, config, sampling_overrides, engine_config.name,
                            engine_config.reasoning_parser)  # fmt: skip
        try:
            servers = _waitress_servers(state, config, process.connection_limit(open_files))
        except OSError as e:  # taken since the CLI's check (cli.check_port)
            raise NanovllmError(
                f"cannot listen on {config.host}:{config.port}: {e.strerror}"
            ) from None
        client.start()
        shutdown = GracefulShutdown(servers, state, config.grace_period)
        shutdown.install()
        adj = servers[0].adj
        logger.info(
            "serving %s on http://%s:%s (max %d running + %d waiting requests, %d worker "
            "threads, %d connections)",
            engine_config.name, config.host, servers[0].effective_port,
            state.admission.running, config.max_waiting, adj.threads, adj.connection_limit,
        )  # fmt: skip
        servers[0].run()  # one event loop serves every listening socket
    finally:
        client.stop()
    logger.info("server stopped")
    return 0


def _waitress_servers(state: ServerState, config: ServerConfig, connections: int) -> list[Server]:
    return create_servers(
        build_app(state),
        config.deadlines,
        host=config.host,
        port=config.port,
        threads=state.admission.limit + SPARE_THREADS,
        connection_limit=connections,
        backlog=2048,
        # select() cannot watch descriptors above 1024; poll() has no such limit (Server.run
        # always polls; this says so to anything else reading the adjustments).
        asyncore_use_poll=True,
        # Bodies over our limit are refused by waitress before it buffers them, with a JSON
        # 413 and a lingering close (connections.py).
        max_request_body_size=config.max_body_bytes + 1,
        ident="nanovllm",
        # Keeps a channel readable while its request runs, so a client that closes its
        # connection is noticed at once (the close wakes the request thread).
        channel_request_lookahead=1,
        # Server.run checks the deadlines at this interval (seconds, an int).
        cleanup_interval=1,
    )


def _stop_loading(signum: int, frame) -> None:
    logger.info("received %s while loading the model; exiting", signal.Signals(signum).name)
    raise SystemExit(0)


class GracefulShutdown:
    """First signal: stop listening, drain within the grace period, then stop. Second: hurry."""

    def __init__(self, servers: list[Server], state: ServerState, grace_period: float) -> None:
        self.servers = servers
        self.state = state
        self.grace_period = grace_period
        self.started = False
        self.hurry = threading.Event()  # a second signal: end the requests in flight now
        self.drained = threading.Event()  # the drain is over: the next signal stops the loop

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
        trigger = self.servers[0].trigger
        for server in self.servers:
            trigger.pull_trigger(lambda server=server: dispatcher.close(server))
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
        _wait_flushed(self.servers[0], FINAL_WRITE_S)
        self.drained.set()
        self.servers[0].request_stop()


def _wait_flushed(server: Server, timeout: float) -> None:
    """Wait until waitress has sent every response byte (the last chunks of ended streams)."""
    # waitress has no public API for this; its channels' pending requests and output buffers
    # say whether anything is still on its way.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channels = [c for c in list(server._map.values()) if isinstance(c, HTTPChannel)]
        if all(not c.requests and not c.total_outbufs_len for c in channels):
            return
        time.sleep(0.02)
