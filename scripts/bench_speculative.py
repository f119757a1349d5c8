"""Speculative decoding on the CPU: SmolLM2 (the demo GGUF) editing a code snippet it must mostly
repeat, greedy, with and without n-gram prompt lookup. Prints tokens/s of both, the acceptance
rate and whether the outputs are identical (they must be: greedy speculation is exact).

Usage: python scripts/bench_speculative.py [--k 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from nanovllm import LLM, SamplingParams

SNIPPET = """def moving_average(values, window):
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result


def normalize(values):
    lowest = min(values)
    highest = max(values)
    span = highest - lowest
    return [(value - lowest) / span for value in values]
"""

TASKS = [
    "Rename the function moving_average to rolling_mean and change nothing else. "
    "Reply with the whole code.",
    "Add a docstring to each function and change nothing else. Reply with the whole code.",
    "Rename the variable values to samples everywhere and change nothing else. "
    "Reply with the whole code.",
    "Add type hints (list[float], int) to both functions and change nothing else. "
    "Reply with the whole code.",
]


def run(llm: LLM, max_tokens: int) -> tuple[float, int, list[list[int]]]:
    conversations = [
        [{"role": "user", "content": f"{task}\n\n```python\n{SNIPPET}```"}] for task in TASKS
    ]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    return elapsed, sum(map(len, tokens)), tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=4, help="speculative tokens per step")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--max-requests", type=int, default=1, help="1: latency-bound single stream"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = {}
    for name, extra in (
        ("plain", {}),
        ("ngram", {"speculative_method": "ngram", "num_speculative_tokens": args.k}),
    ):
        llm = LLM("smollm2-demo", device="cpu", max_num_seqs=args.max_requests, **extra)
        run(llm, 4)  # warm-up
        elapsed, tokens, ids = run(llm, args.max_tokens)
        spec = llm.engine.stats().spec
        rows[name] = {
            "tokens_per_s": tokens / elapsed,
            "output_tokens": tokens,
            "acceptance_rate": spec.acceptance_rate if spec else None,
            "mean_acceptance_length": spec.mean_acceptance_length if spec else None,
            "ids": ids,
        }
    same = rows["plain"].pop("ids") == rows["ngram"].pop("ids")
    result = {
        **rows,
        "speedup": rows["ngram"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
        "identical": same,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"plain: {rows['plain']['tokens_per_s']:.1f} tok/s | ngram k={args.k}: "
          f"{rows['ngram']['tokens_per_s']:.1f} tok/s, acceptance {100 * rows['ngram']['acceptance_rate']:.1f}%, "
          f"mean acceptance length {rows['ngram']['mean_acceptance_length']:.2f} | "
          f"speedup {result['speedup']:.2f}x | identical outputs: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
