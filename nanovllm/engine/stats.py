"""Engine statistics: counters and gauges the server exports and the logs print."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllm.engine.spec_decode import SpecStats


@dataclass(slots=True)
class MaskStats:
    """Token masks computed (structured outputs): sequence-steps, rows and host seconds."""

    num_seqs: int = 0  # a sequence masked in a step counts once per step
    num_rows: int = 0  # logits rows masked (k + 1 per sequence when verifying k guesses)
    seconds: float = 0.0  # computing the masks on the host (llguidance)
    apply_seconds: float = 0.0  # applying them to the logits (on a GPU: launching the kernel)

    def record(self, num_seqs: int, num_rows: int, seconds: float, apply_seconds: float) -> None:
        self.num_seqs += num_seqs
        self.num_rows += num_rows
        self.seconds += seconds
        self.apply_seconds += apply_seconds

    def snapshot(self) -> MaskStats:
        return MaskStats(self.num_seqs, self.num_rows, self.seconds, self.apply_seconds)


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int  # free, but still holding a reusable prefix
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found
    prompt_tokens: int
    generation_tokens: int
    num_finished_requests: int
    num_steps: int
    spec: SpecStats | None = None  # speculative decoding counters, when it is on
    num_constrained_requests: int = 0  # requests with a grammar, allowed_token_ids or bad_words
    masks: MaskStats = field(default_factory=MaskStats)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


@dataclass(slots=True)
class IterationStats:
    """What one step did, for latency histograms (vLLM's IterationStats): replaced every step,
    so nothing accumulates when nobody reads it."""

    num_tokens: int = 0  # token slots the step ran (prefill chunks, decodes, guesses)
    time_to_first_tokens: list[float] = field(default_factory=list)  # requests that got one
    # Per sequence that gained tokens and had some before: seconds since its previous ones.
    inter_token_latencies: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SequenceView:
    request_id: str
    index: int
    state: str  # "running" or "waiting"
    prompt_tokens: int
    output_tokens: int
    computed_tokens: int
    num_blocks: int
    age_s: float


@dataclass(slots=True)
class EngineSnapshot:
    """What Prometheus cannot carry: every live sequence and the state of every KV block."""

    sequences: list[SequenceView]
    # One character per block: "u" used by one sequence, "s" shared by several, "c" free but
    # holding a reusable cached prefix, "." free.
    blocks: str
