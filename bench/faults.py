"""Fault injection against the real stack on loopback (PostgreSQL, Redis, uvicorn, Celery): each fault strikes
while a search runs, then we report what became of the job. Bounded: every wait has a timeout.

    .venv/bin/python bench/faults.py [--only worker_killed,redis_restart,db_dropped,disk_full]

Needs root for the disk-full case (it mounts a small tmpfs as the artifact store); skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.stack import Stack  # noqa: E402

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
MOBILENET = ROOT / "models" / "mobilenetv2-fmnist.pt2"
OPTIONS = {"val_samples": 300, "calib_size": 128, "validate_top_k": 0}
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def submit(c: httpx.Client, method="haq", params=None, model=RESNET) -> str:
    r = c.post(
        "/jobs",
        data={
            "method": method,
            "budget": json.dumps({"avg_wbits": 3}),
            "data_name": "fashion-mnist",
            "options": json.dumps({**OPTIONS, "params": params or {}}),
        },
        files={"model": (model.name, model.read_bytes(), "application/zip")},
    )
    r.raise_for_status()
    return r.json()["id"]


def wait_running(c: httpx.Client, job_id: str, candidates: int = 1, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] == "running" and job["candidates"] >= candidates:
            return
        if job["status"] not in ("queued", "running"):
            raise RuntimeError(f"job ended before the fault: {job}")
        time.sleep(0.3)
    raise TimeoutError("the job never started")


def outcome(stack: Stack, job_id: str, timeout: float = 600) -> dict:
    job = stack.wait_job(job_id, timeout=timeout)
    engine = create_engine(stack.database_url)
    with engine.connect() as conn:
        seqs = [r[0] for r in conn.execute(text("SELECT seq FROM candidates WHERE job_id = :j"), {"j": job_id})]
    engine.dispose()
    return {
        "status": job["status"],
        "error": job["error"],
        "attempts": job["attempts"],
        "candidates": len(seqs),
        "duplicates": len(seqs) - len(set(seqs)),
    }


def api_answers(stack: Stack) -> bool:
    try:
        return httpx.get(f"{stack.url}/health", timeout=5).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def worker_killed(stack: Stack, c: httpx.Client) -> dict:
    job = submit(c, params={"episodes": 40, "reward_samples": 128})
    wait_running(c, job, candidates=2)
    stack.kill_worker(stack.workers[-1])
    stack.start_worker()
    return {
        "fault": "worker SIGKILLed mid-search, a new worker started",
        **outcome(stack, job),
        "api_answered": api_answers(stack),
    }


def redis_restart(stack: Stack, c: httpx.Client) -> dict:
    job = submit(c, params={"episodes": 40, "reward_samples": 128})
    wait_running(c, job)
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    time.sleep(1)
    during = c.post(
        "/jobs",
        data={
            "method": "sqnr",
            "budget": json.dumps({"avg_wbits": 3}),
            "model_id": c.get(f"/jobs/{job}").json()["model_id"],
            "data_name": "fashion-mnist",
            "options": json.dumps(OPTIONS),
        },
    )
    answered = api_answers(stack)
    time.sleep(2)
    subprocess.run(REDIS_START, check=True, capture_output=True)
    first = outcome(stack, job)
    second = outcome(stack, during.json()["id"]) if during.status_code == 202 else {"status": during.text}
    return {
        "fault": "Redis shut down (its queue lost) for 3 s mid-search; a job submitted during the outage",
        **first,
        "api_answered": answered,
        "submitted_during_outage": f"HTTP {during.status_code}, then "
        f"{second['status']} ({second.get('candidates', 0)} candidates)",
    }


def db_dropped(stack: Stack, c: httpx.Client) -> dict:
    job = submit(c, params={"episodes": 40, "reward_samples": 128})
    wait_running(c, job, candidates=2)
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": stack.database},
        ).scalar()
    engine.dispose()
    return {
        "fault": f"every database connection terminated mid-search ({killed} connections)",
        **outcome(stack, job),
        "api_answered": api_answers(stack),
    }


def disk_full(stack: Stack, c: httpx.Client) -> dict:
    store = stack.var_dir / "artifacts"
    filler = store / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until ENOSPC
    before = sorted(p.name for p in (store / "models").iterdir())
    r = c.post(
        "/jobs",
        data={
            "method": "sqnr",
            "budget": json.dumps({"avg_wbits": 3}),
            "data_name": "fashion-mnist",
            "options": json.dumps(OPTIONS),
        },
        files={"model": (MOBILENET.name, MOBILENET.read_bytes(), "application/zip")},
    )
    after = sorted(p.name for p in (store / "models").iterdir())
    answered = api_answers(stack)
    filler.unlink()
    return {
        "fault": "artifact store full during an upload",
        "status": f"HTTP {r.status_code}: {r.json().get('detail')}",
        "error": None,
        "attempts": 0,
        "candidates": 0,
        "duplicates": 0,
        "api_answered": answered,
        "partial_files_left": len(after) - len(before),
    }


FAULTS = {
    "worker_killed": worker_killed,
    "redis_restart": redis_restart,
    "db_dropped": db_dropped,
    "disk_full": disk_full,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FAULTS))
    args = parser.parse_args()
    var = Path(tempfile.mkdtemp(prefix="bitsearch-faults-"))
    (var / "artifacts").mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(var / "artifacts")]).returncode == 0
    )
    stack = Stack(var, backend="postgres", heartbeat_s=1, stale_after_s=8, rate_limit_per_s=1000, max_active_jobs=10)
    results = []
    try:
        stack.start(workers=1)
        with stack.client() as c:
            for name in args.only.split(","):
                if name == "disk_full" and not mounted:
                    results.append({"fault": "artifact store full", "status": "skipped (needs root for tmpfs)"})
                    continue
                started = time.time()
                try:
                    res = FAULTS[name](stack, c)
                except Exception as e:  # a fault we do not survive is a result too
                    res = {"fault": name, "status": f"harness error: {type(e).__name__}: {e}"}
                res["seconds"] = round(time.time() - started, 1)
                results.append(res)
                print(json.dumps(res), flush=True)
    finally:
        stack.stop()
        if mounted:
            subprocess.run(["umount", str(var / "artifacts")])
    print("\n| fault | job outcome | attempts | candidates | duplicates | API answered | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        notes = r.get("submitted_during_outage") or (
            f"partial files left: {r['partial_files_left']}" if "partial_files_left" in r else (r.get("error") or "")
        )
        print(
            f"| {r['fault']} | {r['status']} | {r.get('attempts', '')} | {r.get('candidates', '')} | "
            f"{r.get('duplicates', '')} | {r.get('api_answered', '')} | {notes} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
