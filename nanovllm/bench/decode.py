"""`nanovllm bench decode`: decode steps of a model with random weights and a real model's shapes
(no download), at several batch sizes, with and without CUDA graphs, float16 or Q4_K weights.

Each sequence sits at position `context` (its KV cache holds that many tokens), and a timed step
is what the model runner does for a decode batch: the forward (a graph replay, or eager
launches), then the greedy next tokens brought back to the host (the step's one sync).
Scheduling, detokenization and outputs are not in it (`nanovllm bench overhead` measures those).
The H100 projection of docs/kernels.md (nanovllm/bench/projection.py: arithmetic, not a
measurement) is printed next to what was measured with graphs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np

from nanovllm.bench.projection import decode_step
from nanovllm.models.model_config import ModelConfig

SHAPES = {
    # Qwen3-0.6B's config.json: 28 layers, 16 query / 8 kv heads of 128, tied embeddings.
    "qwen3-0.6b": dict(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
        tie_word_embeddings=True, qk_norm=True,
    ),
    # For a dry run on the emulated device: every matrix a whole number of Q4_K blocks.
    "tiny": dict(
        architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=512,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True, qk_norm=True,
    ),
}  # fmt: skip
WEIGHTS = ("f16", "q4_k")
BLOCK_SIZE = 16


@dataclass(slots=True)
class DecodeResult:
    weights: str
    batch: int
    mode: str  # "graphs", "eager", "padded" (no CuPy to capture with), "eager: capture failed"
    ms_per_step: float
    tokens_per_s: float
    projection_tokens_per_s: float | None
    last_tokens: list[int]  # the greedy tokens of the last step: the same with and without

    def as_dict(self) -> dict:
        return asdict(self)


def model_config(shapes: str) -> ModelConfig:
    return ModelConfig(**SHAPES[shapes])


def random_checkpoint(config: ModelConfig, weights: str, seed: int = 0):
    """A Checkpoint of random weights in the shapes of `config`: matrices float16 ("f16") or
    random Q4_K blocks with sane scales ("q4_k"), norms near 1. Tensors are made one at a time
    as the loader asks, so the host never holds the model."""
    from nanovllm.backends.matmul_cases import random_blocks
    from nanovllm.models.loader import Checkpoint
    from nanovllm.models.quantized import Q, QuantizedTensor
    from nanovllm.models.registry import model_class

    cls = model_class(config.architecture)
    shapes = dict(cls.global_tensor_shapes(config))
    for i in range(config.num_layers):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in cls.layer_tensor_shapes(config).items()}

    def tensors():
        rng = np.random.default_rng(seed)
        for name, shape in shapes.items():
            if len(shape) == 1:
                yield name, rng.uniform(0.8, 1.2, shape).astype(np.float32)
            elif weights == "q4_k":
                blocks = random_blocks("q4_k", *shape, rng)
                yield name, QuantizedTensor(Q.Q4_K, shape, blocks)
            else:
                scale = 0.5 if name.endswith("embed_tokens.weight") else shape[1] ** -0.5
                values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
                yield name, QuantizedTensor.from_array(values.astype(np.float16))

    return Checkpoint(config, None, {}, tensors)


def run_decode(
    model, backend, batch: int, context: int, steps: int, graphs: bool, warmup: int = 3
) -> tuple[float, str, list[int]]:
    """(seconds per timed step, how decode ran, the last step's tokens) for `batch` sequences at
    position `context`, decoding `steps` tokens after `warmup` untimed ones."""
    from nanovllm.engine.assembly import allocate_kv_cache
    from nanovllm.engine.batch import ForwardItem
    from nanovllm.engine.model_runner import ModelRunner
    from nanovllm.engine.sampler import Sampler

    length = context + warmup + steps + 1
    per_seq = -(-length // BLOCK_SIZE)
    kv = allocate_kv_cache(backend, model.config, batch * per_seq, BLOCK_SIZE)
    runner = ModelRunner(model, backend, kv, BLOCK_SIZE, Sampler(0, backend), [])
    if graphs:
        runner.enable_decode_graphs(batch, length)
    seqs = [SimpleNamespace(block_table=list(range(i * per_seq, (i + 1) * per_seq))) for i in range(batch)]  # fmt: skip
    tokens = [(7 * i + 1) % model.config.vocab_size for i in range(batch)]

    def step(position: int) -> list[int]:
        items = [ForwardItem(seq, position, [t], 1) for seq, t in zip(seqs, tokens, strict=True)]
        logits = runner.logits(items)
        return backend.to_numpy(logits.argmax(axis=1)).tolist()

    for position in range(context, context + warmup):
        tokens = step(position)
    start = time.perf_counter()
    for position in range(context + warmup, context + warmup + steps):
        tokens = step(position)
    elapsed = (time.perf_counter() - start) / steps
    return elapsed, _mode(runner.decode_graphs), tokens


def _mode(graphs) -> str:
    if graphs is None:
        return "eager"
    if graphs.eager:
        return "eager: capture failed"
    if graphs.graphs is None:
        return "padded"
    graphs.graphs.release()  # the next case captures its own
    return "graphs"


def bench_decode(
    shapes: str,
    weights: str,
    batches: list[int],
    context: int,
    steps: int,
    device: str = "cuda",
    dtype: str = "float16",
) -> list[DecodeResult]:
    """Every batch size with and without graphs, for one model built once."""
    from nanovllm.backends import get_backend
    from nanovllm.models.loader import build_model

    backend = get_backend(device, dtype)
    config = model_config(shapes)
    backend.check_model(config)
    model = build_model(random_checkpoint(config, weights), backend, context + steps + 64)
    results = []
    for batch in batches:
        for graphs in (True, False):
            seconds, mode, last = run_decode(model, backend, batch, context, steps, graphs)
            projected = None
            if graphs and shapes == "qwen3-0.6b":
                projected = batch / decode_step(config, batch, context, weights).step_s
            ms = 1000 * seconds
            results.append(DecodeResult(weights, batch, mode, ms, batch / seconds, projected, last))
    return results


def format_row(r: DecodeResult) -> str:
    projection = f"{r.projection_tokens_per_s:>10,.0f}" if r.projection_tokens_per_s else ""
    return (
        f"{r.weights:>7} {r.batch:>6} {r.mode:<22} {r.ms_per_step:>9.3f} "
        f"{r.tokens_per_s:>12,.0f} {projection:>10}"
    )


HEADER = (
    f"{'weights':>7} {'batch':>6} {'decode':<22} {'ms/step':>9} {'tokens/s':>12} {'H100 proj.':>10}"
)


def cmd_decode(args: argparse.Namespace) -> int:
    batches = [int(b) for b in args.batch.split(",")]
    if not args.json:
        print(f"decode steps of random {args.shapes} weights, context {args.context}, "
              f"{args.steps} timed steps, device {args.device} ({args.dtype})")  # fmt: skip
        print(HEADER)
    for weights in args.weights or list(WEIGHTS):
        for result in bench_decode(
            args.shapes, weights, batches, args.context, args.steps, args.device, args.dtype
        ):
            print(json.dumps(result.as_dict()) if args.json else format_row(result), flush=True)
    return 0


def add_decode_parser(kinds) -> None:
    parser = kinds.add_parser(
        "decode", help="decode steps of a random-weight model at several batch sizes"
    )
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="qwen3-0.6b",
                        help="whose layer shapes the random weights take (tiny: a dry run)")  # fmt: skip
    parser.add_argument("--weights", choices=WEIGHTS, action="append",
                        help="float16 or Q4_K matrices (repeatable; default both)")  # fmt: skip
    parser.add_argument("--batch", default="1,8,64,256", help="batch sizes, comma-separated")
    parser.add_argument(
        "--context", type=int, default=512, help="tokens already cached per sequence"
    )
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per case")
    parser.add_argument("--device", choices=("cuda", "cuda-emulated"), default="cuda",
                        help="a GPU, or the CPU emulator of the CUDA kernels (slow: tiny shapes)")  # fmt: skip
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="activations and dense weights")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.set_defaults(func=cmd_decode)
