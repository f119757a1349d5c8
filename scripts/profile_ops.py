"""Where a decode token's time goes, op by op: every op of the backend wrapped with a counter,
over greedy tokens of one sequence after a warm-up.

Usage: NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/profile_ops.py \\
           [--device cpu|cpu-reference] [--model smollm2-demo] [--tokens 24] [--clock cpu|wall]
           [--quantization auto|q8-activations]

`--clock cpu` (process CPU time) is the figure to trust on a shared machine with one thread;
`--clock wall` is what a user sees, and the one to use for several threads.
"""

from __future__ import annotations

import argparse
import collections
import time

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
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from nanovllm.models import load_model

    model = load_model(args.model, device=args.device, quantization=args.quantization)
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for name in OPS:
        op = getattr(model.backend, name)

        def timed(*a, _op=op, _name=name, **k):
            start = clock()
            result = _op(*a, **k)
            spent[_name] += clock() - start
            calls[_name] += 1
            return result

        setattr(model.backend, name, timed)
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


if __name__ == "__main__":
    main()
