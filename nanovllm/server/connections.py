"""waitress with deadlines: an open connection costs a socket and a buffer, never a thread for long.

waitress reads a request's headers and body in its event loop (the main thread) and hands a
worker thread only a complete request, so a slow sender holds no thread; the worker then runs
the request to its end, and for a stream it waits on the engine's queue and puts each chunk in
the connection's output buffer, which the event loop (or the worker) sends. What waitress leaves
unbounded, `Channel` bounds, checked once a second by the event loop (`Server.run`):

- receiving: a request must arrive whole within `receive_timeout` seconds of its first byte,
  plus one second per `MIN_RECEIVE_RATE` bytes received. waitress' own `channel_timeout` counts
  from the last byte and skips channels with a request running, so one byte a minute would
  hold a socket for ever.
- sending: output the client leaves unread, no byte of it sent for `send_timeout` seconds,
  closes the connection; the close wakes the request thread, the stream ends, the request is
  aborted. The kernel's send buffer is capped (`SEND_BUFFER_BYTES`), so a client that reads
  nothing is noticed after a few hundred KB, not after megabytes.
- idle: a connection with no request in progress closes after `keep_alive_timeout` seconds.
- errors waitress answers itself (a body over the limit, malformed headers) get OpenAI's JSON
  shape, and the connection lingers, reading and dropping what the client still sends for up
  to `receive_timeout` seconds, so a client in the middle of a large body can read the answer
  instead of a connection reset (what Apache and nginx call a lingering close).

The app learns at once that its client left: `environ["nanovllm.on_close"](callback)` runs
`callback` in the event loop when the connection closes (at once if it already has), so a
request thread waits on its queue alone instead of polling the socket.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.wasyncore import poll2

from nanovllm.server.errors import error_body

logger = logging.getLogger("nanovllm.server")

MIN_RECEIVE_RATE = 64 * 1024  # bytes/s a slow upload must keep up to extend its deadline
# The kernel's send buffer per connection (SO_SNDBUF; Linux doubles it). Left to autotuning it
# grows to tcp_wmem's maximum (4 MiB here) even for a client that reads nothing, which is that
# much kernel memory per stalled client and megabytes of a stream generated before the send
# deadline can even start. 256 KiB still moves 2.5 MB/s at 100 ms of round trip.
SEND_BUFFER_BYTES = 128 * 1024
# Connections accepted per readiness event of the listening socket. waitress accepts one, and
# each pass of its event loop costs a call per open connection, so a burst of N connections
# took N passes: 1,500 waiting connections delayed /health by 2.5 s, 3,000 by more than 10.
ACCEPTS_PER_EVENT = 128


@dataclass(frozen=True, slots=True)
class Deadlines:
    receive_timeout: float  # seconds to send a whole request, from its first byte
    send_timeout: float  # seconds pending output may stay unread
    keep_alive_timeout: float  # seconds an idle connection stays open


class _Task(WSGITask):
    def get_environment(self) -> dict:
        environ = super().get_environment()
        environ["nanovllm.on_close"] = self.channel.on_close
        return environ

    def service(self) -> None:
        try:
            super().service()
        finally:  # the callback belongs to this request; the connection may serve more
            self.channel.on_close(None)


class _ErrorTask(ErrorTask):
    """waitress' own refusals (413, 431, 400 for malformed HTTP) as OpenAI JSON errors."""

    def execute(self) -> None:
        error, request = self.request.error, self.request
        if error.code == 413:
            limit = self.channel.adj.max_request_body_size - 1
            size = request.content_length  # 0 for a chunked body
            message = (
                f"the request body has {size} bytes; the limit is {limit}"
                if size
                else f"the request body is over the limit of {limit} bytes"
            )
        else:
            message = f"{error.reason}: {error.body}"
        body = json.dumps(error_body(error.code, message)).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.channel.linger_after_error = True  # the rest of the body may still be coming
        self.write(body)


class Channel(HTTPChannel):
    """One client connection, with the deadlines of `Deadlines` and close callbacks."""

    task_class = _Task
    error_task_class = _ErrorTask

    def __init__(self, server, sock, addr, adj, map=None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.receive_started: float | None = None  # first byte of the request being received
        self.received_bytes = 0
        self.linger_after_error = False
        self.lingering_since: float | None = None
        self._on_close: Callable[[], None] | None = None
        self._closed = False
        self._close_lock = threading.Lock()

    # ---- deadlines (event loop) ------------------------------------------------------------
    def received(self, data: bytes) -> bool:
        if self.receive_started is None:
            self.receive_started, self.received_bytes = time.time(), 0
        self.received_bytes += len(data)
        result = super().received(data)
        if self.request is None:  # every request in `data` arrived whole
            self.receive_started = None
        return result

    def write_soon(self, data) -> int:
        # The send deadline counts from when output became pending, not from the last byte
        # read: a stream that waited a minute in the engine's queue would be overdue the moment
        # its first chunk is queued, before the worker flushes it. Stamped before the output is
        # added, since the event loop reads the two in the other order, without a lock.
        if data and not self.total_outbufs_len:
            self.last_activity = time.time()
        return super().write_soon(data)

    def overdue(self, now: float, deadlines: Deadlines) -> str | None:
        """Why this connection must close now, or None."""
        if self.lingering_since is not None:
            return "lingering" if now - self.lingering_since > deadlines.receive_timeout else None
        if self.receive_started is not None:  # a request is arriving: only its deadline counts
            allowed = deadlines.receive_timeout + self.received_bytes / MIN_RECEIVE_RATE
            return "receive timeout" if now - self.receive_started > allowed else None
        if self.total_outbufs_len:
            # last_activity: when bytes last left, or output became pending (write_soon).
            return "send timeout" if now - self.last_activity > deadlines.send_timeout else None
        if not self.requests and now - self.last_activity > deadlines.keep_alive_timeout:
            return "idle"
        return None

    # ---- lingering close after an error waitress answered ----------------------------------
    def handle_write(self) -> None:
        if self.linger_after_error and self.close_when_flushed and not self.will_close:
            self._flush_exception(self._flush_some)  # no task runs: no lock needed
            if not self.total_outbufs_len and not self.will_close:
                self._linger()
                return
        super().handle_write()

    def _linger(self) -> None:
        self.close_when_flushed = False
        self.lingering_since = time.time()
        try:
            self.socket.shutdown(socket.SHUT_WR)  # the client sees the whole answer and EOF
        except OSError:
            self.will_close = True

    def readable(self) -> bool:
        if self.lingering_since is not None:
            return not self.will_close
        return super().readable()

    def handle_read(self) -> None:
        if self.lingering_since is None:
            super().handle_read()
            return
        try:
            self.recv(self.adj.recv_bytes)  # dropped; at EOF, recv closes the channel
        except OSError:
            self.handle_close()

    # ---- close callbacks -------------------------------------------------------------------
    def on_close(self, callback: Callable[[], None] | None) -> None:
        """Run `callback` when this connection closes, at once if it already has; it replaces
        the previous one (a connection runs one request at a time). None clears it."""
        with self._close_lock:
            if not self._closed or callback is None:
                self._on_close = callback
                return
        callback()

    def handle_close(self) -> None:
        super().handle_close()
        with self._close_lock:
            self._closed = True
            callback, self._on_close = self._on_close, None
        if callback is not None:
            try:
                callback()
            except Exception:
                logger.exception("a close callback failed")


class Server(TcpWSGIServer):
    """One listening socket; its channels are `Channel`s; its event loop (`run`, which serves
    every listening socket of the map) enforces `Deadlines`."""

    channel_class = Channel

    def __init__(self, app, map, dispatcher, adj: Adjustments, sockinfo, deadlines: Deadlines):
        self.deadlines = deadlines
        self.stop_requested = threading.Event()
        super().__init__(app, map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)

    def handle_accept(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            open_before = len(self._map)
            if open_before >= self.adj.connection_limit:
                return
            super().handle_accept()
            if len(self._map) == open_before:  # none was waiting (or accept failed)
                return

    def set_socket_options(self, conn: socket.socket) -> None:
        super().set_socket_options(conn)  # TCP_NODELAY
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    def run(self) -> None:
        """waitress' event loop (poll(), not select(): no limit of 1,024 descriptors), with the
        deadlines checked between its passes; it returns once `request_stop` was called."""
        next_check = 0.0
        try:
            while self._map and not self.stop_requested.is_set():
                now = time.time()
                if now >= next_check:
                    next_check = now + self.adj.cleanup_interval
                    self.close_overdue(now)
                poll2(self.adj.asyncore_loop_timeout, self._map)
        except (SystemExit, KeyboardInterrupt):
            pass
        self.task_dispatcher.shutdown()

    def request_stop(self) -> None:
        """End run() after its current pass, from any thread. (A signal's SystemExit would be
        lost if it came while the loop ran a trigger thunk: waitress logs and swallows what a
        thunk raises.)"""
        self.stop_requested.set()
        self.trigger.pull_trigger()  # wake the poll

    def maintenance(self, now: float) -> None:
        # waitress calls this from readable(), in the middle of a pass that has already listed
        # the descriptors it polls: a channel closed there leaves a stale entry that poll()
        # reports as POLLNVAL, and if an accept later in the pass reuses the descriptor,
        # waitress closes the new connection for it. close_overdue runs between passes instead.
        pass

    def close_overdue(self, now: float) -> None:
        """Close every connection past a deadline, at once: waitress' will_close acts only
        once the socket is writable, which a client that reads nothing never makes it."""
        closed = Counter()
        for channel in [c for c in self._map.values() if isinstance(c, Channel)]:
            reason = channel.overdue(now, self.deadlines)
            if reason is not None:
                channel.handle_close()
                closed[reason] += 1
        if closed:
            logger.info(
                "closing %d connections: %s",
                closed.total(),
                ", ".join(f"{count} {reason}" for reason, count in closed.items()),
            )


def create_servers(app, deadlines: Deadlines, **adjustments) -> list[Server]:
    """A `Server` per address `host` resolves to, sharing one event loop and one thread pool
    (waitress.create_server, with our server class)."""
    adj = Adjustments(**adjustments)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict = {}
    return [
        Server(app, socket_map, dispatcher, adj, sockinfo, deadlines) for sockinfo in adj.listen
    ]
