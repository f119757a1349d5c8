"""The server under hostile traffic: stalled uploads, clients that never read, large requests.

Everything runs on 127.0.0.1 with bounded counts and a deadline on every wait. The servers use
short deadlines (--receive-timeout 2, --send-timeout 1) so the faults resolve in seconds; the
checks are the ones a client can see: every normal request completes, /health and /metrics
answer within a second throughout, the stalled sockets are closed by the server, the unread
streams are cut short and their requests aborted, and every KV block comes back.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import requests
from _server_fixtures import REQUEST_TIMEOUT_S, start_server

PROMPT = "Beautiful is better than"
RECEIVE_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 1.0
NUM_STALLED_UPLOADS = 200
NUM_UNREAD_STREAMS = 20
NUM_NORMAL_STREAMS = 50
HEALTH_LIMIT_S = 1.0
DEADLINE_S = 90.0  # for the whole scenario: far above what it needs, so only a hang fails it


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("llama3_long")  # long streams: 8192 positions


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc = start_server(
        checkpoint, tmp_path_factory.mktemp("faults"), "--receive-timeout", str(RECEIVE_TIMEOUT_S),
        "--send-timeout", str(SEND_TIMEOUT_S), "--num-blocks", "1024",
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def request_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


# ---- the clients -------------------------------------------------------------------------
class StalledUploads:
    """Sockets that send half a body, then one byte every half second: closed by the server?"""

    def __init__(self, port: int, count: int) -> None:
        self.sockets, self.opened = [], []
        for _ in range(count):
            self.opened.append(time.monotonic())  # no later than the server's first byte
            sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
            sock.sendall(request_head("/v1/completions", 2000) + b" " * 1000)
            sock.setblocking(False)
            self.sockets.append(sock)
        self.lifetimes: dict[int, float] = {}  # socket -> seconds from its first byte to close

    def trickle(self, stop: threading.Event) -> None:
        while not stop.is_set() and len(self.lifetimes) < len(self.sockets):
            for i, sock in enumerate(self.sockets):
                if i not in self.lifetimes and self._closed_by_server(sock):
                    self.lifetimes[i] = time.monotonic() - self.opened[i]
            stop.wait(0.5)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    @staticmethod
    def _closed_by_server(sock: socket.socket) -> bool:
        try:
            if sock.recv(4096) == b"":
                return True
            sock.send(b" ")
        except BlockingIOError:
            try:
                sock.send(b" ")
            except OSError:
                return True
        except OSError:  # reset
            return True
        return False


def open_unread_stream(port: int) -> socket.socket:
    """A chat stream with 20 logprobs a token (~1.4 KB each) from a client that reads nothing
    and keeps a small receive buffer: the server's buffers fill after a few hundred tokens."""
    body = json.dumps({
        "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000, "ignore_eos": True,
        "logprobs": True, "top_logprobs": 20, "stream": True,
    }).encode()  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(REQUEST_TIMEOUT_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request_head("/v1/chat/completions", len(body)) + body)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def normal_stream(url: str, i: int) -> dict:
    body = {"prompt": f"{PROMPT} {i}", "max_tokens": 32, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=DEADLINE_S) as r:
        r.raise_for_status()
        events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", events[-3:]
    return json.loads(events[-2])["usage"]


class Poller:
    """/health and /metrics, each on a fresh connection, every 0.1 s: the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def run(self, stop: threading.Event) -> None:
        paths = ("/health", "/metrics")
        while not stop.is_set():
            path = paths[len(self.latencies) % 2]
            start = time.monotonic()
            try:
                status = requests.get(self.url + path, timeout=REQUEST_TIMEOUT_S).status_code
                if status != 200:
                    self.failures.append(f"{path}: {status}")
            except requests.RequestException as e:
                self.failures.append(f"{path}: {e}")
            self.latencies.append(time.monotonic() - start)
            stop.wait(0.1)


def metric(server, name: str, labels: tuple = ()) -> float:
    return server.metrics().get((name, labels), 0.0)


ABORTS = ("vllm:request_success_total", (("finished_reason", "abort"),))


# ---- the fault suite ---------------------------------------------------------------------
def test_stalled_uploads_and_unread_streams_cost_no_service(server):
    before, log_start = server.metrics(), len(server.log())
    port = port_of(server)
    stalled = StalledUploads(port, NUM_STALLED_UPLOADS)
    unread = [open_unread_stream(port) for _ in range(NUM_UNREAD_STREAMS)]
    stop = threading.Event()
    poller = Poller(server.url)
    background = [threading.Thread(target=poller.run, args=(stop,)),
                  threading.Thread(target=stalled.trickle, args=(stop,))]  # fmt: skip
    for thread in background:
        thread.start()
    usages: dict[int, dict] = {}
    try:
        clients = [
            threading.Thread(target=lambda i=i: usages.__setitem__(i, normal_stream(server.url, i)))
            for i in range(NUM_NORMAL_STREAMS)
        ]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + DEADLINE_S
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in clients), "a normal stream hung"
        while metric(server, *ABORTS) - before[ABORTS] < NUM_UNREAD_STREAMS:
            assert time.monotonic() < deadline, "the unread streams were not all aborted"
            time.sleep(0.2)
        while len(stalled.lifetimes) < NUM_STALLED_UPLOADS and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in background:
            thread.join(REQUEST_TIMEOUT_S)
        stalled.close()

    print(
        f"\n/health and /metrics: {len(poller.latencies)} answers, slowest "
        f"{max(poller.latencies) * 1000:.0f} ms; stalled uploads closed after "
        f"{min(stalled.lifetimes.values()):.1f}-{max(stalled.lifetimes.values()):.1f} s"
    )
    # Every normal request completed, whole.
    assert sorted(usages) == list(range(NUM_NORMAL_STREAMS))
    assert all(usage["completion_tokens"] == 32 for usage in usages.values())
    # /health and /metrics answered throughout, each within a second.
    assert not poller.failures, poller.failures[:5]
    assert len(poller.latencies) >= 10
    assert max(poller.latencies) < HEALTH_LIMIT_S, sorted(poller.latencies)[-5:]
    # The server closed every stalled upload, none before its receive deadline.
    assert len(stalled.lifetimes) == NUM_STALLED_UPLOADS
    assert min(stalled.lifetimes.values()) >= RECEIVE_TIMEOUT_S
    # The unread streams were cut short (no [DONE]) and exactly they were aborted.
    for sock in unread:
        data = read_all(sock)
        sock.close()
        assert b"data: {" in data and b"data: [DONE]" not in data
    after = server.metrics()
    assert after[ABORTS] - before[ABORTS] == NUM_UNREAD_STREAMS
    assert after[("vllm:num_requests_running", ())] == 0
    assert after[("vllm:num_requests_waiting", ())] == 0
    assert after[("vllm:kv_cache_usage_perc", ())] == 0
    log = server.log()[log_start:]
    assert _closed(log, "receive timeout") == NUM_STALLED_UPLOADS
    assert _closed(log, "send timeout") == NUM_UNREAD_STREAMS


def _closed(log: str, reason: str) -> int:
    return sum(int(n) for n in re.findall(rf"(\d+) {reason}", log))


def test_a_client_leaving_while_queued_is_aborted_before_it_runs(server):
    # 8 long streams fill the running batch; a ninth waits, and its client leaves.
    port = port_of(server)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True})
    running = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
        sock.sendall(request_head("/v1/completions", len(body)) + body.encode())
        running.append(sock)
    before = server.metrics()
    waiting = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
    waiting.sendall(request_head("/v1/completions", len(body)) + body.encode())
    deadline = time.monotonic() + DEADLINE_S
    while metric(server, "vllm:num_requests_waiting") < 1:
        assert time.monotonic() < deadline, "the ninth request never queued"
        time.sleep(0.05)
    waiting.close()
    while metric(server, *ABORTS) - before[ABORTS] < 1:
        assert time.monotonic() < deadline, "the queued request was not aborted"
        time.sleep(0.05)
    after = server.metrics()
    assert after[("vllm:num_requests_waiting", ())] == 0
    assert after[("vllm:num_requests_running", ())] == 8  # the others run on, untouched
    for sock in running:
        sock.close()
    while metric(server, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the dropped streams were not aborted"
        time.sleep(0.05)


def test_no_error_message_names_the_model_path(server, checkpoint):
    # Without --served-model-name the model's name is its path on the server; refusals of
    # every kind must still not show it.
    path, long_ids = str(checkpoint), list(range(3, 9000))
    refusals = [
        ("/v1/completions", {"prompt": "x", "model": "gpt-9"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "m"}),
        ("/tokenize", {"prompt": "x", "model": "gpt-9"}),
        ("/v1/completions", {"prompt": long_ids}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}),
        ("/v1/completions", {"prompt": "x" * 200_000}),
        ("/v1/completions", {"prompt": "x", "frobnicate": 1}),
        ("/v1/nope", {"prompt": "x"}),
    ]
    for route, body in refusals:
        response = server.post(route, body)
        assert 400 <= response.status_code < 500, (route, response.text[:200])
        assert path not in response.text, (route, response.text[:300])
    assert server.get("/v1/models").json()["data"][0]["id"] == path  # the name is the path


# ---- memory ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_server(checkpoint, tmp_path_factory):
    """A server no earlier test has warmed up: its allocator starts from nothing."""
    proc = start_server(checkpoint, tmp_path_factory.mktemp("rss"))
    yield proc
    assert proc.stop() == 0, proc.log()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_rss_stays_flat_across_large_tokenize_calls(fresh_server):
    # 60,000 characters: about 43,000 tokens of the test tokenizer, within the prompt bound.
    text = ("The quick brown fox jumps over the lazy dog 42. " * 1300)[:60_000]
    rss = {}
    for i in range(1, 51):
        response = fresh_server.post("/tokenize", {"prompt": text})
        assert response.status_code == 200, response.text[:200]
        if i in (5, 50):
            rss[i] = rss_mib(fresh_server.proc.pid)
    print(f"\nserver RSS after 5 /tokenize calls: {rss[5]:.0f} MiB, after 50: {rss[50]:.0f} MiB")
    assert rss[50] < 1.5 * rss[5]
