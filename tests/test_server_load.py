"""The server under load: many concurrent streams, dropped clients, and the admission bound.

Streams are read with `requests` so that the closing `data: [DONE]` is seen (the openai client
swallows it). Every client thread is joined with a timeout.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
from _server_fixtures import REQUEST_TIMEOUT_S, assert_openai_error, start_server, stream_events

from nanovllm import LLM, SamplingParams

PROMPT = "Beautiful is better than"
JOIN_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("llama3")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc = start_server(
        checkpoint, tmp_path_factory.mktemp("load"), "--max-requests", "8", "--max-waiting", "32"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="cpu")


def stream_completion(url: str, body: dict) -> tuple[float, list[tuple[float, str]]]:
    """(start time, [(arrival time, data), ...]) of one streamed completion."""
    start = time.monotonic()
    with requests.post(
        url + "/v1/completions", json={**body, "stream": True}, stream=True,
        timeout=REQUEST_TIMEOUT_S,
    ) as response:  # fmt: skip
        response.raise_for_status()
        return start, list(stream_events(response))


def run_threads(target, count: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"


def test_first_chunk_arrives_well_before_the_last(server):
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    stream_completion(server.url, {**body, "max_tokens": 2})  # warm up: first calls are slow
    start, events = stream_completion(server.url, body)
    first, last = events[0][0] - start, events[-1][0] - start
    print(
        f"\nsingle 200-token stream: first chunk {first * 1000:.1f} ms, last {last * 1000:.1f} ms"
    )
    assert len(events) > 50
    assert first < 0.5 * last


def test_32_concurrent_streams_all_complete_with_the_offline_text(server, llm):
    prompts = [f"{PROMPT} {i}" for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    expected = [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=False)]
    results: dict[int, tuple[float, list]] = {}

    def client(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 32, "ignore_eos": True, "temperature": 0,
                "stream_options": {"include_usage": True}}  # fmt: skip
        results[i] = stream_completion(server.url, body)

    wall = time.monotonic()
    run_threads(client, 32)
    wall = time.monotonic() - wall
    assert sorted(results) == list(range(32))
    for i, (_, events) in results.items():
        assert events[-1][1] == "[DONE]", f"stream {i} did not end with [DONE]"
        chunks = [json.loads(data) for _, data in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected[i]
        assert chunks[-1]["usage"]["completion_tokens"] == 32
        assert events[0][0] < events[-1][0]
    firsts = sorted(events[0][0] - start for start, events in results.values())
    lasts = sorted(events[-1][0] - start for start, events in results.values())
    print(
        f"\n32 streams, max-requests 8: wall {wall:.2f} s; first chunk median "
        f"{firsts[16] * 1000:.0f} ms, last chunk median {lasts[16] * 1000:.0f} ms"
    )


def test_dropped_streams_are_aborted_and_free_their_blocks(server):
    before = server.metrics()
    port = int(server.url.rsplit(":", 1)[1])
    sockets = [open_raw_stream(port, f"{PROMPT} {i}") for i in range(10)]
    for sock in sockets:
        read_events(sock, 3)
        sock.close()
    after = wait_idle(server)
    abort = ("vllm:request_success_total", (("finished_reason", "abort"),))
    assert after[abort] - before[abort] == 10
    assert after[("vllm:num_requests_running", ())] == 0
    assert after[("vllm:kv_cache_usage_perc", ())] == 0
    assert after[("vllm:num_requests_waiting", ())] == 0
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_a_dropped_non_streamed_request_is_aborted_and_frees_its_blocks(server):
    before = server.metrics()
    port = int(server.url.rsplit(":", 1)[1])
    # 64 choices x 240 tokens through 8 slots: seconds of work, far longer than the test waits.
    body = {"prompt": PROMPT, "max_tokens": 240, "n": 64, "ignore_eos": True}
    sock = open_raw_request(port, body)
    deadline = time.monotonic() + 10
    while server.metrics()[("vllm:num_requests_running", ())] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    sock.close()
    after = wait_idle(server)
    abort = ("vllm:request_success_total", (("finished_reason", "abort"),))
    length = ("vllm:request_success_total", (("finished_reason", "length"),))
    assert after[abort] - before[abort] == 1
    assert after[length] == before[length]  # it did not run to the end
    assert after[("vllm:kv_cache_usage_perc", ())] == 0


def open_raw_request(port: int, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def open_raw_stream(port: int, prompt: str) -> socket.socket:
    body = json.dumps(
        {"prompt": prompt, "max_tokens": 240, "ignore_eos": True, "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def read_events(sock: socket.socket, count: int) -> None:
    data = b""
    while data.count(b"data: ") < count:
        received = sock.recv(4096)
        assert received, "the server closed the stream early"
        data += received


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if metrics[("vllm:num_requests_running", ())] == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


# ---- the admission bound -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(checkpoint, tmp_path_factory):
    proc = start_server(
        checkpoint, tmp_path_factory.mktemp("bound"), "--max-requests", "1", "--max-waiting", "0"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def test_requests_beyond_the_bound_get_503_at_once(tiny_server):
    barrier = threading.Barrier(12, timeout=JOIN_TIMEOUT_S)
    results: dict[int, tuple[requests.Response, float]] = {}

    def client(i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
        barrier.wait()
        start = time.monotonic()
        response = tiny_server.post("/v1/completions", body)
        results[i] = response, time.monotonic() - start

    run_threads(client, 12)
    statuses = sorted(response.status_code for response, _ in results.values())
    assert set(statuses) == {200, 503}, statuses
    for response, elapsed in results.values():
        if response.status_code == 503:
            assert assert_openai_error(response, 503)["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
            assert elapsed < 2.0
        else:
            assert response.json()["usage"]["completion_tokens"] == 200
