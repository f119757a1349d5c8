"""`nanovllm bench overhead`: what a decode step costs besides the model.

The engine is assembled from its real parts around a NullModel, whose forward and LM head cost
nothing, and the parts are wrapped in timers (`Timed`), so a step's time splits into
scheduling, batch building, sampling, and detokenization + stop rules + outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from nanovllm.sampling_params import RequestOutputKind, SamplingParams


class NullModel:
    """Stands in for the model: no layers, and forward and LM head cost nothing (views of a fixed
    random table), so a step's time is all engine overhead."""

    def __init__(self, config, seed: int = 0) -> None:
        self.config = dataclasses.replace(config, num_layers=0)  # no KV cache either
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((4096, config.vocab_size), dtype=np.float32)

    def forward(self, input_ids, positions, meta, kv_caches):
        return np.zeros((len(input_ids), 1), dtype=np.float32)  # float32 rows, as a model's

    def compute_logits(self, rows):
        return self.table[: len(rows)]  # a view: producing logits is the model's cost, not ours


class Timed:
    """A part of the engine whose named methods add their wall time to spent[name]."""

    def __init__(self, part, spent: Counter, name: str, methods: tuple[str, ...]) -> None:
        self._part, self._spent, self._name, self._methods = part, spent, name, methods

    def __getattr__(self, attr: str):
        value = getattr(self._part, attr)
        if attr not in self._methods:
            return value

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._spent[self._name] += time.perf_counter() - start

        return timed


@dataclass(slots=True)
class OverheadResult:
    num_seqs: int
    steps: int
    outputs: str  # final_only (offline generate), cumulative or delta (streaming server)
    ms_per_step: float
    ms_schedule: float
    ms_runner: float
    ms_sampler: float
    ms_postprocess: float

    def as_dict(self) -> dict:
        return asdict(self)


def timed_engine(config, spent: Counter):
    """The engine's real parts around a NullModel, each timed; no weights are loaded."""
    from nanovllm.backends import get_backend
    from nanovllm.engine.assembly import length_limit, model_info, num_kv_blocks
    from nanovllm.engine.block_manager import BlockManager
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.engine.model_runner import ModelRunner
    from nanovllm.engine.output_processor import OutputProcessor
    from nanovllm.engine.sampler import Sampler
    from nanovllm.engine.scheduler import Scheduler
    from nanovllm.models.loader import load_checkpoint

    checkpoint = load_checkpoint(config.model, config.tokenizer)
    backend = get_backend(config.device, config.dtype, config.num_threads)
    info = model_info(checkpoint, length_limit(config, checkpoint.config))
    model, eos = NullModel(checkpoint.config), info.eos_token_ids
    num_blocks = num_kv_blocks(config, backend, [model.config])
    sampler = Timed(Sampler(config.seed, backend), spent, "sampler", ("verify",))
    runner = ModelRunner(model, backend, [], config.block_size, sampler, eos)
    manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(config, manager, 0, info.max_model_len)
    return LLMEngine(
        config,
        info,
        Timed(scheduler, spent, "schedule", ("schedule",)),
        Timed(runner, spent, "runner", ("execute",)),
        OutputProcessor(info.tokenizer, eos, info.max_model_len),
    )


def run_overhead(
    config, num_seqs: int, steps: int, kind: RequestOutputKind, prompt_len: int = 32
) -> OverheadResult:
    """Decode steps of num_seqs sequences through the engine around a NullModel."""
    spent: Counter = Counter()
    engine = timed_engine(config, spent)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True, output_kind=kind)
    for i in range(num_seqs):
        engine.add_request(f"overhead-{i}", rng.integers(0, vocab, prompt_len).tolist(), params)
    while engine.stats().num_waiting or engine.stats().num_running < num_seqs:
        engine.step()  # prefill everything first: we time decode steps
    preempted = engine.stats().num_preemptions
    spent.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    if engine.stats().num_preemptions != preempted:
        raise RuntimeError("sequences were preempted during the timed steps; raise --num-blocks")
    runner = spent["runner"] - spent["sampler"]  # the sampler runs inside execute
    rest = total - spent["schedule"] - spent["runner"]
    timings = (total, spent["schedule"], runner, spent["sampler"], rest)
    return OverheadResult(num_seqs, steps, kind.name.lower(), *(1000 * t / steps for t in timings))


def cmd_overhead(args: argparse.Namespace) -> int:
    from nanovllm.args import engine_config

    config = engine_config(args)
    config.max_num_seqs = max(config.max_num_seqs, args.num_seqs)
    config.max_num_batched_tokens = max(config.max_num_batched_tokens, args.num_seqs * 32)
    # Room for every sequence to the end, so the timed steps are decodes, not preemptions.
    per_seq = -(-(32 + args.steps + 8) // config.block_size)
    config.num_blocks = max(config.num_blocks, args.num_seqs * per_seq)
    for kind in (
        RequestOutputKind.FINAL_ONLY,
        RequestOutputKind.CUMULATIVE,
        RequestOutputKind.DELTA,
    ):
        result = run_overhead(config, args.num_seqs, args.steps, kind)
        _report_overhead(result, args.json)
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


def add_overhead_parser(kinds) -> None:
    from nanovllm.args import add_engine_args

    oh = kinds.add_parser(
        "overhead", help="per-step engine overhead with a model that costs nothing"
    )
    add_engine_args(oh)
    oh.add_argument("--num-seqs", type=int, default=256, help="sequences decoding together")
    oh.add_argument("--steps", type=int, default=100, help="decode steps timed")
    oh.add_argument("--json", action="store_true", help="print one JSON object per line")
    oh.set_defaults(func=cmd_overhead)
