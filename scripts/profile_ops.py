"""Where a decode token's time goes, op by op: every op of the backend wrapped with a counter,
over greedy tokens of one sequence after a warm-up.

Usage: NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/profile_ops.py \\
           [--device cpu|cpu-reference] [--model smollm2-demo] [--tokens 24] [--clock cpu|wall]
           [--quantization auto|q8-activations]

`--clock cpu` (process CPU time) is the figure to trust on a shared machine with one thread;
`--clock wall` is what a user sees, and the one to use for several threads.

`--workload batch|mix` instead runs scripts/compare_peers.py's workload of that name through
`LLM.generate` and splits each op's time by the rows of its call (1-2: the 16-bit integer path
by default; 3 to MAX_KERNEL_ROWS: the decode kernels; more: prefill, dequantize + BLAS); `--kernel-rows N`
sets MAX_KERNEL_ROWS for the run (nanovllm/backends/cpu.py), to find the crossover in the engine.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

OPS = ("linear", "rms_norm", "rotary", "silu_and_mul", "write_kv", "paged_attention", "embedding")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-demo")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--quantization", default="auto", help="auto, none or q8-activations")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--workload", choices=("single", "batch", "mix"), default="single")
    parser.add_argument("--kernel-rows", type=int, help="MAX_KERNEL_ROWS for this run")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.kernel_rows is not None:
        from nanovllm.backends import cpu

        cpu.MAX_KERNEL_ROWS = args.kernel_rows
        cpu.MAX_INTEGER_ROWS[cpu.Q8] = args.kernel_rows
    if args.workload != "single":
        profile_workload(args, clock)
        return

    from nanovllm.models import load_model

    model = load_model(args.model, device=args.device, quantization=args.quantization)
    spent, calls = time_ops(model.backend, clock, lambda name, rows: name)
    prompt = model.tokenizer.encode(
        "The history of the printing press begins in the fifteenth century"
    )
    model.greedy(prompt, 4)  # compiles, warms caches
    spent.clear()
    calls.clear()
    start = clock()
    model.greedy(prompt, args.tokens)
    total = (clock() - start) / args.tokens
    print(
        f"{args.device} {args.model}: {total * 1e3:.1f} ms/token ({1 / total:.1f} tok/s, {args.clock} time)"
    )
    for name, seconds in spent.most_common():
        per_token = seconds / args.tokens
        print(f"  {name:16s} {per_token * 1e3:7.2f} ms/token  ({calls[name] // args.tokens} calls)")
    print(f"  {'other':16s} {(total - sum(spent.values()) / args.tokens) * 1e3:7.2f} ms/token")


def time_ops(backend, clock, key) -> tuple[collections.Counter, collections.Counter]:
    """Wraps each op of OPS on the backend: seconds and calls, counted under key(op, rows)."""
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for name in OPS:
        op = getattr(backend, name)

        def timed(*a, _op=op, _name=name, **k):
            start = clock()
            result = _op(*a, **k)
            label = key(_name, a[0].shape[0])
            spent[label] += clock() - start
            calls[label] += 1
            return result

        setattr(backend, name, timed)
    return spent, calls


def profile_workload(args: argparse.Namespace, clock) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_peers import workload

    from nanovllm import LLM, SamplingParams

    llm = LLM(
        args.model, device=args.device, quantization=args.quantization, max_num_seqs=32,
        num_blocks=1024, max_num_batched_tokens=1024, max_model_len=1024,
    )  # fmt: skip
    backend = llm.engine.runner.backend
    from nanovllm.backends.cpu import MAX_KERNEL_ROWS

    def bucket(name: str, rows: int) -> str:
        size = "1-2" if rows <= 2 else f"3-{MAX_KERNEL_ROWS}" if rows <= MAX_KERNEL_ROWS else "more"
        return f"{name} ({size} rows)"

    spent, calls = time_ops(backend, clock, bucket)
    prompts, outputs = workload(args.workload, llm.engine.model_config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # compiles, warms caches
    spent.clear()
    calls.clear()
    start = clock()
    results = llm.generate(prompts, params, use_tqdm=False)
    total = clock() - start
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    print(f"{args.device} {args.model} {args.workload}: {tokens / total:.1f} output tok/s "
          f"({total:.1f} s, {args.clock} time, MAX_KERNEL_ROWS {MAX_KERNEL_ROWS})")  # fmt: skip
    for name, seconds in spent.most_common():
        print(f"  {name:34s} {seconds:7.2f} s  ({calls[name]} calls)")
    print(f"  {'other':34s} {total - sum(spent.values()):7.2f} s")


if __name__ == "__main__":
    main()
