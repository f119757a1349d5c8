"""What the dashboard shows, computed from polls: parsing, rates, percentiles. No Textual here.

One poll brings the server's Prometheus text (`/metrics`) and its engine state JSON
(`/v1/engine/state`; with data-parallel replicas, one block map and request list per replica). `parse_metrics` and `parse_state` turn them into records; a `Tracker`
keeps the recent polls and derives `Figures`, the one object every widget renders:
throughput from counter deltas between consecutive polls, TTFT/TPOT percentiles estimated
from histogram buckets (Prometheus' `histogram_quantile`), cache and speculation ratios.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from nanovllm.engine.stats import SequenceView  # the JSON endpoint's rows, as the engine made them

HISTORY_S = 300.0  # the sparklines cover the last five minutes
RECENT_S = 60.0  # the "1m" latency window
QUANTILES = (0.5, 0.9, 0.99)


# ---- /metrics ------------------------------------------------------------------------------
@dataclass(slots=True)
class Histogram:
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count), ascending, +Inf last
    count: float
    sum: float

    def minus(self, older: Histogram) -> Histogram | None:
        """The observations made since `older`; None if the buckets differ or went backwards."""
        if [le for le, _ in older.buckets] != [le for le, _ in self.buckets]:
            return None
        buckets = [(le, n - m) for (le, n), (_, m) in zip(self.buckets, older.buckets, strict=True)]
        if any(n < 0 for _, n in buckets):
            return None  # a counter reset: the server restarted
        return Histogram(buckets, self.count - older.count, self.sum - older.sum)


@dataclass(slots=True)
class SpecSample:
    num_drafts: float
    num_draft_tokens: float
    num_accepted_tokens: float
    accepted_per_pos: list[float]  # indexed by draft position


@dataclass(slots=True)
class MetricsSample:
    """The vLLM metrics of one scrape, summed over model names (a server serves one) and
    engines (data-parallel replicas), except the KV-cache usage, which is their mean."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    preemptions: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    finished: dict[str, float] = field(default_factory=dict)  # finished_reason -> requests
    ttft: Histogram | None = None
    tpot: Histogram | None = None
    spec: SpecSample | None = None  # None unless the server speculates
    model_name: str | None = None  # the model_name label, when the server sets one
    # Structured outputs (nanovllm's own counters; a vLLM server has none).
    constrained_requests: float = 0.0
    mask_seconds: float = 0.0
    mask_rows: float = 0.0


_SCALARS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "nanovllm:structured_output_requests_total": "constrained_requests",
    "nanovllm:structured_output_mask_seconds_total": "mask_seconds",
    "nanovllm:structured_output_mask_rows_total": "mask_rows",
}
# Per figure, the names vLLM versions used for it, preferred first: vLLM 0.9 renamed
# gpu_cache_usage_perc (kept as a deprecated alias until 0.11), and per-token latency moved
# from time_per_output_token_seconds to inter_token_latency_seconds.
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_HISTOGRAMS = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "tpot": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
}
_SPEC = "vllm:spec_decode_num_"


def parse_metrics(text: str) -> MetricsSample:
    """Read the vLLM metrics out of Prometheus text; metrics that are absent stay 0 / None.
    Series of several engines (vLLM's `engine` label, data parallelism) add up; the KV cache's
    usage is their mean."""
    sample, spec = MetricsSample(), {}
    per_pos: dict[int, float] = {}
    histograms: dict[str, Histogram] = {}
    usage: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if any(family.name in names for names in _HISTOGRAMS.values()):
            histograms[family.name] = _histogram(family.samples)
            continue
        for s in family.samples:
            sample.model_name = sample.model_name or s.labels.get("model_name")
            if s.name.startswith("vllm:") and not math.isfinite(s.value):
                raise ValueError(f"{s.name} is {s.value}")
            if s.name in _KV_USAGE:
                usage.setdefault(s.name, []).append(s.value)
            elif s.name in _SCALARS:
                attr = _SCALARS[s.name]
                setattr(sample, attr, getattr(sample, attr) + s.value)
            elif s.name == "vllm:request_success_total":
                reason = s.labels.get("finished_reason", "")
                sample.finished[reason] = sample.finished.get(reason, 0.0) + s.value
            elif s.name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
                pos = int(s.labels["position"])
                per_pos[pos] = per_pos.get(pos, 0.0) + s.value
            elif s.name.startswith(_SPEC) and s.name.endswith("_total"):
                key = s.name[len(_SPEC) : -len("_total")]
                spec[key] = spec.get(key, 0.0) + s.value
    for attr, names in _HISTOGRAMS.items():
        setattr(sample, attr, next((histograms[n] for n in names if n in histograms), None))
    values = next((usage[name] for name in _KV_USAGE if name in usage), [])
    sample.kv_cache_usage = sum(values) / len(values) if values else 0.0
    if spec:
        positions = range(max(per_pos) + 1) if per_pos else range(0)
        sample.spec = SpecSample(
            spec.get("drafts", 0.0),
            spec.get("draft_tokens", 0.0),
            spec.get("accepted_tokens", 0.0),
            [per_pos.get(p, 0.0) for p in positions],
        )
    return sample


def _histogram(samples) -> Histogram:
    buckets: dict[float, float] = {}
    count = total = 0.0
    for s in samples:
        if s.name.endswith("_bucket"):
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
        elif s.name.endswith("_count"):
            count += s.value
        elif s.name.endswith("_sum"):
            total += s.value
    return Histogram(sorted(buckets.items()), count, total)


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """Prometheus' estimate: linear interpolation inside the bucket holding rank q × count.

    None without observations. A rank that lands in the +Inf bucket gives the largest finite
    bound, as Prometheus does.
    """
    buckets = hist.buckets
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


# ---- /v1/engine/state ----------------------------------------------------------------------
@dataclass(slots=True)
class ReplicaView:
    """One data-parallel replica as the router sees it."""

    engine: str  # the `engine` label of its metrics
    status: str  # "up", "restarting" or "failed"
    restarts: int
    outstanding: int  # sequences the router has in flight on it
    blocks: str
    sequences: list[SequenceView]
    pid: int | None = None
    node: str | None = None


@dataclass(slots=True)
class EngineState:
    """The server's live sequences and the state of each KV block, one character per block."""

    blocks: str  # "u" used, "s" shared, "c" free holding a cached prefix, "." free
    block_size: int
    max_num_seqs: int
    sequences: list[SequenceView]
    replicas: list[ReplicaView] = field(default_factory=list)  # data parallel: side by side
    engine_of: dict[str, str] = field(default_factory=dict)  # request id -> replica's label

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_used(self) -> int:  # shared blocks are in use too, as in kv_cache_usage_perc
        return self.blocks.count("u") + self.blocks.count("s")

    @property
    def num_shared(self) -> int:
        return self.blocks.count("s")

    @property
    def num_cached(self) -> int:
        return self.blocks.count("c")

    @property
    def num_free(self) -> int:
        return self.blocks.count(".")

    @property
    def running(self) -> list[SequenceView]:
        return [seq for seq in self.sequences if seq.state == "running"]

    @property
    def waiting(self) -> list[SequenceView]:
        return [seq for seq in self.sequences if seq.state == "waiting"]


def parse_state(obj: object) -> EngineState:
    """The JSON of /v1/engine/state; ValueError if it does not have that shape."""
    try:
        replicas = [_replica(r) for r in obj.get("replicas", [])]
        return EngineState(
            blocks=str(obj["blocks"]),
            block_size=int(obj["block_size"]),
            max_num_seqs=int(obj["max_num_seqs"]),
            sequences=[_sequence(s) for s in obj["sequences"]],
            replicas=replicas,
            engine_of={s.request_id: r.engine for r in replicas for s in r.sequences},
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"unexpected engine state JSON: {e!r}") from e


def _sequence(s: dict) -> SequenceView:
    return SequenceView(
        str(s["request_id"]), int(s["index"]), str(s["state"]), int(s["prompt_tokens"]),
        int(s["output_tokens"]), int(s["computed_tokens"]), int(s["num_blocks"]),
        float(s["age_s"]),
    )  # fmt: skip


def _replica(r: dict) -> ReplicaView:
    return ReplicaView(
        engine=str(r["engine"]),
        status=str(r["status"]),
        restarts=int(r["restarts"]),
        outstanding=int(r["outstanding"]),
        blocks=str(r.get("blocks", "")),
        sequences=[_sequence(s) for s in r["sequences"]],
        pid=r.get("pid"),
        node=r.get("node"),
    )


# ---- derived figures -----------------------------------------------------------------------
@dataclass(slots=True)
class Percentiles:
    values: tuple[float | None, ...]  # one per QUANTILES entry
    count: float  # observations in the window


@dataclass(slots=True)
class SpecFigures:
    """Since the server started, as vLLM's log line."""

    acceptance_rate: float | None  # accepted / drafted tokens
    mean_acceptance_length: float | None  # 1 + accepted / drafts
    per_position: list[float]  # accepted at position i / drafts
    num_drafts: float


@dataclass(slots=True)
class Figures:
    """Everything one poll shows. Rates are None until two polls exist."""

    polled_at: float  # time.time() of the poll
    metrics: MetricsSample
    engine: EngineState | None  # None if the state endpoint refused or is missing
    prompt_tps: float | None
    generation_tps: float | None
    prompt_tps_history: list[float]
    generation_tps_history: list[float]
    ttft_recent: Percentiles | None  # requests finished in the last RECENT_S seconds
    ttft_all: Percentiles | None  # since the server started
    tpot_recent: Percentiles | None
    tpot_all: Percentiles | None
    prefix_cache_hit_rate: float | None  # since the server started
    spec: SpecFigures | None
    mask_ms_per_row: float | None = None  # host time per masked row, since the server started

    @property
    def num_finished(self) -> float:
        return sum(self.metrics.finished.values())


@dataclass(slots=True)
class Point:
    """One successful poll, kept for rates and the recent latency window."""

    t: float  # time.monotonic()
    metrics: MetricsSample
    prompt_tps: float | None
    generation_tps: float | None


class Tracker:
    """Keeps the polls of the last HISTORY_S seconds; `update` returns the new figures."""

    def __init__(self) -> None:
        self.points: deque[Point] = deque()

    def update(
        self, t: float, wall: float, metrics: MetricsSample, engine: EngineState | None
    ) -> Figures:
        last = self.points[-1] if self.points else None
        if last is not None and _went_backwards(last.metrics, metrics):
            self.points.clear()  # the server restarted: old deltas mean nothing
            last = None
        prompt_tps = _rate(last, t, metrics, "prompt_tokens")
        generation_tps = _rate(last, t, metrics, "generation_tokens")
        self.points.append(Point(t, metrics, prompt_tps, generation_tps))
        while self.points and self.points[0].t < t - HISTORY_S:
            self.points.popleft()
        base = self._recent_base(t)
        return Figures(
            polled_at=wall,
            metrics=metrics,
            engine=engine,
            prompt_tps=prompt_tps,
            generation_tps=generation_tps,
            prompt_tps_history=[p.prompt_tps for p in self.points if p.prompt_tps is not None],
            generation_tps_history=[
                p.generation_tps for p in self.points if p.generation_tps is not None
            ],
            ttft_recent=_window(metrics.ttft, base.ttft),
            ttft_all=_window(metrics.ttft, None),
            tpot_recent=_window(metrics.tpot, base.tpot),
            tpot_all=_window(metrics.tpot, None),
            prefix_cache_hit_rate=_ratio(metrics.prefix_cache_hits, metrics.prefix_cache_queries),
            spec=_spec_figures(metrics.spec),
            mask_ms_per_row=_ratio(1000 * metrics.mask_seconds, metrics.mask_rows),
        )

    def _recent_base(self, t: float) -> MetricsSample:
        """The newest poll at least RECENT_S old, else the oldest poll (the window is shorter)."""
        base = self.points[0]
        for point in self.points:
            if point.t > t - RECENT_S:
                break
            base = point
        return base.metrics


def _went_backwards(old: MetricsSample, new: MetricsSample) -> bool:
    return new.prompt_tokens < old.prompt_tokens or new.generation_tokens < old.generation_tokens


def _rate(last: Point | None, t: float, metrics: MetricsSample, name: str) -> float | None:
    if last is None or t <= last.t:
        return None
    return (getattr(metrics, name) - getattr(last.metrics, name)) / (t - last.t)


def _window(hist: Histogram | None, base: Histogram | None) -> Percentiles | None:
    """Percentiles of the observations in `hist` made after `base` (all of them if no base)."""
    if hist is not None and base is not None:
        hist = hist.minus(base)  # the same poll as base gives an empty window
    if hist is None:
        return None
    return Percentiles(tuple(histogram_quantile(q, hist) for q in QUANTILES), hist.count)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _spec_figures(spec: SpecSample | None) -> SpecFigures | None:
    if spec is None:
        return None
    drafts = spec.num_drafts
    return SpecFigures(
        acceptance_rate=_ratio(spec.num_accepted_tokens, spec.num_draft_tokens),
        mean_acceptance_length=1 + spec.num_accepted_tokens / drafts if drafts else None,
        per_position=[n / drafts if drafts else 0.0 for n in spec.accepted_per_pos],
        num_drafts=drafts,
    )
