"""`make run`: the whole service on one machine with the embedded defaults (SQLite, SQLite broker, ./var).

Starts a Celery worker process and the API (uvicorn), prints the URL, and stops both on Ctrl-C.
Set BITSEARCH_DATABASE_URL / BITSEARCH_BROKER_URL to use PostgreSQL and Redis instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from store.db import migrate
from store.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (searches run in parallel)")
    args = parser.parse_args(argv)

    settings = get_settings()
    migrate(settings.resolved_database_url())  # once, before two processes race to create tables
    env = dict(os.environ, BITSEARCH_VAR_DIR=str(settings.var_dir.resolve()))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO",
         "-Q", settings.queue, f"--concurrency={args.concurrency}", "--without-gossip", "--without-mingle"], env=env)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", args.host,
                            "--port", str(args.port)], env=env)
    url = f"http://{args.host}:{args.port}"
    print(f"\nbitsearch is starting at {url}  (leaderboard: {url}/leaderboard, API docs: {url}/docs)\n"
          f"database: {settings.resolved_database_url()}\nbroker:   {settings.resolved_broker_url()}\n"
          f"try: .venv/bin/bitsearch submit models/resnet20-fmnist.pt2 --data fashion-mnist --method sqnr "
          f"--budget avg_wbits=3 --server {url} --wait\n", flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, proc in (("worker", worker), ("api", api)):
                if proc.poll() is not None:
                    print(f"the {name} process exited with {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        for proc in (api, worker):
            if proc.poll() is None:
                proc.terminate()
        for proc in (api, worker):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
