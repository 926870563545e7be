"""Polling load against the real service on loopback while a search runs: wrk clients on GET /jobs/{id} and
GET /api/leaderboard, reporting throughput and latency percentiles.

    .venv/bin/python bench/load.py [--seconds 20] [--connections 8] [--api-workers 1]

The stack is PostgreSQL + Redis + uvicorn + one Celery worker running a HAQ search for the whole run. The
per-key rate limit is raised for the run (it would otherwise answer most of these polls with 429 by design).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.stack import Stack  # noqa: E402

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def submit(c, method, params, options=None):
    r = c.post(
        "/jobs",
        data={
            "method": method,
            "budget": json.dumps({"avg_wbits": 3}),
            "data_name": "fashion-mnist",
            "options": json.dumps(
                {"val_samples": 300, "calib_size": 128, "validate_top_k": 0, **(options or {}), "params": params}
            ),
        },
        files={"model": (RESNET.name, RESNET.read_bytes(), "application/zip")},
    )
    r.raise_for_status()
    return r.json()["id"]


def parse_wrk(out: str) -> dict:
    def ms(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * UNITS[m.group(2)] if m else None

    reqs = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(total.group(1)),
        "rps": float(reqs.group(1)),
        "p50_ms": ms(50),
        "p90_ms": ms(90),
        "p99_ms": ms(99),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8, help="per endpoint")
    args = parser.parse_args()

    stack = Stack(
        Path(tempfile.mkdtemp(prefix="bitsearch-load-")),
        backend="postgres",
        rate_limit_per_s=1e6,
        rate_limit_burst=10**6,
        max_active_jobs=10,
    )
    try:
        stack.start(workers=1)
        with stack.client() as c:
            done = submit(c, "sqnr", {})  # something on the leaderboard
            stack.wait_job(done, timeout=300)
            running = submit(c, "haq", {"episodes": 5000, "reward_samples": 256})
            while c.get(f"/jobs/{running}").json()["status"] != "running":
                time.sleep(0.2)
            time.sleep(3)  # into the search proper
            header = f"Authorization: Bearer {stack.keys['alice']}"
            cmds = {
                "GET /jobs/{id}": [
                    "wrk",
                    "-t1",
                    f"-c{args.connections}",
                    f"-d{args.seconds}s",
                    "--latency",
                    "-H",
                    header,
                    f"{stack.url}/jobs/{running}",
                ],
                "GET /api/leaderboard": [
                    "wrk",
                    "-t1",
                    f"-c{args.connections}",
                    f"-d{args.seconds}s",
                    "--latency",
                    "-H",
                    header,
                    f"{stack.url}/api/leaderboard",
                ],
            }
            procs = {k: subprocess.Popen(v, stdout=subprocess.PIPE, text=True) for k, v in cmds.items()}
            results = {k: parse_wrk(p.communicate()[0]) for k, p in procs.items()}
            job = c.get(f"/jobs/{running}").json()
            c.post(f"/jobs/{running}/cancel")
    finally:
        stack.stop()
    print(f"search during the run: {job['method']} {job['status']}, step {job['progress']['step']}")
    print("\n| endpoint | requests | req/s | p50 ms | p90 ms | p99 ms | non-2xx | socket errors |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        print(
            f"| {k} | {r['requests']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['non_2xx']} | {r['socket_errors']} |"
        )
    total = sum(r["rps"] for r in results.values())
    print(
        f"| both | {sum(r['requests'] for r in results.values())} | {total:.0f} | | | "
        f"{max(r['p99_ms'] for r in results.values()):.2f} (worst) | | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
