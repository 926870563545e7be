"""`bitsearch submit` and `bitsearch download`: a client for a bitsearch server (HTTP only)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client commands to the `bitsearch` parser."""
