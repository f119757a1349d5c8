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

from nanovllm.bench.workload import parse_range, random_requests


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
    from nanovllm.args import engine_config
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


def add_throughput_parser(kinds) -> None:
    from nanovllm.args import add_engine_args

    tp = kinds.add_parser("throughput", help="offline throughput on random prompts")
    add_engine_args(tp)
    tp.add_argument("--num-prompts", type=int, default=32, help="requests to run")
    tp.add_argument("--input-len", type=parse_range, default=(32, 32), help="N or MIN:MAX tokens")
    tp.add_argument(
        "--output-len", type=parse_range, default=(128, 128), help="N or MIN:MAX tokens"
    )
    tp.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    tp.add_argument("--json", action="store_true", help="print one JSON object")
    tp.set_defaults(func=cmd_throughput)
