"""`nanovllm bench structured`: what token masks cost a batch, JSON-schema requests against free ones.

Each round runs the same random prompts twice on one engine: free decoding, and every request
under a JSON schema (an array of records that cannot end within the output length, so the
batch stays full). The free and constrained phases alternate, their order swapping each round,
so that a busy machine slows both alike. Only decode steps of the full batch are timed (every
sequence running, none prefilling); the constrained phase also reports the host time of the
step's masks (`ModelRunner.mask_stats`: llguidance filling the bitmask rows, and applying them
to the logits). On a shared machine whole-step times move by far more than the masks cost;
the masks' own time against the free step time is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

from nanovllm.bench.workload import random_requests

# Records with strings, numbers, enums and nesting: masks of every kind, and no early end.
SCHEMA = {
    "type": "array",
    "minItems": 50,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        },
        "required": ["name", "age", "role", "scores"],
        "additionalProperties": False,
    },
}


@dataclass(slots=True)
class Phase:
    step_s: list[float] = field(default_factory=list)  # decode steps of the full batch
    mask_s: float = 0.0  # filling the masks
    apply_s: float = 0.0  # applying them
    mask_rows: int = 0
    mask_steps: int = 0

    @property
    def median_step_ms(self) -> float:
        return 1000 * statistics.median(self.step_s)


@dataclass(slots=True)
class StructuredResult:
    batch: int
    output_len: int
    rounds: int
    free_step_ms: list[float]  # median per round
    masked_step_ms: list[float]
    mask_ms_per_step: float  # host time computing the step's masks
    mask_us_per_row: float
    apply_ms_per_step: float  # host time applying them to the logits

    @property
    def ratio(self) -> float:
        return statistics.median(self.masked_step_ms) / statistics.median(self.free_step_ms)

    @property
    def overhead(self) -> float:
        """The masks' own time (fill + apply) over the free decode step."""
        masks = self.mask_ms_per_step + self.apply_ms_per_step
        return masks / statistics.median(self.free_step_ms)

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio, "overhead": self.overhead}


def run_structured(llm, batch: int, input_len, output_len: int, rounds: int, seed: int = 0):
    from nanovllm.sampling_params import SamplingParams
    from nanovllm.structured import StructuredOutputsParams

    engine = llm.engine
    prompts, _ = random_requests(batch, input_len, (output_len, output_len),
                                 engine.model_config.vocab_size, seed)  # fmt: skip
    free = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    masked = free.clone(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    engine.structured.validate(masked)  # compile once, outside the timed phases
    llm.generate([prompts[0][:8]], masked.clone(max_tokens=4), use_tqdm=False)  # warm-up
    phases: dict[str, list[Phase]] = {"free": [], "masked": []}
    for i in range(rounds):
        order = ("free", "masked") if i % 2 == 0 else ("masked", "free")
        for name in order:
            params = free if name == "free" else masked
            phases[name].append(_phase(engine, prompts, params, f"{name}{i}"))
    masked_phases = phases["masked"]
    rows = sum(p.mask_rows for p in masked_phases)
    seconds = sum(p.mask_s for p in masked_phases)
    steps = max(sum(p.mask_steps for p in masked_phases), 1)
    return StructuredResult(
        batch=batch,
        output_len=output_len,
        rounds=rounds,
        free_step_ms=[p.median_step_ms for p in phases["free"]],
        masked_step_ms=[p.median_step_ms for p in masked_phases],
        mask_ms_per_step=1000 * seconds / steps,
        mask_us_per_row=1e6 * seconds / max(rows, 1),
        apply_ms_per_step=1000 * sum(p.apply_s for p in masked_phases) / steps,
    )


def _phase(engine, prompts: list[list[int]], params, tag: str) -> Phase:
    """Run the batch to the end, timing the decode steps in which all of it runs."""
    for j, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{j}", prompt, params)
    phase, masks = Phase(), engine.runner.mask_stats
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        full = len(running) == len(prompts) and all(seq.is_decoding for seq in running)
        before = masks.snapshot()
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if full:
            phase.step_s.append(elapsed)
            phase.mask_rows += masks.num_rows - before.num_rows
            phase.mask_s += masks.seconds - before.seconds
            phase.apply_s += masks.apply_seconds - before.apply_seconds
            phase.mask_steps += masks.num_rows > before.num_rows
    return phase


def cmd_structured(args: argparse.Namespace) -> int:
    from nanovllm.args import engine_config
    from nanovllm.llm import LLM

    config = engine_config(args)
    config.max_num_seqs = max(config.max_num_seqs, args.batch)
    llm = LLM.from_config(config)
    result = run_structured(llm, args.batch, args.input_len, args.output_len, args.rounds,
                            args.bench_seed)  # fmt: skip
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    spread = lambda values: f"{min(values):.1f}-{max(values):.1f}"  # noqa: E731
    print(
        f"batch {result.batch}, {result.rounds} rounds: decode step "
        f"{statistics.median(result.free_step_ms):.1f} ms free ({spread(result.free_step_ms)}), "
        f"{statistics.median(result.masked_step_ms):.1f} ms under a JSON schema "
        f"({spread(result.masked_step_ms)}): {result.ratio:.3f}x; masks "
        f"{result.mask_ms_per_step:.2f} ms per step ({result.mask_us_per_row:.1f} us per row) "
        f"+ {result.apply_ms_per_step:.2f} ms applying them: {100 * result.overhead:.1f}% of a "
        "free step"
    )
    return 0


def add_structured_parser(kinds) -> None:
    from nanovllm.args import add_engine_args
    from nanovllm.bench.workload import parse_range

    sp = kinds.add_parser(
        "structured", help="decode step time with JSON-schema masks against free decoding"
    )
    add_engine_args(sp)
    sp.add_argument("--batch", type=int, default=32, help="requests decoding together")
    sp.add_argument("--input-len", type=parse_range, default=(32, 32), help="N or MIN:MAX tokens")
    sp.add_argument("--output-len", type=int, default=48, help="tokens per request")
    sp.add_argument("--rounds", type=int, default=3, help="free/constrained pairs, alternated")
    sp.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_structured)
