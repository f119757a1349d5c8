"""Connection deadlines (nanovllm/server/connections.py) on a real socket pair, without a server.

The clock is the argument of `Channel.overdue`, so the deadlines are checked at chosen instants
instead of waited for.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
from waitress.adjustments import Adjustments

from nanovllm.server.connections import MIN_RECEIVE_RATE, Channel, Deadlines

DEADLINES = Deadlines(receive_timeout=10.0, send_timeout=30.0, keep_alive_timeout=5.0)
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n"


@pytest.fixture
def pair():
    """(channel, the client's end of its socket)."""
    server_end, client_end = socket.socketpair()
    server_end.setblocking(False)
    tasks: list = []
    fake_server = SimpleNamespace(
        active_channels={}, pull_trigger=lambda: None, add_task=tasks.append
    )
    channel = Channel(fake_server, server_end, ("127.0.0.1", 0), Adjustments(), map={})
    yield channel, client_end
    channel.handle_close()
    client_end.close()


def test_a_fresh_connection_is_idle_until_its_keep_alive_deadline(pair):
    channel, _ = pair
    start = channel.last_activity
    assert channel.overdue(start + 4.9, DEADLINES) is None
    assert channel.overdue(start + 5.1, DEADLINES) == "idle"


def test_the_receive_deadline_counts_from_the_first_byte_not_the_last(pair):
    channel, _ = pair
    channel.received(HEAD + b" " * 1000)
    started = channel.receive_started
    channel.received(b" ")  # a byte now and then does not move the deadline
    allowance = (len(HEAD) + 1001) / MIN_RECEIVE_RATE
    assert channel.overdue(started + 9.9, DEADLINES) is None
    assert channel.overdue(started + 10.1 + allowance, DEADLINES) == "receive timeout"


def test_a_request_received_whole_has_no_receive_deadline(pair):
    channel, _ = pair
    channel.received(HEAD + b" " * 2000)
    assert channel.receive_started is None and len(channel.requests) == 1
    # Its request runs (no output yet): neither idle nor overdue, however long it takes.
    assert channel.overdue(time.time() + 3600, DEADLINES) is None


def test_the_send_deadline_counts_from_when_output_became_pending(pair):
    channel, client = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    while True:  # fill the socket: the client reads nothing
        try:
            channel.socket.send(b"x" * 65536)
        except BlockingIOError:
            break
    channel.last_activity = time.time() - 100  # e.g. a minute in the engine's queue
    channel.write_soon(b"data: {}\n\n")  # the first chunk, which cannot leave
    now = time.time()
    assert channel.total_outbufs_len > 0
    assert channel.overdue(now, DEADLINES) is None
    assert channel.overdue(now + 31, DEADLINES) == "send timeout"


def test_a_close_runs_the_request_s_callback_once_and_a_late_one_at_once(pair):
    channel, _ = pair
    calls = []
    channel.on_close(lambda: calls.append("first"))
    channel.handle_close()
    channel.handle_close()
    channel.on_close(lambda: calls.append("late"))
    assert calls == ["first", "late"]
