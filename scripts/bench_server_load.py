"""The server under heavy traffic: 1,000 concurrent streaming clients, then a soak (docs/benchmarks.md).

Starts `nanovllm serve` on a tiny model (tests/checkpoints.py's llama3 unless --model), samples
the server process's RSS, threads and open descriptors from /proc every 0.1 s, and runs `nanovllm
bench serve`'s client with every request in flight at once. Then the soak: rounds of streams at
a concurrency equal to their number, with the server's RSS after each round. Prints a JSON line
per phase and a summary.

    python scripts/bench_server_load.py --clients 1000 --max-requests 64

With --url (and --pid) it loads a server started elsewhere instead, e.g. another version.
With --tokenize-calls N it first sends N /tokenize calls of --tokenize-chars characters, one
after another, and reports the server's RSS after 1, 5 and N of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _local_server import start_server, tiny_model

from nanovllm.bench.serve import ServeResult, run_serve_bench
from nanovllm.bench.workload import parse_range


@dataclass
class ProcessSampler:
    """Peak RSS, threads and open descriptors of a process, sampled every `interval` s."""

    pid: int
    interval: float = 0.1
    peak_rss_mib: float = 0.0
    peak_threads: int = 0
    peak_fds: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> tuple[float, int, int]:
        rss, threads = 0.0, 0
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        return rss, threads, fds

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self._stop.is_set():
            rss, threads, fds = self.sample()
            self.peak_rss_mib = max(self.peak_rss_mib, rss)
            self.peak_threads = max(self.peak_threads, threads)
            self.peak_fds = max(self.peak_fds, fds)
            self._stop.wait(self.interval)

    def reset(self) -> None:
        self.peak_rss_mib, self.peak_threads, self.peak_fds = 0.0, 0, 0

    def stop(self) -> None:
        self._stop.set()


def workload(args, vocabulary: list[int], count: int, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(args.input_len[0], args.input_len[1] + 1, size=count)
    outputs = rng.integers(args.output_len[0], args.output_len[1] + 1, size=count).tolist()
    return [rng.choice(vocabulary, size=n).tolist() for n in inputs], outputs


def server_vocabulary(url: str) -> tuple[str, list[int]]:
    def call(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    model = call("/v1/models")["data"][0]["id"]
    text = "The quick brown fox jumps over the lazy dog; 42 engineers measure latency."
    return model, sorted(set(call("/tokenize", {"prompt": text})["tokens"]))


def tokenize_rss(url: str, sampler: ProcessSampler, calls: int, chars: int) -> None:
    text = ("The quick brown fox jumps over the lazy dog 42. " * (chars // 48 + 1))[:chars]
    body = json.dumps({"prompt": text}).encode()
    for i in range(1, calls + 1):
        request = urllib.request.Request(url + "/tokenize", body, {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as response:
            count = json.loads(response.read())["count"]
        if i in (1, 5, calls):
            rss, threads, _ = sampler.sample()
            print(json.dumps({"phase": f"after {i} /tokenize calls of {chars} characters",
                              "tokens": count, "rss_mib": round(rss)}), flush=True)  # fmt: skip


def report(name: str, result: ServeResult, sampler: ProcessSampler, cpu_s: float) -> dict:
    row = {
        "phase": name, "completed": result.completed, "errored": result.errored,
        "lost": result.lost, "duration_s": round(result.duration_s, 2),
        "output_tokens_per_s": round(result.output_tokens_per_s, 1),
        "ttft_ms_p50": round(result.ttft_ms["p50"], 1), "ttft_ms_p99": round(result.ttft_ms["p99"], 1),
        "tpot_ms_p50": round(result.tpot_ms["p50"], 1), "peak_rss_mib": round(sampler.peak_rss_mib),
        "peak_threads": sampler.peak_threads, "peak_fds": sampler.peak_fds,
        "server_cpu_s": round(cpu_s, 1), "errors": result.errors,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the tiny test checkpoint")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--max-requests", type=int, default=64)
    parser.add_argument("--input-len", type=parse_range, default=(16, 64))
    parser.add_argument("--output-len", type=parse_range, default=(16, 64))
    parser.add_argument("--soak-rounds", type=int, default=5)
    parser.add_argument("--soak-streams", type=int, default=64)
    parser.add_argument("--server-flag", action="append", default=[], help="extra serve flags")
    parser.add_argument("--url", default=None, help="a running server to load instead")
    parser.add_argument("--pid", type=int, default=None, help="its process id (with --url)")
    parser.add_argument("--tokenize-calls", type=int, default=0)
    parser.add_argument("--tokenize-chars", type=int, default=600_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            proc, url = None, args.url
        else:
            model = Path(args.model) if args.model else tiny_model(Path(tmp) / "llama3")
            flags = ["--max-requests", str(args.max_requests), *args.server_flag]
            proc, url = start_server(model, flags, Path(tmp) / "server.log")
        sampler = ProcessSampler(proc.pid if proc else args.pid)
        idle_rss, idle_threads, _ = sampler.sample()
        print(json.dumps({"phase": "idle", "rss_mib": round(idle_rss), "threads": idle_threads}))
        threading.Thread(target=sampler.run, daemon=True).start()
        try:
            if args.tokenize_calls:
                tokenize_rss(url, sampler, args.tokenize_calls, args.tokenize_chars)
            name, vocabulary = server_vocabulary(url)
            prompts, outputs = workload(args, vocabulary, args.clients, seed=0)
            if args.clients:
                cpu = sampler.cpu_seconds()
                result = run_serve_bench(url, name, prompts, outputs, concurrency=args.clients)
                report(f"{args.clients} clients", result, sampler, sampler.cpu_seconds() - cpu)
            for round_ in range(1, args.soak_rounds + 1):
                sampler.reset()
                prompts, outputs = workload(args, vocabulary, args.soak_streams, seed=round_)
                cpu = sampler.cpu_seconds()
                result = run_serve_bench(url, name, prompts, outputs, concurrency=len(prompts))
                row = report(f"soak round {round_}", result, sampler, sampler.cpu_seconds() - cpu)
                rss, threads, _ = sampler.sample()
                print(json.dumps({"phase": f"after round {round_}", "rss_mib": round(rss),
                                  "threads": threads, "completed": row["completed"]}))  # fmt: skip
        finally:
            sampler.stop()
            if proc is not None:
                proc.terminate()
                proc.wait(30)
                print(f"server exit code {proc.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
