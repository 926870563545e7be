"""A large uint8 data set uploaded through the real API (POST /jobs, multipart), then split as a worker splits it.

    .venv/bin/python bench/upload.py [--mib 1024] [--analysis-memory-mb 1024] [--calib-size 1024]

Writes a safetensors file of 28x28x1 uint8 images (labels 0-9, Fashion-MNIST's normalisation) of about --mib
MiB, starts PostgreSQL-backed uvicorn with no worker, submits a sqnr job on models/resnet20-fmnist.pt2 with the
file, and reports the upload's wall time and how much the API process's peak RSS (VmHWM) grew. The analysis child
runs under --analysis-memory-mb of address space. Then, in a fresh process, the job's splits are loaded from the
stored file as the worker loads them (search.spec.load_job_data) and the calibration and the validation images a
search scores on (val_samples 2000) are decoded: its peak RSS is reported too.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.stack import Stack  # noqa: E402

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
ROW = 28 * 28


def write_uint8_set(path: Path, n: int) -> int:
    """n images, labels, mean, std: written a block at a time, never whole in memory."""
    end = n * ROW
    header = {
        "images": {"dtype": "U8", "shape": [n, 28, 28, 1], "data_offsets": [0, end]},
        "mean": {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]},
        "std": {"dtype": "F32", "shape": [1], "data_offsets": [end + 4, end + 8]},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [end + 8, end + 8 + 8 * n]},
    }
    raw = json.dumps(header).encode()
    block = np.random.default_rng(0).integers(0, 256, ROW * 8192, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for first in range(0, n, 8192):
            f.write(block[: ROW * min(8192, n - first)])
        f.write(struct.pack("<ff", 0.2860, 0.3530))
        for first in range(0, n, 8192):
            f.write((np.arange(first, min(n, first + 8192), dtype=np.int64) % 10).tobytes())
    return path.stat().st_size


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def submit(client, data: Path):
    with open(data, "rb") as f:
        return client.post(
            "/jobs",
            data={"method": "sqnr", "budget": json.dumps({"avg_wbits": 4})},
            files={
                "model": (RESNET.name, RESNET.read_bytes(), "application/zip"),
                "data": (data.name, f, "application/octet-stream"),
            },
        )


WORKER_SIDE = """
import json, resource, sys, time
from search.spec import load_job_data, make_spec
spec = make_spec(method="sqnr", budget={"avg_wbits": 4}, calib_size=int(sys.argv[2]), val_samples=2000)
start = time.perf_counter()
splits = load_job_data(spec, sys.argv[1])
calib, val = splits.calib.inputs, splits.val.subset(slice(0, spec.val_samples)).inputs
print(json.dumps({"samples": len(splits.calib) + len(splits.val), "calib": list(calib.shape), "val": list(val.shape),
                  "seconds": round(time.perf_counter() - start, 2),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--analysis-memory-mb", type=int, default=1024)
    p.add_argument("--calib-size", type=int, default=1024)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bitsearch-upload-") as tmp:
        tmp = Path(tmp)
        small, big = tmp / "warm.safetensors", tmp / "big.safetensors"
        write_uint8_set(small, 100)
        size = write_uint8_set(big, args.mib * 2**20 // (ROW + 8))
        print(f"data set: {size / 2**20:.0f} MiB ({size} bytes)")
        stack = Stack(tmp / "stack", backend="postgres", upload_analysis_memory_mb=args.analysis_memory_mb)
        stack.start(workers=0)
        try:
            with stack.client() as c:
                c.timeout = 600
                warm = submit(c, small)  # what any submission loads (the spec code, torch) is not the upload's
                assert warm.status_code == 202, warm.text
                before = hwm_kib(stack.api.pid)
                start = time.perf_counter()
                r = submit(c, big)
                seconds = time.perf_counter() - start
                after = hwm_kib(stack.api.pid)
            print(f"POST /jobs: {r.status_code} in {seconds:.1f} s; {r.text[:200]}")
            grew = (after - before) / 1024
            print(f"API peak RSS: {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after (+{grew:.0f})")
            stored = max((stack.var_dir / "artifacts" / "datasets").iterdir(), key=lambda f: f.stat().st_size)
            out = subprocess.run(
                [sys.executable, "-c", WORKER_SIDE, str(stored), str(args.calib_size)],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            w = json.loads(out.strip().splitlines()[-1])
            print(
                f"worker side: {w['samples']} samples split, calibration {w['calib']} and scored validation "
                f"{w['val']} decoded in {w['seconds']} s; peak RSS {w['peak_mib']} MiB"
            )
        finally:
            stack.stop()
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
