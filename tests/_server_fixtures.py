"""A real `nanovllm serve` process on 127.0.0.1 and a free port, and helpers to talk to it.

Every wait here is bounded in time: a server that does not come up, or a stream that stalls,
fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families

START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=REQUEST_TIMEOUT_S, **kwargs)

    def post(self, path: str, body: dict | None = None, **kwargs) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
        return requests.post(self.url + path, **kwargs)

    def client(self, api_key: str = "none", timeout: float = REQUEST_TIMEOUT_S) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout
        )

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """(sample name, sorted labels without model_name and engine) -> value, parsed by
        prometheus_client."""
        text = self.get("/metrics").text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(
                    sorted(
                        (k, v)
                        for k, v in sample.labels.items()
                        if k not in ("model_name", "engine")
                    )
                )
                samples[(sample.name, labels)] = sample.value
        return samples

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model: Path,
    log_dir: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> ServerProcess:
    """Start `python -m nanovllm.server.cli` and wait until /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "nanovllm.server.cli", "--model", str(model),
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), *flags]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if k != "NANOVLLM_API_KEY"}
    environment.update(env or {})
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()}")
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the server did not come up in {start_timeout} s:\n{server.log()}")


def stream_events(response: requests.Response) -> Iterator[tuple[float, str]]:
    """(arrival time, data) of each SSE event of a streamed response, `[DONE]` included."""
    for line in response.iter_lines(chunk_size=None):
        if line.startswith(b"data: "):
            yield time.monotonic(), line[len(b"data: ") :].decode("utf-8")


def parse_chunk(data: str) -> dict:
    return json.loads(data)


def assert_openai_error(response: requests.Response, status: int) -> dict:
    """The response has `status` and an OpenAI error body; return the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error
