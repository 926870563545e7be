"""`bitsearch validate`, `bitsearch pack` and `bitsearch latency-table`: the compiled low-bit kernels."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the kernel commands to the `bitsearch` parser (filled in by the kernels work)."""
