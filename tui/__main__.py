"""`python -m nanovllm.tui [--url ...]`: the same as `nanovllm top`."""

from __future__ import annotations

import argparse
import sys

from nanovllm.errors import NanovllmError
from nanovllm.tui.cli import DESCRIPTION, add_top_args, cmd_top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanovllm top", description=DESCRIPTION)
    add_top_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_top(args)
    except NanovllmError as exc:
        print(f"nanovllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
