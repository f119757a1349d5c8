"""SIGTERM/SIGINT: stop accepting, let requests in flight finish within the grace period, exit 0.

Each test starts its own server, since each one ends it.
"""

from __future__ import annotations

import json
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
    code, _ = wait_exit(server, 5.0)
    assert code == 0, server.log()
    assert "grace period over: ending 1 requests" in server.log()
