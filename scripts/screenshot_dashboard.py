"""Save an SVG screenshot of `nanovllm top` watching a server under load (docs/dashboard.svg).

    python scripts/screenshot_dashboard.py --model PATH [--draft-model PATH] [--output FILE]
    python scripts/screenshot_dashboard.py --url http://127.0.0.1:8000 [--api-key KEY] [--output FILE]

With --model it starts `nanovllm serve` on a free 127.0.0.1 port (CPU) and stops it afterwards;
with --url it watches a server that is already running. Either way it keeps a few streaming
completions running from background threads (shared prompt prefix, so the prefix cache shows),
runs the dashboard headless for a few polls and writes the screenshot. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _local_server

from nanovllm.tui.app import TopApp
from nanovllm.tui.client import Client

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "A paged KV cache stores keys and values in fixed-size blocks. "
TOPICS = ("The scheduler", "Prefix caching", "The quick brown fox", "Readability", "Errors")
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start a server for this model")
    where.add_argument("--url", help="watch this running server")
    parser.add_argument("--draft-model", help="with --model: speculate with this draft model")
    parser.add_argument("--ngram", action="store_true", help="with --model: speculate by prompt lookup")  # fmt: skip
    parser.add_argument("--num-blocks", type=int, default=96, help="with --model: KV blocks")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--output", default=str(ROOT / "docs" / "dashboard.svg"))
    parser.add_argument("--clients", type=int, default=6, help="concurrent streaming requests")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--polls", type=int, default=8, help="polls before the screenshot")
    parser.add_argument(
        "--min-finished", type=int, default=0, help="also wait for this many finished requests"
    )
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--size", default="110x34", help="terminal columns x rows")
    args = parser.parse_args(argv)
    columns, rows = (int(n) for n in args.size.split("x"))

    server = start_server(args) if args.model else None
    url = server[1] if server else args.url
    if server:
        warm_up(url, args.api_key)  # the first steps of a fresh server are slow
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=load, args=(url, args.api_key, i, args.max_tokens, stop), daemon=True
        )  # fmt: skip
        for i in range(args.clients)
    ]
    try:
        for thread in threads:
            thread.start()
        app = TopApp(Client(url, args.api_key), args.interval)
        shot = screenshot(app, Path(args.output), (columns, rows), args.polls, args.min_finished)
        ok = asyncio.run(shot)
    finally:
        stop.set()
        if server:
            server[0].terminate()
            try:
                server[0].wait(20)
            except subprocess.TimeoutExpired:
                server[0].kill()
    print(f"wrote {args.output}" if ok else "no running requests were seen; wrote it anyway")
    return 0


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    flags = ["--num-blocks", str(args.num_blocks), "--max-requests", "4", "--log-interval", "3600"]
    if args.draft_model:
        flags += ["--draft-model", args.draft_model]
    if args.ngram:
        flags += ["--speculative-method", "ngram"]
    if args.api_key:
        flags += ["--api-key", args.api_key]
    log = Path(tempfile.mkdtemp()) / "server.log"
    return _local_server.start_server(Path(args.model), flags, log, START_TIMEOUT_S)


def warm_up(url: str, api_key: str | None) -> None:
    body = {"prompt": PREFIX, "max_tokens": 4, "temperature": 0}
    with urllib.request.urlopen(completion_request(url, api_key, body), timeout=RUN_TIMEOUT_S):
        pass


def completion_request(url: str, api_key: str | None, body: dict) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), headers, method="POST"
    )


def load(url: str, api_key: str | None, i: int, max_tokens: int, stop: threading.Event) -> None:
    """Stream completions one after another until `stop` (or RUN_TIMEOUT_S) ends it."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        body = {"prompt": PREFIX + TOPICS[(i + n) % len(TOPICS)], "stream": True,
                "max_tokens": max(8, max_tokens - 20 * (i % 3)), "ignore_eos": True, "temperature": 0}  # fmt: skip
        n += 1
        try:
            with urllib.request.urlopen(completion_request(url, api_key, body), timeout=30) as response:  # fmt: skip
                for _line in response:
                    if stop.is_set():
                        break  # closing the stream aborts the request on the server
        except OSError:
            time.sleep(0.5)  # the server is busy or gone: try again, until the deadline


async def screenshot(
    app: TopApp, output: Path, size: tuple[int, int], polls: int, min_finished: int
) -> bool:
    """Run `app` headless until `polls` polls showed data (running requests in the last one)."""
    async with app.run_test(size=size) as pilot:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            figures = app.figures
            busy = figures is not None and figures.engine is not None and figures.engine.running
            if app.poll_count >= polls and busy and figures.num_finished >= min_finished:
                break
            await pilot.pause(0.1)
        output.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(filename=output.name, path=str(output.parent))
        return bool(busy)


if __name__ == "__main__":
    os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")
    sys.exit(main())
