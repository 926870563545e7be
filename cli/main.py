"""The `bitsearch` console script: one parser for every command group, one way errors end.

Errors we raise for bad input are ValueError subclasses (ArchiveError, ConfigError, DatasetError, BudgetError,
SearchError, SpecError, the kernels' and the client's errors) and OSError covers missing files: one line on
stderr, exit status 2, no traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys

from . import client, kernels, library
from .common import Interrupted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsearch", description="per-layer bit-width search for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    library.register(sub)
    kernels.register(sub)
    client.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"bitsearch: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"bitsearch: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("bitsearch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
