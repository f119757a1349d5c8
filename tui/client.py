"""The polling client: one `poll()` fetches /metrics and /v1/engine/state and never raises.

It runs in a worker thread of the dashboard, so it may block (every request has a timeout);
whatever goes wrong — a refused connection, a timeout, a 401, a body that does not parse —
comes back as a `Poll` with an `error` message meant for the status line. It uses only the
standard library's urllib, so `nanovllm top` needs no HTTP package beyond what Python ships.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from nanovllm.tui.model import EngineState, MetricsSample, parse_metrics, parse_state

METRICS_PATH = "/metrics"
STATE_PATH = "/v1/engine/state"

# (url, headers, timeout) -> (HTTP status, body). Raises one of NETWORK_ERRORS without an answer.
NETWORK_ERRORS = (OSError, http.client.HTTPException)
Fetch = Callable[[str, dict[str, str], float], tuple[int, bytes]]


def http_get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:  # an answer, only not a 2xx one
        with e:
            return e.code, e.read()


@dataclass(slots=True)
class Poll:
    """One poll's outcome. `metrics` is None when the server could not be read at all."""

    t: float  # time.monotonic() when /metrics answered (or the poll failed)
    wall: float  # time.time() of the same moment
    metrics: MetricsSample | None = None
    engine: EngineState | None = None
    error: str | None = None  # for the status line; the data above may still be partial
    key_refused: bool = False  # the state endpoint answered 401


class Client:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 5.0,
        fetch: Fetch = http_get,
    ) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.headers = {"Accept": "application/json, text/plain"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.api_key = api_key
        self.fetch = fetch

    def poll(self) -> Poll:
        try:
            return self._poll()
        except Exception as e:  # a bug must not take the dashboard down: show it instead
            return Poll(time.monotonic(), time.time(), error=f"poll failed: {e!r}")

    def _poll(self) -> Poll:
        try:
            status, body = self.fetch(self.url + METRICS_PATH, self.headers, self.timeout)
        except NETWORK_ERRORS as e:
            return Poll(time.monotonic(), time.time(), error=f"cannot reach {self.url}: {reason(e, self.timeout)}")  # fmt: skip
        poll = Poll(time.monotonic(), time.time())
        if status != 200:
            poll.error = f"{self.url}{METRICS_PATH} answered HTTP {status}{_message(body)}"
            return poll
        try:
            poll.metrics = parse_metrics(body.decode("utf-8", errors="replace"))
        except ValueError as e:
            poll.error = f"cannot parse {self.url}{METRICS_PATH}: {e}"
            return poll
        self._poll_state(poll)
        return poll

    def _poll_state(self, poll: Poll) -> None:
        """Add the engine state to `poll`, or say why it is missing."""
        where = self.url + STATE_PATH
        try:
            status, body = self.fetch(where, self.headers, self.timeout)
        except NETWORK_ERRORS as e:
            poll.error = f"cannot reach {where}: {reason(e, self.timeout)}"
            return
        if status == 401:
            poll.key_refused = True
            poll.error = (
                f"{self.url} refused the API key (401): check --api-key; requests and KV map hidden"
                if self.api_key
                else f"{self.url} needs an API key (401): pass --api-key or set NANOVLLM_API_KEY"
            )
        elif status == 404:
            poll.error = f"{where} not found (404): not a nanovllm server? Showing /metrics only"
        elif status != 200:
            poll.error = f"{where} answered HTTP {status}{_message(body)}"
        else:
            try:
                poll.engine = parse_state(json.loads(body))
            except ValueError as e:
                poll.error = f"cannot parse {where}: {e}"


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def reason(error: Exception, timeout: float) -> str:
    """A short human reason for a failed request: 'connection refused', 'timed out after 5s'."""
    cause = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g}s"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, http.client.RemoteDisconnected):  # before its base class below
        return "the server closed the connection"
    if isinstance(cause, ConnectionResetError):
        return "connection reset"
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({cause.strerror or cause})"
    return str(cause) or type(cause).__name__


def _message(body: bytes) -> str:
    """': <message>' from an OpenAI error body, or '' when there is none."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {message}" if isinstance(message, str) and message else ""
