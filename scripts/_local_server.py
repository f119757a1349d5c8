"""What the server benchmarks share: a tiny random model and a `nanovllm serve` process on
127.0.0.1, waited for with a deadline."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(folder: Path) -> Path:
    """The tests' tiny Llama 3 checkpoint (tests/checkpoints.py), written into folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import build_checkpoint

    return build_checkpoint("llama3", folder)


def start_server(
    model: Path, flags: list[str], log: Path, timeout_s: float = 120.0
) -> tuple[subprocess.Popen, str]:
    """A server on a free port, once /health answers; its output goes to log."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nanovllm.server.cli", "--model", str(model), "--device",
               "cpu", "--host", "127.0.0.1", "--port", str(port), *flags]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")
