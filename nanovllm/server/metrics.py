"""Prometheus metrics as vLLM V1 exports them (vllm/v1/metrics/loggers.py): the same names, help
texts, buckets and labels — `model_name` and `engine` on every series — in the server's own
CollectorRegistry, plus the process metrics prometheus_client collects (vLLM's default registry
has them too).

Three sources feed them:
- gauges and the engine's counters are read from the engine thread's latest `EngineStats`
  snapshot at scrape time (the engine already counts them);
- per-step latencies are observed by the engine thread after every step (`on_step`): time to
  first token, and the inter-token latency of every sequence that gained tokens (one
  observation per token, or per accepted run of tokens when speculating, as vLLM);
- per-request histograms and the finish counter are observed when a request finishes
  (`on_finished`) or is aborted (`on_aborted`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from nanovllm.engine.stats import EngineStats, IterationStats
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

LABELS = ["model_name", "engine"]
# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error")
# (name, help) of the request-phase histograms, all with E2E_BUCKETS; the phase is the
# RequestMetrics property of the same name.
_PHASES = (
    ("e2e_latency", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("queue_time", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("inference_time", "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."),
    ("prefill_time", "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("decode_time", "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
)  # fmt: skip


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets of token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class ServerMetrics:
    """The server's metrics. With data-parallel replicas, `num_engines` > 1 and every series of
    replica i carries engine="i", as vLLM's own data-parallel deployment exports them; the
    callbacks take the replica's label."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], list[EngineStats]],
        max_model_len: int = 8192,
        cache_info: dict[str, str] | None = None,
        num_engines: int = 1,
        step_feed: bool = True,
    ) -> None:
        """`step_feed`: the engine thread calls on_step after each step. Without it (replicas
        in other processes), time to first token and time per output token are observed from
        each finished request's own timings instead."""
        self.model_name = model_name
        self.step_feed = step_feed
        self.engines = [str(i) for i in range(num_engines)]
        self.registry = CollectorRegistry()
        collector = _EngineStatsCollector(model_name, self.engines, stats, cache_info or {})
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        self.request_success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            [*LABELS, "finished_reason"], registry=self.registry,
        )  # fmt: skip
        for engine in self.engines:  # export zeros from the start, as vLLM does
            for reason in FINISH_REASONS:
                self.request_success.labels(model_name, engine, reason)
        token_buckets = build_1_2_5_buckets(max_model_len)
        h = self._histogram
        self.ttft = h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)  # fmt: skip
        self.itl = h("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TPOT_BUCKETS)  # fmt: skip
        self.tpot = h("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds. DEPRECATED: Use vllm:inter_token_latency_seconds instead.", TPOT_BUCKETS)  # fmt: skip
        self.request_tpot = h("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)  # fmt: skip
        self.iteration_tokens = h("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS)  # fmt: skip
        self.prompt_tokens = h("vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)  # fmt: skip
        self.generation_tokens = h("vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets)  # fmt: skip
        self.max_generation_tokens = h("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.", token_buckets)  # fmt: skip
        self.params_n = h("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)  # fmt: skip
        self.params_max_tokens = h("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets)  # fmt: skip
        self.phases = {attr: h(name, doc, E2E_BUCKETS) for attr, name, doc in _PHASES}

    def _histogram(self, name: str, doc: str, buckets) -> dict[str, Histogram]:
        """engine label -> the histogram of that engine (exported empty from the start)."""
        family = Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)
        return {engine: family.labels(self.model_name, engine) for engine in self.engines}

    def on_step(self, iteration: IterationStats, engine: str = "0") -> None:
        """Observe what one engine step did (called by the engine thread after each step)."""
        self.iteration_tokens[engine].observe(iteration.num_tokens)
        for ttft in iteration.time_to_first_tokens:
            self.ttft[engine].observe(ttft)
        for latency in iteration.inter_token_latencies:
            self.itl[engine].observe(latency)
            self.tpot[engine].observe(latency)

    def on_finished(
        self, output: RequestOutput, params: SamplingParams | None = None, engine: str = "0"
    ) -> None:
        """Count one finished engine request (one prompt) and observe its histograms."""
        reason = output.outputs[0].finish_reason or "stop"
        self.request_success.labels(self.model_name, engine, reason).inc()
        metrics = output.metrics
        if metrics is None:
            return
        longest = metrics.max_num_generation_tokens  # a stream's last output holds a delta
        self.prompt_tokens[engine].observe(metrics.num_prompt_tokens)
        self.generation_tokens[engine].observe(metrics.num_generation_tokens)
        self.max_generation_tokens[engine].observe(longest)
        self.params_n[engine].observe(len(output.outputs))
        if params is not None and params.max_tokens:
            self.params_max_tokens[engine].observe(params.max_tokens)
        for attr, histogram in self.phases.items():
            value = getattr(metrics, attr)
            if value is not None:
                histogram[engine].observe(value)
        if longest > 1 and metrics.decode_time is not None:
            self.request_tpot[engine].observe(metrics.decode_time / (longest - 1))
            if not self.step_feed:
                self.tpot[engine].observe(metrics.decode_time / (longest - 1))
        if not self.step_feed and metrics.time_to_first_token is not None:
            self.ttft[engine].observe(metrics.time_to_first_token)

    def on_aborted(self, count: int, engine: str = "0") -> None:
        self.request_success.labels(self.model_name, engine, "abort").inc(count)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Engine gauges and token counters, read from the latest stats snapshots at scrape time."""

    def __init__(
        self,
        model_name: str,
        engines: list[str],
        stats: Callable[[], list[EngineStats]],
        cache_info: dict[str, str],
    ) -> None:
        self.model_name = model_name
        self.engines = engines
        self.stats = stats
        self.cache_info = cache_info

    def collect(self) -> Iterator[Metric]:
        pairs = list(zip(self.engines, self.stats(), strict=False))
        rows: dict[tuple[type, str, str], list[tuple[list[str], float]]] = {}
        for engine, stats in pairs:
            for kind, metric, doc, value in _engine_rows(stats):
                rows.setdefault((kind, metric, doc), []).append(([self.model_name, engine], value))
        for (kind, metric, doc), samples in rows.items():
            family = kind(metric, doc, labels=LABELS)
            for labels, value in samples:
                family.add_metric(labels, value)
            yield family
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            labels=[*self.cache_info, "engine"],
        )  # fmt: skip
        for engine, _ in pairs:
            info.add_metric([*self.cache_info.values(), engine], 1)
        yield info
        specs = [(engine, stats.spec) for engine, stats in pairs if stats.spec is not None]
        if specs:
            yield from _spec_decode_families(self.model_name, specs)


def _engine_rows(stats: EngineStats) -> list[tuple[type, str, str, float]]:
    usage = stats.kv_cache_usage
    g, c = GaugeMetricFamily, CounterMetricFamily
    return [
        (g, "vllm:num_requests_running", "Number of requests in model execution batches.",
         stats.num_running),
        (g, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
         stats.num_waiting),
        # vLLM V0's; preemption here recomputes, it never swaps to the CPU.
        (g, "vllm:num_requests_swapped", "Number of requests swapped to CPU.", 0),
        (g, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
        (g, "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage."
         "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", usage),
        (c, "vllm:prefix_cache_queries",
         "Prefix cache queries, in terms of number of queried tokens.", stats.prefix_cache_queries),
        (c, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
         stats.prefix_cache_hits),
        (c, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
         stats.num_preemptions),
        (c, "vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens),
        (c, "vllm:generation_tokens", "Number of generation tokens processed.",
         stats.generation_tokens),
        # Structured outputs (no vLLM metric says this): constrained requests, and the host
        # time spent computing their token masks (grammar, allowed_token_ids, bad_words).
        (c, "nanovllm:structured_output_requests",
         "Requests with a token constraint (grammar, allowed_token_ids or bad_words).",
         stats.num_constrained_requests),
        (c, "nanovllm:structured_output_mask_seconds",
         "Seconds spent computing token masks on the host.", stats.masks.seconds),
        (c, "nanovllm:structured_output_mask_rows",
         "Logits rows masked (one per constrained sequence per step, k + 1 when verifying).",
         stats.masks.num_rows),
    ]  # fmt: skip


def _spec_decode_families(model_name: str, specs: list) -> Iterator[Metric]:
    """vLLM's speculative-decoding counters; acceptance per draft position carries a label."""
    rows = (
        ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", "num_drafts"),
        ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", "num_draft_tokens"),
        ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
         "num_accepted_tokens"),
    )  # fmt: skip
    for metric, doc, attr in rows:
        family = CounterMetricFamily(metric, doc, labels=LABELS)
        for engine, spec in specs:
            family.add_metric([model_name, engine], getattr(spec, attr))
        yield family
    per_pos = CounterMetricFamily(
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "Accepted tokens per draft position.",
        labels=[*LABELS, "position"],
    )
    for engine, spec in specs:
        for position, value in enumerate(spec.accepted_per_pos):
            per_pos.add_metric([model_name, engine, str(position)], value)
    yield per_pos
