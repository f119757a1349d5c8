"""`nanovllm bench serve`: load a running server and measure latency the way vLLM's benchmark does.

Streaming completions with random token-id prompts, at a fixed concurrency or a Poisson request
rate. Per request: TTFT (send to first token), TPOT ((last - first) / (tokens - 1)) and the
inter-token latencies (gaps between streamed chunks). Each request ends completed (`[DONE]`
after its tokens), errored (an HTTP error or an error chunk: the server answered) or lost (the
connection failed or the stream ended without `[DONE]`: nobody answered). Uses only the
standard library's http.client, so the server's users need nothing extra to benchmark it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np

from nanovllm.bench.workload import parse_range


@dataclass(slots=True)
class RequestResult:
    ok: bool
    lost: bool = False  # no answer at all, as opposed to an error answer
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    gaps: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def stream_completion(url: str, body: dict, api_key: str | None, timeout: float) -> RequestResult:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            return RequestResult(False, error=f"HTTP {response.status}: {response.read()[:200]!r}")
        return _read_stream(response, start)
    except (OSError, http.client.HTTPException) as exc:
        return RequestResult(False, lost=True, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _read_stream(response, start: float) -> RequestResult:
    result, last, done = RequestResult(True), None, False
    for raw in response:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            done = True
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        if "error" in chunk:  # the server ended the stream with an error
            return RequestResult(False, error=str(chunk["error"].get("message")))
        if chunk.get("usage"):
            result.prompt_tokens = chunk["usage"]["prompt_tokens"]
            result.output_tokens = chunk["usage"]["completion_tokens"]
        if not chunk.get("choices") or not chunk["choices"][0].get("text"):
            continue
        if last is None:
            result.ttft = now - start
        else:
            result.gaps.append(now - last)
        last = now
    result.latency = (last or time.perf_counter()) - start
    if not done:
        return RequestResult(False, lost=True, error="the stream ended without [DONE]")
    return result


@dataclass(slots=True)
class ServeResult:
    num_requests: int
    failed: int  # errored + lost
    lost: int
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)  # message -> count, errored and lost

    @property
    def completed(self) -> int:
        return self.num_requests - self.failed

    @property
    def errored(self) -> int:
        return self.failed - self.lost

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return (self.num_requests - self.failed) / self.duration_s

    def as_dict(self) -> dict:
        return {
            "num_requests": self.num_requests,
            "completed": self.completed,
            "errored": self.errored,
            "lost": self.lost,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "itl_ms": self.itl_ms,
            "errors": self.errors,
        }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ms = 1000 * np.asarray(values)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def run_serve_bench(
    url: str,
    model: str,
    prompts: list[list[int]],
    output_lens: list[int],
    concurrency: int | None = None,
    request_rate: float | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    seed: int = 0,
) -> ServeResult:
    bodies = [
        {"model": model, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
         "stream": True, "stream_options": {"include_usage": True}}
        for p, n in zip(prompts, output_lens, strict=True)
    ]  # fmt: skip
    results: list[RequestResult | None] = [None] * len(bodies)

    def send(i: int) -> None:
        results[i] = stream_completion(url, bodies[i], api_key, timeout)

    start = time.perf_counter()
    if request_rate is None:
        _at_concurrency(send, len(bodies), concurrency or 8)
    else:
        _at_rate(send, len(bodies), request_rate, seed)
    duration = time.perf_counter() - start
    done = [r for r in results if r is not None and r.ok]
    failed = [r for r in results if r is not None and not r.ok]
    return ServeResult(
        num_requests=len(bodies),
        failed=len(bodies) - len(done),
        lost=sum(r.lost for r in failed) + results.count(None),
        duration_s=duration,
        output_tokens=sum(r.output_tokens for r in done),
        prompt_tokens=sum(r.prompt_tokens for r in done),
        ttft_ms=percentiles([r.ttft for r in done]),
        tpot_ms=percentiles([r.tpot for r in done if r.tpot is not None]),
        itl_ms=percentiles([gap for r in done for gap in r.gaps]),
        errors=dict(Counter(r.error for r in failed)),
    )


def _at_concurrency(send, count: int, concurrency: int) -> None:
    indices = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(indices, None)
            if i is None:
                return
            send(i)

    threads = [threading.Thread(target=worker) for _ in range(min(concurrency, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _at_rate(send, count: int, rate: float, seed: int) -> None:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    threads = []
    for i, gap in enumerate(gaps):
        time.sleep(gap)
        thread = threading.Thread(target=send, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


_SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog while seven wizards quietly hex jumbled "
    "boxes; meanwhile 42 engineers measure latency, throughput and memory of a small engine."
)


def _server_vocabulary(url: str, api_key: str | None) -> tuple[str, list[int]]:
    """The served model's name, and token ids known to exist in its vocabulary (random prompts
    are drawn from them, so they are valid for any model)."""
    model = _call(url, "GET", "/v1/models", None, api_key)["data"][0]["id"]
    tokens = _call(url, "POST", "/tokenize", {"model": model, "prompt": _SAMPLE_TEXT}, api_key)
    return model, sorted(set(tokens["tokens"]))


def _call(url: str, method: str, path: str, body: dict | None, api_key: str | None) -> dict:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=30)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        payload = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"nanovllm: error: cannot reach {url}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise SystemExit(f"nanovllm: error: {path} answered {response.status}: {payload}")
    return payload


def cmd_serve(args: argparse.Namespace) -> int:
    model, vocabulary = _server_vocabulary(args.url, args.api_key)
    rng = np.random.default_rng(args.bench_seed)
    inputs = rng.integers(args.input_len[0], args.input_len[1] + 1, size=args.num_prompts)
    outputs = rng.integers(
        args.output_len[0], args.output_len[1] + 1, size=args.num_prompts
    ).tolist()
    prompts = [rng.choice(vocabulary, size=n).tolist() for n in inputs]
    result = run_serve_bench(
        args.url, model, prompts, outputs, args.concurrency, args.request_rate, args.api_key,
        seed=args.bench_seed,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0 if not result.failed else 1
    print(f"requests: {result.num_requests} in {result.duration_s:.2f} s: {result.completed} "
          f"completed, {result.errored} errored, {result.lost} lost; {result.requests_per_s:.2f} "
          f"req/s, {result.output_tokens_per_s:.1f} output tokens/s")  # fmt: skip
    for error, count in sorted(result.errors.items(), key=lambda item: -item[1])[:5]:
        print(f"  {count} x {error}")
    for name, stats in (("TTFT", result.ttft_ms), ("TPOT", result.tpot_ms), ("ITL", result.itl_ms)):
        print(f"{name:>5} ms: mean {stats['mean']:.1f}  p50 {stats['p50']:.1f}  "
              f"p90 {stats['p90']:.1f}  p99 {stats['p99']:.1f}")  # fmt: skip
    return 0 if not result.failed else 1


def add_serve_bench_parser(kinds) -> None:
    sv = kinds.add_parser("serve", help="latency and throughput of a running server")
    sv.add_argument("--url", default="http://127.0.0.1:8000", help="the running server's base URL")
    sv.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    sv.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    sv.add_argument("--input-len", type=parse_range, default=(32, 128), help="N or MIN:MAX tokens")
    sv.add_argument("--output-len", type=parse_range, default=(32, 128), help="N or MIN:MAX tokens")
    load = sv.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight (default 8)"
    )
    load.add_argument(
        "--request-rate", type=float, default=None, help="Poisson arrivals per second"
    )
    sv.add_argument(
        "--bench-seed", type=int, default=0, help="seed of the random prompts and lengths"
    )
    sv.add_argument("--json", action="store_true", help="print one JSON object")
    sv.set_defaults(func=cmd_serve)
