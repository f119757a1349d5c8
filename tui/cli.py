"""`nanovllm top`: the command line of the dashboard. Textual is imported only when it runs."""

from __future__ import annotations

import argparse
import os

from nanovllm.errors import NanovllmError

API_KEY_ENV = "NANOVLLM_API_KEY"  # the same variable `nanovllm serve` reads
DESCRIPTION = "Live dashboard of a running nanovllm (or vLLM) server."


def add_top_parser(subparsers) -> argparse.ArgumentParser:
    """Register `top` on the subparsers of the `nanovllm` command."""
    parser = subparsers.add_parser("top", help="live dashboard of a running server", description=DESCRIPTION)  # fmt: skip
    add_top_args(parser)
    parser.set_defaults(func=cmd_top)
    return parser


def add_top_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument(
        "--api-key", default=None, help=f"the server's --api-key (default: ${API_KEY_ENV})"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request")


def cmd_top(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise NanovllmError(f"--interval must be > 0, got {args.interval}")
    if not args.timeout > 0:
        raise NanovllmError(f"--timeout must be > 0, got {args.timeout}")
    from nanovllm.tui.app import TopApp  # textual loads only here
    from nanovllm.tui.client import Client

    client = Client(args.url, args.api_key or os.environ.get(API_KEY_ENV), args.timeout)
    TopApp(client, args.interval).run()
    return 0
