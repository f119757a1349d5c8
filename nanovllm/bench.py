"""`nanovllm bench throughput`: offline throughput on random prompts, as vLLM's benchmark measures it.

Prompt and output lengths are drawn uniformly from the given ranges; prompts are random token
ids (so the prefix cache cannot help) and every request ignores EOS, generating exactly its
output length.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(slots=True)
class ThroughputResult:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    max_requests: int
    preemptions: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict:
        return asdict(self) | {
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }


def parse_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32:256' -> (32, 256)."""
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


def random_requests(num: int, input_len, output_len, vocab_size: int, seed: int):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(input_len[0], input_len[1] + 1, size=num)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=num)
    prompts = [rng.integers(0, vocab_size, size=n).tolist() for n in inputs]
    return prompts, outputs.tolist()


def run_throughput(llm, num_prompts: int, input_len, output_len, seed: int = 0) -> ThroughputResult:
    from nanovllm.sampling_params import SamplingParams

    engine = llm.engine
    prompts, lengths = random_requests(
        num_prompts, input_len, output_len, engine.model_config.vocab_size, seed
    )
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm.generate(
        [prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False
    )  # warm-up
    before = engine.stats().num_preemptions
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        num_requests=num_prompts,
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        elapsed_s=elapsed,
        max_requests=engine.config.max_num_seqs,
        preemptions=engine.stats().num_preemptions - before,
    )


def cmd_throughput(args: argparse.Namespace) -> int:
    from nanovllm.cli import engine_config
    from nanovllm.llm import LLM

    llm = LLM.from_config(engine_config(args))
    result = run_throughput(llm, args.num_prompts, args.input_len, args.output_len, args.bench_seed)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"{result.num_requests} requests in {result.elapsed_s:.2f} s: "
            f"{result.requests_per_s:.2f} requests/s, {result.output_tokens_per_s:.1f} output tokens/s, "
            f"{result.total_tokens_per_s:.1f} total tokens/s "
            f"(max-requests {result.max_requests}, {result.preemptions} preemptions)"
        )
    return 0


class NullModel:
    """Stands in for the model: forward and LM head cost nothing, so a step's time is all engine
    overhead (scheduling, block bookkeeping, batch building, sampling, detokenization)."""

    def __init__(self, config, seed: int = 0) -> None:
        self.config = config
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((4096, config.vocab_size), dtype=np.float32)

    def forward(self, input_ids, positions, meta, kv_caches):
        return np.arange(len(input_ids)) % len(self.table)

    def compute_logits(self, rows):
        return self.table[: len(rows)]  # a view: producing logits is the model's cost, not ours


@dataclass(slots=True)
class OverheadResult:
    num_seqs: int
    steps: int
    outputs: str  # "final_only" (offline generate) or "cumulative" (streaming server)
    ms_per_step: float
    ms_schedule: float
    ms_runner: float
    ms_sampler: float
    ms_postprocess: float

    def as_dict(self) -> dict:
        return asdict(self)


def run_overhead(
    engine, num_seqs: int, steps: int, prompt_len: int = 32, final_only: bool = True
) -> OverheadResult:
    """Decode steps of num_seqs sequences through the real engine around a NullModel."""
    from nanovllm.sampling_params import RequestOutputKind, SamplingParams

    engine.runner.model = NullModel(engine.model_config)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True, output_kind=kind)
    for i in range(num_seqs):
        engine.add_request(f"overhead-{i}", rng.integers(0, vocab, prompt_len).tolist(), params)
    while engine.stats().num_waiting or engine.stats().num_running < num_seqs:
        engine.step()  # prefill everything first: we time decode steps
    preempted = engine.stats().num_preemptions
    timings = _time_steps(engine, steps)
    if engine.stats().num_preemptions != preempted:
        raise RuntimeError("sequences were preempted during the timed steps; raise --num-blocks")
    for i in range(num_seqs):
        engine.abort_request(f"overhead-{i}")
    outputs = "final_only" if final_only else "cumulative"
    return OverheadResult(num_seqs, steps, outputs, *(1000 * t / steps for t in timings))


def _time_steps(engine, steps: int) -> tuple[float, ...]:
    schedule, logits, sample = engine.scheduler.schedule, engine.runner.logits, engine.runner.sample
    spent = {"schedule": 0.0, "runner": 0.0, "sampler": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    engine.scheduler.schedule = timed("schedule", schedule)
    engine.runner.logits = timed("runner", logits)
    engine.runner.sample = timed("sampler", sample)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    del engine.scheduler.schedule, engine.runner.logits, engine.runner.sample
    return total, spent["schedule"], spent["runner"], spent["sampler"], total - sum(spent.values())


def cmd_overhead(args: argparse.Namespace) -> int:
    from nanovllm.cli import engine_config
    from nanovllm.engine.llm_engine import LLMEngine

    config = engine_config(args)
    config.max_num_seqs = max(config.max_num_seqs, args.num_seqs)
    config.max_num_batched_tokens = max(config.max_num_batched_tokens, args.num_seqs * 32)
    # Room for every sequence to the end, so the timed steps are decodes, not preemptions.
    per_seq = -(-(32 + args.steps + 8) // config.block_size)
    config.num_blocks = max(config.num_blocks, args.num_seqs * per_seq)
    engine = LLMEngine(config)
    for final_only in (True, False):
        _report_overhead(
            run_overhead(engine, args.num_seqs, args.steps, final_only=final_only), args.json
        )
    return 0


def _report_overhead(result: OverheadResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"{result.num_seqs} sequences, {result.steps} decode steps, {result.outputs} outputs: "
            f"{result.ms_per_step:.3f} ms/step "
            f"(schedule {result.ms_schedule:.3f}, batch build + null forward {result.ms_runner:.3f}, "
            f"sampler {result.ms_sampler:.3f}, detokenize + stop checks + outputs "
            f"{result.ms_postprocess:.3f})"
        )


def add_bench_parser(sub) -> None:
    from nanovllm.cli import add_engine_args

    bench = sub.add_parser("bench", help="measure the engine")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    tp = kinds.add_parser("throughput", help="offline throughput on random prompts")
    add_engine_args(tp)
    tp.add_argument("--num-prompts", type=int, default=32)
    tp.add_argument("--input-len", type=parse_range, default=(32, 32), help="N or MIN:MAX tokens")
    tp.add_argument(
        "--output-len", type=parse_range, default=(128, 128), help="N or MIN:MAX tokens"
    )
    tp.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    tp.add_argument("--json", action="store_true", help="print one JSON object")
    tp.set_defaults(func=cmd_throughput)

    oh = kinds.add_parser(
        "overhead", help="per-step engine overhead with a model that costs nothing"
    )
    add_engine_args(oh)
    oh.add_argument("--num-seqs", type=int, default=256)
    oh.add_argument("--steps", type=int, default=100)
    oh.add_argument("--json", action="store_true")
    oh.set_defaults(func=cmd_overhead)

    from nanovllm.bench_serve import add_serve_bench_parser

    add_serve_bench_parser(kinds)
