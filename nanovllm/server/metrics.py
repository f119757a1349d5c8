"""Prometheus metrics under vLLM's names, in the server's own CollectorRegistry.

Gauges and token counters are read from the engine thread's latest `EngineStats` snapshot at
scrape time (the engine already counts them); request-level counters and latency histograms
are observed by the engine thread when a request finishes or is aborted.

With data-parallel replicas every series carries vLLM V1's `engine` label ("0" .. "N-1"), as
vLLM's own data-parallel deployment exports them; the router reports finishes and aborts with
the replica they happened on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nanovllm.engine.stats import EngineStats
from nanovllm.outputs import RequestOutput

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        stats: Callable[[], list[EngineStats]],
        engines: list[str] | None = None,
    ) -> None:
        """`stats`: the latest EngineStats of each engine. `engines`: their `engine` labels, or
        None for a single engine exported without the label."""
        self.model_name = model_name
        self.engines: list[str | None] = list(engines) if engines else [None]
        names = ["model_name"] + (["engine"] if engines else [])
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(self, stats, names))
        registry = self.registry
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason.",
            ["finished_reason", *names], registry=registry,
        )  # fmt: skip
        for engine in self.engines:  # export zeros from the start, as vLLM does
            for reason in FINISH_REASONS:
                self.request_success.labels(reason, *self.labels(engine))
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.",
            names, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time per output token after the first, per request, in seconds.",
            names, buckets=TPOT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
            names, buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        for engine in self.engines:  # empty histograms from the start, as vLLM exports them
            for histogram in (self.ttft, self.tpot, self.e2e):
                histogram.labels(*self.labels(engine))

    def labels(self, engine: str | None) -> list[str]:
        return [self.model_name] if engine is None else [self.model_name, engine]

    def on_finished(self, output: RequestOutput, engine: str | None = None) -> None:
        """Count one finished engine request (one prompt) and observe its latencies."""
        reason = output.outputs[0].finish_reason or "stop"
        labels = self.labels(engine)
        self.request_success.labels(reason, *labels).inc()
        metrics = output.metrics
        if metrics is None:
            return
        if metrics.time_to_first_token is not None:
            self.ttft.labels(*labels).observe(metrics.time_to_first_token)
        if metrics.e2e_latency is not None:
            self.e2e.labels(*labels).observe(metrics.e2e_latency)
        longest = max(len(choice.token_ids) for choice in output.outputs)
        if longest > 1 and metrics.first_token_time and metrics.finish_time:
            tpot = (metrics.finish_time - metrics.first_token_time) / (longest - 1)
            self.tpot.labels(*labels).observe(tpot)

    def on_aborted(self, count: int, engine: str | None = None) -> None:
        self.request_success.labels("abort", *self.labels(engine)).inc(count)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Engine gauges and token counters, read from the latest stats snapshots at scrape time."""

    def __init__(
        self, metrics: ServerMetrics, stats: Callable[[], list[EngineStats]], names: list[str]
    ) -> None:
        self.metrics = metrics
        self.stats = stats
        self.names = names

    def collect(self) -> Iterator[Metric]:
        engines = list(zip(self.metrics.engines, self.stats(), strict=True))
        gauges = {
            "vllm:num_requests_running": ("Sequences in the running batch.", "num_running"),
            "vllm:num_requests_waiting": ("Sequences waiting to run.", "num_waiting"),
            "vllm:kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0 to 1).",
                                         "kv_cache_usage"),
        }  # fmt: skip
        yield from self._families(GaugeMetricFamily, gauges, engines)
        counters = {
            "vllm:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                                          "prefix_cache_queries"),
            "vllm:prefix_cache_hits": ("Prompt tokens found in the prefix cache.",
                                       "prefix_cache_hits"),
            "vllm:num_preemptions": ("Preemptions by the scheduler.", "num_preemptions"),
            "vllm:prompt_tokens": ("Prompt tokens processed.", "prompt_tokens"),
            "vllm:generation_tokens": ("Tokens generated.", "generation_tokens"),
        }  # fmt: skip
        yield from self._families(CounterMetricFamily, counters, engines)
        speculating = [(engine, stats.spec) for engine, stats in engines if stats.spec is not None]
        if speculating:
            yield from self._spec_decode_families(speculating)

    def _families(self, kind, rows: dict, engines: list) -> Iterator[Metric]:
        """One family per metric, one sample per engine: rows map a name to (help, stat)."""
        for metric, (doc, attr) in rows.items():
            family = kind(metric, doc, labels=self.names)
            for engine, stats in engines:
                family.add_metric(self.metrics.labels(engine), getattr(stats, attr))
            yield family

    def _spec_decode_families(self, engines: list) -> Iterator[Metric]:
        """vLLM's speculative-decoding counters; acceptance per draft position carries a label."""
        counters = {
            "vllm:spec_decode_num_drafts": ("Speculative steps that proposed drafts.", "num_drafts"),
            "vllm:spec_decode_num_draft_tokens": ("Draft tokens proposed.", "num_draft_tokens"),
            "vllm:spec_decode_num_accepted_tokens": ("Draft tokens accepted.",
                                                     "num_accepted_tokens"),
        }  # fmt: skip
        yield from self._families(CounterMetricFamily, counters, engines)
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position.",
            labels=[*self.names, "position"],
        )
        for engine, spec in engines:
            for position, value in enumerate(spec.accepted_per_pos):
                per_pos.add_metric([*self.metrics.labels(engine), str(position)], value)
        yield per_pos
