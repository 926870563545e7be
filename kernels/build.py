"""Builds the C++ kernels on first use (torch.utils.cpp_extension + ninja) and caches the build.

No -march=native: the file compiles AVX2 and AVX-512 functions with per-function target attributes and
picks one at run time (cpuid), so a build runs on any x86-64 machine. -ffp-contract=off keeps the
dequantization (sum x scale + bias) from fusing into an FMA in some ISA paths only, so every path gives
bit-identical floats.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "lowbit.cpp"


@lru_cache(maxsize=1)
def extension():
    from torch.utils.cpp_extension import load

    build_dir = Path(os.environ.get("BITSEARCH_KERNEL_BUILD", Path.home() / ".cache" / "bitsearch" / "kernels"))
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="bitsearch_lowbit",
        sources=[str(SOURCE)],
        build_directory=str(build_dir),
        extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
