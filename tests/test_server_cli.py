"""`nanovllm serve` flags: the defaults users rely on, and one-line errors for bad ones."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest

from nanovllm.server.cli import add_serve_parser


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nanovllm")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_defaults_of_the_original_design():
    args = parse()
    assert (args.model, args.port, args.host) == ("Qwen/Qwen3-0.6B", 8000, "0.0.0.0")
    assert (args.num_blocks, args.max_requests, args.num_speculative_tokens) == (512, 8, 3)
    assert args.api_key is None and args.served_model_name is None and args.draft_model is None


def test_defaults_of_the_traffic_limits():
    # 8 running + 1,024 waiting admits 1,000 concurrent clients; deadlines as in docs/api.md.
    args = parse()
    assert args.max_waiting == 1024
    assert (args.receive_timeout, args.send_timeout, args.keep_alive_timeout) == (10, 30, 30)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-waiting", "-1"], "--max-waiting must be >= 0"),
        (["--api-key", ""], "--api-key must not be empty"),
        (["--send-timeout", "0"], "--send-timeout must be > 0"),
        (["--receive-timeout", "-1"], "--receive-timeout must be > 0"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_flags_give_a_one_line_error(flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "nanovllm.server.cli", "--device", "cpu", *flags],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("nanovllm: error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def run_serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanovllm.server.cli", "--device", "cpu", "--host", "127.0.0.1",
         *flags],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_a_port_in_use_is_one_line_naming_it_before_the_model_loads(checkpoint_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--model", str(checkpoint_factory("llama3")), "--port", str(port))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no start-up phase: the model was never read
    assert lines[0].startswith("nanovllm: error: ") and f"port {port}" in lines[0]
    assert "in use" in lines[0]


@pytest.mark.parametrize(
    "flags, words",
    [(["--temperature", "-1"], ["temperature"]), (["--top-p", "0"], ["top_p"]),
     (["--dtype", "bfloat16"], ["bfloat16"])],
)  # fmt: skip
def test_bad_engine_and_sampling_flags_fail_before_the_model_loads(
    checkpoint_factory, flags, words
):
    result = run_serve("--model", str(checkpoint_factory("llama3")), "--port", "0", *flags)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nanovllm: error: ")
    assert all(word in lines[0] for word in words)
