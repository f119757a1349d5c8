"""`nanovllm serve --data-parallel-size 2` on a local Ray instance: two CPU replicas behind one
front end, with a replica killed and restarted along the way.

One server (and so one Ray start) for the whole module; the tests run in file order and each
waits for the server to be idle first. The oracle of every output is a single engine of the same
model in this process (greedy decoding). Every wait is bounded: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from _server_fixtures import REQUEST_TIMEOUT_S, start_server, stream_events
from prometheus_client.parser import text_string_to_metric_families
from test_server_load import open_raw_request, read_events

from nanovllm import LLM, SamplingParams
from nanovllm.tui.model import parse_state

START_TIMEOUT_S = 240.0  # Ray's start and two replicas loading, on a busy 2-core machine
DEADLINE_S = 120.0
PREFIX = (
    "A paged KV cache stores keys and values in fixed-size blocks. The scheduler admits requests "
    "while blocks remain, and preempts the newest request when they run out. Prefix caching keeps "
    "full blocks keyed by the hash of their tokens, so a shared system prompt is computed once."
)  # 100+ tokens: 6 full blocks of 16
ZEN = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than "
    "complex. Readability counts. Errors should never pass silently, unless explicitly silenced. "
    "The quick brown fox jumps over the lazy dog while the lazy dog sleeps in the sun."
)  # another 6 blocks, unrelated to PREFIX


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("llama3_long")  # 8192 positions: streams as long as a test needs


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc = start_server(
        checkpoint, tmp_path_factory.mktemp("dp"), "--data-parallel-size", "2",
        start_timeout=START_TIMEOUT_S,
    )  # fmt: skip
    yield proc
    proc.stop()


def greedy(llm, prompts, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=False)]


def token_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, size=length).tolist()


def state(server) -> dict:
    return server.get("/v1/engine/state").json()


def wait_idle(server) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        now = state(server)
        if now["router"]["outstanding"] == [0, 0] and all(
            r["status"] == "up" and not r["sequences"] and set(r["blocks"]) <= {".", "c"}
            for r in now["replicas"]
        ):
            return now
        assert time.monotonic() < deadline, f"the replicas never went idle: {now['replicas']}"
        time.sleep(0.1)


def wait_polled(server) -> None:
    """Until every replica's stats were polled after this moment: engine gauges and counters
    come from the router's polls (every 0.25 s), so a request that just ended may be missing."""
    since = time.time() + 0.1  # the replica updates its stats right after the step that ended it
    deadline = time.monotonic() + DEADLINE_S
    while any(r["polled"] < since for r in state(server)["replicas"]):
        assert time.monotonic() < deadline, "the replicas' stats are never polled"
        time.sleep(0.05)


def by_engine(server, name: str, **labels) -> dict[str, float]:
    """engine label -> value of the sample `name` with these other labels."""
    found = {}
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found[sample.labels["engine"]] = sample.value
    return found


def complete(server, prompt, max_tokens: int, stream: bool) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        response = server.post("/v1/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    with requests.post(
        server.url + "/v1/completions", json={**body, "stream": True}, stream=True,
        timeout=REQUEST_TIMEOUT_S,
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.text
        events = [data for _, data in stream_events(response)]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(data)["choices"][0]["text"] for data in events[:-1])


def open_raw_stream(port: int, prompt: str, max_tokens: int = 4000):
    """A stream on a bare socket, running until the socket closes."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    return open_raw_request(port, body)


def run_threads(target, count: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"


def test_two_hundred_requests_give_the_single_engines_outputs(server, llm):
    """Streamed and not, 16 at a time; a quarter of them share one of two long prefixes."""
    prompts = [
        f"{PREFIX[: 150 + 50 * (i % 2)]} Request {i}." if i % 4 == 0 else f"Readability counts {i}."
        for i in range(200)
    ]
    expected = greedy(llm, prompts, 12)
    got: dict[int, str] = {}

    def client(worker: int) -> None:
        for i in range(worker, 200, 16):
            got[i] = complete(server, prompts[i], 12, stream=i % 2 == 1)

    run_threads(client, 16)
    assert [got[i] for i in range(200)] == expected
    wait_polled(server)
    finished = by_engine(server, "vllm:request_success_total", finished_reason="length")
    assert sum(finished.values()) == 200 and min(finished.values()) > 0  # both replicas served


def test_requests_sharing_a_prefix_go_to_the_replica_that_cached_it(server, llm):
    wait_idle(server)
    port = int(server.url.rsplit(":", 1)[1])
    # A long stream keeps replica 0 (the least loaded, lowest index) busy, so the first request
    # of the prefix goes to replica 1; then replica 0 is free again, and only affinity can send
    # the rest of them to replica 1.
    busy = open_raw_stream(port, "Readability counts.")
    read_events(busy, 2)
    prompts = [f"{ZEN} Question {i}?" for i in range(6)]
    assert complete(server, prompts[0], 4, stream=False) == greedy(llm, prompts[:1], 4)[0]
    busy.close()
    wait_idle(server)
    hits_before = by_engine(server, "vllm:prefix_cache_hits_total")
    for prompt, expected in zip(prompts[1:], greedy(llm, prompts[1:], 4), strict=True):
        assert complete(server, prompt, 4, stream=False) == expected
    wait_polled(server)
    decisions = state(server)["router"]["recent_decisions"]
    assert [(d["engine"], d["reason"]) for d in decisions[-6:]] == [(1, "least_loaded")] + [
        (1, "prefix")
    ] * 5
    hits = by_engine(server, "vllm:prefix_cache_hits_total")
    assert hits["0"] == hits_before["0"]
    assert hits["1"] - hits_before["1"] >= 5 * 6 * 16  # six full blocks of the prefix each


def test_a_dropped_stream_frees_its_blocks_on_its_replica(server):
    wait_idle(server)
    aborts_before = by_engine(server, "vllm:request_success_total", finished_reason="abort")
    port = int(server.url.rsplit(":", 1)[1])
    sock = open_raw_stream(port, PREFIX)  # 4000 tokens: it runs until it is dropped
    read_events(sock, 3)
    wait_polled(server)
    [holder] = [r for r in state(server)["replicas"] if r["sequences"]]
    assert set(holder["blocks"]) & {"u", "s"}
    sock.close()
    wait_idle(server)
    expected = {holder["engine"]: 1, str(1 - int(holder["engine"])): 0}
    deadline = time.monotonic() + DEADLINE_S
    while True:  # the replica's answer to the abort comes on its own channel
        aborts = by_engine(server, "vllm:request_success_total", finished_reason="abort")
        if {e: aborts[e] - aborts_before[e] for e in aborts} == expected:
            break
        assert time.monotonic() < deadline, (aborts, aborts_before)
        time.sleep(0.05)


def test_a_killed_replica_ends_exactly_its_requests_and_the_others_finish(server, llm):
    wait_idle(server)
    prompts = [token_prompt(20 + i, seed=i) for i in range(6)]  # told apart by their length
    results: dict[int, list[str]] = {}
    started = [threading.Event() for _ in prompts]

    def client(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 600, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S) as r:  # fmt: skip
            results[i] = []
            for _, data in stream_events(r):
                results[i].append(data)
                started[i].set()

    threads = []
    for i in range(len(prompts)):  # one at a time: the router alternates by load
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
        assert started[i].wait(DEADLINE_S), f"stream {i} never started"
    wait_polled(server)
    victim = state(server)["replicas"][0]
    in_flight = sorted(seq["prompt_tokens"] for seq in victim["sequences"])
    os.kill(victim["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(DEADLINE_S)
    assert not any(thread.is_alive() for thread in threads), "a stream hung"

    failed, completed = [], []
    for i, events in results.items():
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        (failed if "error" in last else completed).append(i)
        if "error" in last:
            assert last["error"]["code"] == "engine_failure"
    assert in_flight and sorted(len(prompts[i]) for i in failed) == in_flight
    expected = greedy(llm, [prompts[i] for i in completed], 600)
    for i, text in zip(completed, expected, strict=True):
        assert "".join(json.loads(d)["choices"][0]["text"] for d in results[i][:-1]) == text


def test_the_restarted_replica_rejoins_and_serves(server, llm):
    deadline = time.monotonic() + DEADLINE_S
    while (replica := state(server)["replicas"][0])["status"] != "up":
        assert time.monotonic() < deadline, f"replica 0 never came back: {replica}"
        time.sleep(0.2)
    assert replica["restarts"] == 1
    wait_idle(server)
    prompt = token_prompt(30, seed=99)  # no known prefix, both idle: the lowest index
    assert complete(server, prompt, 8, stream=True) == greedy(llm, [prompt], 8)[0]
    assert state(server)["router"]["recent_decisions"][-1]["engine"] == 0
    assert server.get("/health").status_code == 200


def test_metrics_carry_every_replicas_series_with_its_engine_label(server):
    names = ["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
             "vllm:prefix_cache_queries_total", "vllm:time_to_first_token_seconds_count",
             "vllm:e2e_request_latency_seconds_count"]  # fmt: skip
    for name in names:
        assert set(by_engine(server, name)) == {"0", "1"}, name
    ttft = by_engine(server, "vllm:time_to_first_token_seconds_count")
    assert ttft["0"] > 0 and ttft["1"] > 0
    # What `nanovllm top` reads: both replicas, side by side.
    shown = parse_state(state(server))
    assert [(r.engine, r.status, len(r.blocks)) for r in shown.replicas] == [("0", "up", 512), ("1", "up", 512)]  # fmt: skip


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_shutdown_drains_the_replicas_and_leaves_no_ray_process(server, checkpoint):
    wait_idle(server)
    ray_processes = descendants(server.proc.pid)
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in ray_processes if alive(p)}
    assert {"raylet", "gcs_server"} <= names, names
    replica_pids = {r["pid"] for r in state(server)["replicas"]}
    assert replica_pids <= ray_processes
    # A request in flight when the signal comes finishes within the grace period.
    result = {}
    worker = threading.Thread(target=lambda: result.update(text=complete(server, "Hello", 200, True)))  # fmt: skip
    worker.start()
    time.sleep(0.2)
    server.signal(signal.SIGTERM)
    worker.join(DEADLINE_S)
    assert server.proc.wait(DEADLINE_S) == 0, server.log()
    assert len(result.get("text", "")) > 0
    deadline = time.monotonic() + 30
    while left := {p for p in ray_processes if alive(p)}:
        assert time.monotonic() < deadline, f"Ray processes left behind: {left}"
        time.sleep(0.1)
    assert "stopped the local Ray instance" in server.log()
