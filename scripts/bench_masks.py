"""How long grammar masks take per logits row, on real tokenizers (not a test; see docs).

For each tokenizer (SmolLM2's 49152 and Qwen2.5's 151936 tokens, as nanovllm's GGUF loader
builds them) and a few JSON schemas, the constraint follows real JSON documents token by token:

- single: GrammarConstraint.fill_bitmask for one row at every position of the documents;
- serial: fill_bitmask for 32 sequences at different positions, one after the other;
- batch: fill_bitmasks for the same 32 at once (llguidance's thread pool);
- drafts: the same 32 with 3 speculative drafts each (4 rows per sequence);
- apply: apply_token_bitmask (NumPy) on 32 rows of float32 logits;
- compile: a first compile of the schema, and a fresh constraint from the cached grammar.

Each figure is the median over `--repeats` rounds (the spread is printed too); rounds of
different kinds alternate, so a busy machine slows all of them alike.

    .venv/bin/python scripts/bench_masks.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _structured_fixtures import demo_tokenizer  # noqa: E402

from nanovllm.structured.bitmask import allocate_bitmask, apply_token_bitmask  # noqa: E402
from nanovllm.structured.compiler import GrammarCompiler  # noqa: E402
from nanovllm.structured.constraint import fill_bitmasks  # noqa: E402
from nanovllm.structured.params import StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,3}$"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "address", "tags", "score"],
}
DOCUMENTS = [
    {
        "name": "Alice Smith",
        "age": 42,
        "email": "alice.smith@example.com",
        "address": {"street": "12 Rue de Rivoli", "city": "Paris"},
        "tags": ["admin", "user"],
        "score": 0.875,
    },
    {
        "name": "Bob",
        "age": 7,
        "email": "bob@mail.org",
        "address": {"street": "1 Main St", "city": "Springfield"},
        "tags": [],
        "score": -12.5,
    },
]


def median_spread(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.1f} us  [{min(samples):.1f}-{max(samples):.1f}]"


def bench(demo: str, repeats: int) -> None:
    model = demo_tokenizer(demo)
    tok, vocab = model.tokenizer, model.vocab_size
    params = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab, model.eos_token_ids)
    _ = compiler.ll_tokenizer  # built on the compiler's threads: wait for it
    built = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile(params)
    first_compile = time.perf_counter() - start
    docs = [tok.encode(json.dumps(d), add_special_tokens=False) for d in DOCUMENTS]
    positions = [(d, p) for d, ids in enumerate(docs) for p in range(len(ids))]

    def constraint_at(doc: int, position: int):
        constraint = compiled.constraint()
        for token in docs[doc][:position]:
            assert constraint.accept(token)
        return constraint

    # 32 sequences spread over the documents' positions, each with its next 3 tokens as drafts.
    picks = [positions[i * len(positions) // 32] for i in range(32)]
    batch = [(constraint_at(d, p), docs[d][p + 1 : p + 4]) for d, p in picks]
    plain = [(c, []) for c, _ in batch]
    out1 = allocate_bitmask(1, vocab)
    out32 = allocate_bitmask(32, vocab)
    out128 = allocate_bitmask(32 * 4, vocab)
    logits = np.random.default_rng(0).standard_normal((32, vocab)).astype(np.float32)
    kinds = ("single", "serial", "batch", "drafts", "apply", "new")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        per_row = []
        for ids in docs:  # one sequence walking a whole document
            constraint = compiled.constraint()
            for token in ids:
                t = time.perf_counter()
                constraint.fill_bitmask([], out1)
                per_row.append(time.perf_counter() - t)
                constraint.accept(token)
        times["single"].append(statistics.median(per_row) * 1e6)
        t = time.perf_counter()
        for i, (constraint, _) in enumerate(plain):
            constraint.fill_bitmask([], out32[i : i + 1])
        times["serial"].append((time.perf_counter() - t) / 32 * 1e6)
        t = time.perf_counter()
        fill_bitmasks(plain, out32)
        times["batch"].append((time.perf_counter() - t) / 32 * 1e6)
        t = time.perf_counter()
        fill_bitmasks(batch, out128[: sum(len(p) + 1 for _, p in batch)])
        times["drafts"].append((time.perf_counter() - t) / sum(len(p) + 1 for _, p in batch) * 1e6)
        work = logits.copy()
        t = time.perf_counter()
        apply_token_bitmask(work, out32)
        times["apply"].append((time.perf_counter() - t) / 32 * 1e6)
        t = time.perf_counter()
        compiled.constraint()
        times["new"].append((time.perf_counter() - t) * 1e6)
    print(f"{demo}: vocabulary {vocab}, {sum(map(len, docs))} document tokens")
    print(f"  llguidance tokenizer built   {built * 1e3:8.1f} ms")
    print(f"  first compile of the schema  {first_compile * 1e3:8.1f} ms")
    print(f"  fresh constraint (cached)    {median_spread(times['new'])}")
    print(f"  mask, one row at a time      {median_spread(times['single'])} per row (median step)")
    print(f"  mask, 32 rows one by one     {median_spread(times['serial'])} per row")
    print(f"  mask, 32 rows batched        {median_spread(times['batch'])} per row")
    print(f"  mask, 32 x (1 + 3 drafts)    {median_spread(times['drafts'])} per row")
    print(f"  apply to float32 logits      {median_spread(times['apply'])} per row (NumPy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for demo in ("smollm2-demo", "qwen2.5-coder-demo"):
        bench(demo, args.repeats)


if __name__ == "__main__":
    main()
