"""SIGTERM/SIGINT: stop accepting, let requests in flight finish within the grace period, exit 0.

Each test starts its own server, since each one ends it.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import time

import pytest
import requests
from _server_fixtures import REQUEST_TIMEOUT_S, start_server, stream_events

PROMPT = "Beautiful is better than"


@pytest.fixture
def checkpoint(checkpoint_factory):
    return checkpoint_factory("llama3")


def open_stream(server, **body) -> requests.Response:
    body = {"prompt": PROMPT, "ignore_eos": True, "stream": True, **body}
    return requests.post(
        server.url + "/v1/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S
    )


def wait_exit(server, timeout: float) -> tuple[int, float]:
    start = time.monotonic()
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        pytest.fail(f"the server did not exit within {timeout} s:\n{server.log()}")
    return code, time.monotonic() - start


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_idle_server_exits_zero_at_once(checkpoint, tmp_path, signum):
    server = start_server(checkpoint, tmp_path)
    server.signal(signum)
    code, elapsed = wait_exit(server, 5.0)
    assert code == 0, server.log()
    assert elapsed < 3.0


def test_stream_in_flight_finishes_within_the_grace_period(checkpoint, tmp_path):
    server = start_server(checkpoint, tmp_path, "--grace-period", "10")
    with open_stream(server, max_tokens=240, stream_options={"include_usage": True}) as response:
        events = stream_events(response)
        next(events)
        server.signal(signal.SIGTERM)
        rest = [data for _, data in events]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 240
    code, elapsed = wait_exit(server, 10.0)
    assert code == 0, server.log()
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=2)


def test_streams_past_the_grace_period_end_with_an_error_chunk(checkpoint, tmp_path):
    server = start_server(checkpoint, tmp_path, "--grace-period", "0")
    # 16 choices of 240 tokens, 8 at a time: long enough to still run when the signal lands.
    with open_stream(server, max_tokens=240, n=16) as response:
        events = stream_events(response)
        next(events)
        server.signal(signal.SIGTERM)
        rest = [data for _, data in events]
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["message"] == "the server is shutting down"
    assert error["code"] == "shutting_down"  # what /health says at that point
    code, _ = wait_exit(server, 5.0)
    assert code == 0, server.log()
    assert "grace period over: ending 1 requests" in server.log()


def test_500_open_streams_each_end_with_an_error_chunk_and_done(checkpoint_factory, tmp_path):
    # 500 streams of 4,000 tokens, 8 running and 492 waiting in the engine's queue: none can
    # finish before the signal, so every one must be ended by the shutdown.
    server = start_server(
        checkpoint_factory("llama3_long"), tmp_path, "--grace-period", "0", "--num-blocks", "1024"
    )
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True})
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    streams = []
    for _ in range(500):
        sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
        sock.sendall(head.encode() + body.encode())
        streams.append(sock)
    deadline = time.monotonic() + 60
    while _in_engine(server) < 500:
        assert time.monotonic() < deadline, f"only {_in_engine(server)} of 500 reached the engine"
        time.sleep(0.1)
    server.signal(signal.SIGTERM)
    responses = _read_until_closed(streams, deadline=time.monotonic() + 60)
    code, _ = wait_exit(server, 30.0)
    assert code == 0, server.log()
    ended = [r for r in responses if b'"code": "shutting_down"' in r and r.endswith(b"0\r\n\r\n")]
    assert len(ended) == 500, f"{len(ended)} of 500 streams ended with an error chunk"
    assert all(b"data: [DONE]" in r.rsplit(b'"shutting_down"', 1)[1] for r in responses)


def _in_engine(server) -> float:
    metrics = server.metrics()
    return metrics[("vllm:num_requests_running", ())] + metrics[("vllm:num_requests_waiting", ())]


def _read_until_closed(socks: list[socket.socket], deadline: float) -> list[bytes]:
    """Everything each socket receives until the server closes it, read with one selector."""
    data = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while selector.get_map():
            assert time.monotonic() < deadline, "streams still open after the shutdown"
            for key, _ in selector.select(timeout=1.0):
                try:
                    chunk = key.fileobj.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    data[key.fileobj] += chunk
                else:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
    return [data[sock] for sock in socks]
