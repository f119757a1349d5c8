"""`nanovllm bench`: throughput (offline), overhead (the engine around a model that costs
nothing), serve (latency of a running server), structured (what token masks cost a batch) and
decode (decode steps of a random-weight model on a GPU, with and without CUDA graphs)."""

from __future__ import annotations


def add_bench_parser(sub) -> None:
    from nanovllm.bench.decode import add_decode_parser
    from nanovllm.bench.overhead import add_overhead_parser
    from nanovllm.bench.serve import add_serve_bench_parser
    from nanovllm.bench.structured import add_structured_parser
    from nanovllm.bench.throughput import add_throughput_parser

    bench = sub.add_parser("bench", help="measure the engine")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    add_throughput_parser(kinds)
    add_overhead_parser(kinds)
    add_serve_bench_parser(kinds)
    add_structured_parser(kinds)
    add_decode_parser(kinds)
