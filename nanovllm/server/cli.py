"""`nanovllm serve`: the command line of the OpenAI-compatible server.

`add_serve_parser` registers the subcommand on nanovllm/cli.py's parser; `python -m
nanovllm.server.cli [flags]` runs the same command without the word `serve`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import TYPE_CHECKING

from nanovllm.args import (
    add_engine_args,
    add_sampling_args,
    engine_config,
    sampling_overrides,
    setup_logging,
)
from nanovllm.errors import NanovllmError

API_KEY_ENV = "NANOVLLM_API_KEY"
if TYPE_CHECKING:
    from nanovllm.server.serve import ServerConfig

DESCRIPTION = "Serve a model over an OpenAI-compatible HTTP API (see docs/api.md)."


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the subparsers of the `nanovllm` command."""
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server", description=DESCRIPTION)  # fmt: skip
    add_serve_args(parser)
    parser.set_defaults(func=cmd_serve)
    return parser


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_sampling_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: all IPv4)")
    g.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on /v1 paths (default: ${API_KEY_ENV})",
    )
    g.add_argument("--served-model-name", default=None, help="the model name of the API (default: --model)")  # fmt: skip
    g.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="requests that may wait in the engine's queue beyond --max-requests (each holds a "
        "worker thread); more get 503 with Retry-After at once",
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        help="seconds requests in flight get to finish after SIGINT/SIGTERM",
    )
    g.add_argument("--max-body-size", type=int, default=4 * 1024 * 1024, help="bytes; larger bodies get 413")  # fmt: skip
    g.add_argument("--log-interval", type=float, default=5.0, help="seconds between stats log lines")  # fmt: skip
    g.add_argument(
        "--receive-timeout",
        type=float,
        default=10.0,
        help="seconds a client gets to send a whole request from its first byte (plus 1 s per "
        "64 KiB received); then the connection is closed",
    )
    g.add_argument(
        "--send-timeout",
        type=float,
        default=30.0,
        help="seconds a client may leave its response or stream unread; then the connection is "
        "closed and its request aborted",
    )
    g.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=30.0,
        help="seconds an idle connection stays open",
    )
    g.add_argument(
        "--disable-access-log",
        "--disable-uvicorn-access-log",  # vLLM's name for it
        action="store_true",
        help="do not log a line per finished or refused request",
    )
    g.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (the tokenizer's configuration and chat template, as "
        "vLLM does; lm-eval's tokenizer_backend=remote needs it)",
    )
    dp = parser.add_argument_group("data parallel (Ray; pip install 'nanovllm[distributed]')")
    dp.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas behind this one front end, as Ray actors (one GPU each on a GPU "
        "node, a share of the CPUs otherwise), routed by load with prefix affinity",
    )
    dp.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (what `ray start --head` printed, or 'auto'); by default a "
        "private local Ray instance is started and stopped with the server",
    )
    dp.add_argument(
        "--max-replica-restarts",
        type=int,
        default=3,
        help="times Ray restarts a replica that died (its requests in flight end with an error)",
    )
    add_structured_args(parser)


def add_structured_args(parser: argparse.ArgumentParser) -> None:
    from nanovllm.structured.reasoning import REASONING_PARSERS
    from nanovllm.structured.tool_parsers import TOOL_PARSERS

    g = parser.add_argument_group("tool calling and reasoning")
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    g.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        help="how the model writes tool calls: hermes (Qwen2.5, Qwen3, Hermes), llama3_json",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        help="split <think>...</think> into the message's `reasoning`; a grammar then applies "
        "only after it",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from nanovllm.sampling_params import SamplingParams
    from nanovllm.server.serve import serve  # falcon and waitress load only when serving

    # Every check that needs no model runs before the model loads: flags, then the port.
    config = engine_config(args)
    config.served_model_name = args.served_model_name
    config.reasoning_parser = args.reasoning_parser
    server = server_config(args)
    SamplingParams(**sampling_overrides(args))  # the sampling flags' ranges
    check_port(server.host, server.port)
    setup_logging()
    return serve(config, server, sampling_overrides(args))


def check_port(host: str, port: int) -> None:
    """Refuse, in one line naming it, a port something already listens on (or a host that
    does not resolve), before the model loads; waitress binds it again once the model is in."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)  # fmt: skip
    except socket.gaierror as e:
        raise NanovllmError(f"cannot listen on --host {host}: {e.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress binds
            try:
                sock.bind(address)
            except OSError as e:
                raise NanovllmError(
                    f"port {port} is not available on {host}: {e.strerror} (pick another with "
                    "--port, or 0 for a free one)"
                ) from None


def server_config(args: argparse.Namespace) -> ServerConfig:
    from nanovllm.server.serve import ServerConfig

    _require(0 <= args.port <= 65535, f"--port must be in [0, 65535], got {args.port}")
    _require(args.max_waiting >= 0, f"--max-waiting must be >= 0, got {args.max_waiting}")
    _require(args.grace_period >= 0, f"--grace-period must be >= 0, got {args.grace_period}")
    _require(args.max_body_size > 0, f"--max-body-size must be > 0, got {args.max_body_size}")
    _require(args.log_interval > 0, f"--log-interval must be > 0, got {args.log_interval}")
    for flag in ("receive_timeout", "send_timeout", "keep_alive_timeout"):
        value = getattr(args, flag)
        _require(value > 0, f"--{flag.replace('_', '-')} must be > 0, got {value}")
    _require(args.api_key != "", "--api-key must not be empty")
    _require(
        not args.enable_auto_tool_choice or args.tool_call_parser is not None,
        "--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)",
    )
    _require(args.data_parallel_size >= 1, f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")  # fmt: skip
    _require(args.max_replica_restarts >= 0, f"--max-replica-restarts must be >= 0, got {args.max_replica_restarts}")  # fmt: skip
    _require(args.ray_address != "", "--ray-address must not be empty")
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_waiting=args.max_waiting,
        grace_period=args.grace_period,
        max_body_bytes=args.max_body_size,
        log_interval=args.log_interval,
        receive_timeout=args.receive_timeout,
        send_timeout=args.send_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        access_log=not args.disable_access_log,
        tokenizer_info=args.enable_tokenizer_info_endpoint,
        data_parallel_size=args.data_parallel_size,
        ray_address=args.ray_address,
        max_replica_restarts=args.max_replica_restarts,
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NanovllmError(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanovllm serve", description=DESCRIPTION)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except (NanovllmError, ValueError, OSError) as exc:
        if os.environ.get("NANOVLLM_DEBUG"):
            raise
        print(f"nanovllm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
