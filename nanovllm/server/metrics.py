"""Prometheus metrics under vLLM's names, in the server's own CollectorRegistry.

Gauges and token counters are read from the engine thread's latest `EngineStats` snapshot at
scrape time (the engine already counts them); request-level counters and latency histograms
are observed by the engine thread when a request finishes or is aborted.
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
FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, stats))
        registry, labels = self.registry, ["model_name"]
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason.",
            ["finished_reason", "model_name"], registry=registry,
        )  # fmt: skip
        for reason in FINISH_REASONS:  # export zeros from the start, as vLLM does
            self.request_success.labels(reason, model_name)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.",
            labels, buckets=TTFT_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time per output token after the first, per request, in seconds.",
            labels, buckets=TPOT_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
            labels, buckets=E2E_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip

    def on_finished(self, output: RequestOutput) -> None:
        """Count one finished engine request (one prompt) and observe its latencies."""
        reason = output.outputs[0].finish_reason or "stop"
        self.request_success.labels(reason, self.model_name).inc()
        metrics = output.metrics
        if metrics is None:
            return
        if metrics.time_to_first_token is not None:
            self.ttft.observe(metrics.time_to_first_token)
        if metrics.e2e_latency is not None:
            self.e2e.observe(metrics.e2e_latency)
        longest = max(len(choice.token_ids) for choice in output.outputs)
        if longest > 1 and metrics.first_token_time and metrics.finish_time:
            self.tpot.observe((metrics.finish_time - metrics.first_token_time) / (longest - 1))

    def on_aborted(self, count: int) -> None:
        self.request_success.labels("abort", self.model_name).inc(count)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Engine gauges and token counters, read from the latest stats snapshot at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats, name = self.stats(), [self.model_name]
        gauges = (
            ("vllm:num_requests_running", "Sequences in the running batch.", stats.num_running),
            ("vllm:num_requests_waiting", "Sequences waiting to run.", stats.num_waiting),
            ("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
             stats.kv_cache_usage),
        )  # fmt: skip
        yield from _families(GaugeMetricFamily, gauges, name)
        counters = (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hits),
            ("vllm:num_preemptions", "Preemptions by the scheduler.", stats.num_preemptions),
            ("vllm:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens),
            ("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens),
        )  # fmt: skip
        yield from _families(CounterMetricFamily, counters, name)
        yield from _families(CounterMetricFamily, _structured_counters(stats), name)
        if stats.spec is not None:
            yield from _spec_decode_families(stats.spec, name)


def _structured_counters(stats: EngineStats) -> tuple:
    """Structured outputs (no vLLM metric says this): constrained requests, and the host time
    spent computing their token masks (grammar, allowed_token_ids, bad_words)."""
    masks = stats.masks
    return (
        ("nanovllm:structured_output_requests",
         "Requests with a token constraint (grammar, allowed_token_ids or bad_words).",
         stats.num_constrained_requests),
        ("nanovllm:structured_output_mask_seconds",
         "Seconds spent computing token masks on the host.", masks.seconds),
        ("nanovllm:structured_output_mask_rows",
         "Logits rows masked (one per constrained sequence per step, k + 1 when verifying).",
         masks.num_rows),
    )  # fmt: skip


def _families(kind, rows, name: list[str]) -> Iterator[Metric]:
    """One single-sample family per (metric, help, value) row, labelled with the model name."""
    for metric, doc, value in rows:
        family = kind(metric, doc, labels=["model_name"])
        family.add_metric(name, value)
        yield family


def _spec_decode_families(spec, name: list[str]) -> Iterator[Metric]:
    """vLLM's speculative-decoding counters; acceptance per draft position carries a label."""
    counters = (
        ("vllm:spec_decode_num_drafts", "Speculative steps that proposed drafts.", spec.num_drafts),
        ("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens),
        ("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
         spec.num_accepted_tokens),
    )  # fmt: skip
    yield from _families(CounterMetricFamily, counters, name)
    per_pos = CounterMetricFamily(
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "Draft tokens accepted at each draft position.",
        labels=["model_name", "position"],
    )
    for position, value in enumerate(spec.accepted_per_pos):
        per_pos.add_metric([*name, str(position)], value)
    yield per_pos
