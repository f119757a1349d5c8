"""Data parallelism on one machine (docs/benchmarks.md, "Data parallel on Ray").

Starts `nanovllm serve` on a tiny model (tests/checkpoints.py's llama3 unless --model) in three
configurations, one after another, for --rounds rounds (the machine is shared: alternating the
configurations spreads any background load over all of them; medians are reported):

  single   one engine in the server process, no Ray (the default)
  ray-1    one replica through Ray (--data-parallel-size 1 --ray-address local): Ray's cost
  ray-2    two replicas (--data-parallel-size 2)

and in each measures, with streaming clients on raw sockets (one write per request):
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
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _local_server import start_server, tiny_model

CONFIGS = {
    "single": [],
    "ray-1": ["--data-parallel-size", "1", "--ray-address", "local"],
    "ray-2": ["--data-parallel-size", "2"],
}


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=length).tolist() for _ in range(count)]


def stream(port: int, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """One streamed completion on a fresh connection, sent in one write (http.client's two
    writes meet Nagle and delayed ACKs and add ~40 ms here); (first token, [DONE]) seconds."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()  # fmt: skip
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        start = time.perf_counter()
        sock.sendall(head + body)
        data, first = b"", None
        while b"data: [DONE]" not in data:
            received = sock.recv(65536)
            if not received:
                raise RuntimeError(f"the stream ended early: {data[-300:]!r}")
            data += received
            if first is None and b"data: " in data:  # a completion's first event is its first token
                first = time.perf_counter() - start
        if b'"error"' in data:
            raise RuntimeError(data[-300:])
        return first or time.perf_counter() - start, time.perf_counter() - start


def load(port: int, count: int, length: int, max_tokens: int, concurrency: int) -> float:
    """Requests per second for `count` streams, `concurrency` at a time."""
    work = iter(prompts(count, length, seed=count))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                prompt = next(work, None)
            if prompt is None:
                return
            stream(port, prompt, max_tokens)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count / (time.perf_counter() - start)


def measure(name: str, model_path: Path, args, log_dir: Path) -> dict:
    proc, url = start_server(model_path, CONFIGS[name], log_dir / f"{name}.log", timeout_s=300)
    port = int(url.rsplit(":", 1)[1])
    try:
        # A server that sat idle answers its first requests 30-100x slower on this shared
        # machine (measured: 80-370 ms, then 2-4 ms): every phase follows a warm-up burst.
        load(port, 64, 32, 4, 16)
        one = [stream(port, p, 1)[1] for p in prompts(args.sequential, 32, 7)]
        long = [stream(port, p, 64) for p in prompts(args.sequential // 2, 32, 8)]
        rps = load(port, args.requests, 32, args.output_len, args.concurrency)
        burst = load(port, args.burst, 16, 1, args.burst_concurrency)
        return {
            "config": name,
            "requests_per_s": rps,
            "output_tokens_per_s": rps * args.output_len,
            "burst_requests_per_s": burst,
            "one_token_latency_ms_p50": 1000 * statistics.median(one),
            "tpot_ms_p50": 1000 * statistics.median((done - first) / 63 for first, done in long),
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
