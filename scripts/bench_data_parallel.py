"""Data parallelism on one machine (docs/benchmarks.md, "Data parallel on Ray").

Starts `nanovllm serve` on a tiny model (tests/checkpoints.py's llama3 unless --model) in three
configurations, one after another, for --rounds rounds (the machine is shared: alternating the
configurations spreads any background load over all of them; medians are reported):

  single   one engine in the server process, no Ray (the default)
  ray-1    one replica through Ray (--data-parallel-size 1 --ray-address local): Ray's cost
  ray-2    two replicas (--data-parallel-size 2)

and in each measures, with `nanovllm bench serve`'s client:
  throughput   --requests streamed requests (random token-id prompts) at --concurrency
  burst        short requests (1 output token) at high concurrency: the front end's request rate
  latency      sequential requests of 1 token (per-request overhead) and of 64 tokens
               (per streamed token overhead)

Then, without a server: the router's decision cost (prefix keys + choice) for token-id and text
prompts, and Ray's bare cost per streamed message (an async actor yielding to an asyncio
consumer in a thread, as the router consumes replicas).

    python scripts/bench_data_parallel.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from nanovllm.bench.serve import run_serve_bench, stream_completion

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "single": [],
    "ray-1": ["--data-parallel-size", "1", "--ray-address", "local"],
    "ray-2": ["--data-parallel-size", "2"],
}


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import build_checkpoint

    return build_checkpoint("llama3", folder)


def start_server(model: Path, flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    command = [sys.executable, "-m", "nanovllm.server.cli", "--model", str(model), "--device",
               "cpu", "--host", "127.0.0.1", "--port", str(port), *flags]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=length).tolist() for _ in range(count)]


def sequential(url: str, model: str, count: int, max_tokens: int) -> dict:
    latencies, tpots = [], []
    for prompt in prompts(count, 32, seed=max_tokens):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        result = stream_completion(url, body, None, 60)
        assert result.ok, result.error
        latencies.append(result.latency)
        if result.tpot is not None:
            tpots.append(result.tpot)
    out = {"latency_ms_p50": 1000 * statistics.median(latencies)}
    if tpots:
        out["tpot_ms_p50"] = 1000 * statistics.median(tpots)
    return out


def measure(name: str, model_path: Path, args, log_dir: Path) -> dict:
    proc, url = start_server(model_path, CONFIGS[name], log_dir / f"{name}.log")
    try:
        with urllib.request.urlopen(url + "/v1/models") as response:
            model = json.load(response)["data"][0]["id"]
        sequential(url, model, 5, 4)  # warm-up
        load = run_serve_bench(url, model, prompts(args.requests, 32, 1), [args.output_len] * args.requests, args.concurrency)  # fmt: skip
        burst = run_serve_bench(url, model, prompts(args.burst, 16, 2), [1] * args.burst, args.burst_concurrency)  # fmt: skip
        assert load.failed == 0 and burst.failed == 0, (load.errors, burst.errors)
        one = sequential(url, model, args.sequential, 1)
        long = sequential(url, model, args.sequential // 2, 64)
        return {
            "config": name,
            "requests_per_s": load.requests_per_s,
            "output_tokens_per_s": load.output_tokens_per_s,
            "burst_requests_per_s": burst.requests_per_s,
            "one_token_latency_ms_p50": one["latency_ms_p50"],
            "tpot_ms_p50": long["tpot_ms_p50"],
        }
    finally:
        proc.terminate()
        proc.wait(60)


def router_cost(model_path: Path, repeats: int = 5, count: int = 2000) -> dict:
    from nanovllm.distributed.router import Router
    from nanovllm.models.loader import load_checkpoint

    tokenizer = load_checkpoint(str(model_path)).tokenizer
    encode = lambda text: tokenizer.encode(text, True)  # noqa: E731
    text = ("Beautiful is better than ugly. Explicit is better than implicit. " * 40)[:2500]
    cases = {"token_ids_1000": prompts(1, 1000, 3)[0], "text_2500_chars": text}
    out = {}
    for case, prompt in cases.items():
        runs = []
        for _ in range(repeats):
            router = Router(2, 16, 8)
            start = time.perf_counter()
            for i in range(count):
                keys = router.prefix_keys(prompt, encode)
                decision = router.choose(str(i), keys, [True, True])
                router.started(decision.engine, 1)
                router.finished(decision.engine, 1)
            runs.append((time.perf_counter() - start) / count)
        out[f"router_us_{case}"] = 1e6 * statistics.median(runs)
    return out


def ray_message_cost(count: int = 2000, repeats: int = 3) -> dict:
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="WARNING")

    @ray.remote
    class Yielder:
        async def stream(self, n: int):
            for i in range(n):
                yield i

    actor = Yielder.remote()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def consume(n: int) -> float:
        start = time.perf_counter()
        async for ref in actor.stream.options(num_returns="streaming").remote(n):
            await ref
        return time.perf_counter() - start

    runs = [asyncio.run_coroutine_threadsafe(consume(count), loop).result() for _ in range(repeats + 1)][1:]  # fmt: skip
    ray.shutdown()
    return {"ray_stream_message_us": 1e6 * statistics.median(runs) / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--burst", type=int, default=512)
    parser.add_argument("--burst-concurrency", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=40)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    model_path = args.model or tiny_model(log_dir / "model")
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name in CONFIGS:
            result = measure(name, model_path, args, log_dir)
            print(json.dumps({"round": round_, **result}), flush=True)
            runs[name].append(result)
    summary = {}
    for name, results in runs.items():
        keys = [k for k in results[0] if k != "config"]
        summary[name] = {k: statistics.median(r[k] for r in results) for k in keys}
        summary[name]["spread"] = {k: [min(r[k] for r in results), max(r[k] for r in results)] for k in keys}  # fmt: skip
    summary["router"] = router_cost(model_path)
    summary["ray"] = ray_message_cost()
    print(json.dumps({"summary": summary}, indent=1))


if __name__ == "__main__":
    main()
