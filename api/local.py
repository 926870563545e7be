"""`make run`: the whole service on one machine with the embedded defaults (SQLite, SQLite broker, ./var).

Starts two Celery workers (searches; validations) and the API (uvicorn), prints the URL, and stops them all on
Ctrl-C.
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

LOCAL_KEY_FILE = "local.key"


def local_key(settings) -> str:
    """The embedded default's single key, owner "local": made once, kept in var/local.key (mode 0600) so the
    client and the next `make run` find it; the database holds only its hash, as for every key."""
    from store.auth import create_key, owner_of
    from store.db import session_scope

    path = settings.var_dir / LOCAL_KEY_FILE
    url = settings.resolved_database_url()
    if path.exists():
        key = path.read_text().strip()
        with session_scope(url) as db:
            if owner_of(db, key) is not None:
                return key
    with session_scope(url) as db:
        key = create_key(db, "local")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (searches run in parallel)")
    args = parser.parse_args(argv)

    settings = get_settings()
    migrate(settings.resolved_database_url())  # once, before two processes race to create tables
    key = local_key(settings)
    env = dict(os.environ, BITSEARCH_VAR_DIR=str(settings.var_dir.resolve()))
    from worker.command import worker_command

    # Two workers: searches and validations have queues of their own, so a short search never waits behind
    # validations on the kernels.
    workers = [
        subprocess.Popen(
            worker_command(queue, concurrency, f"{role}@%h"),
            env=env,
        )
        for role, queue, concurrency in (
            ("search", settings.queue, args.concurrency),
            ("validate", settings.resolved_validation_queue(), 1),
        )
    ]
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", args.host, "--port", str(args.port)], env=env
    )
    url = f"http://{args.host}:{args.port}"
    print(
        f"\nbitsearch is starting at {url}  (API docs: {url}/docs)\n"
        f"leaderboard: {url}/leaderboard#key={key}\n"
        f"local API key (also in {settings.var_dir / LOCAL_KEY_FILE}): {key}\n"
        f"database: {settings.resolved_database_url()}\nbroker:   {settings.resolved_broker_url()}\n"
        f"try: .venv/bin/bitsearch submit models/resnet20-fmnist.pt2 --data fashion-mnist --method sqnr "
        f"--budget avg_wbits=3 --server {url} --wait\n",
        flush=True,
    )
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, proc in (("search worker", workers[0]), ("validation worker", workers[1]), ("api", api)):
                if proc.poll() is not None:
                    print(f"the {name} process exited with {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        for proc in (api, *workers):
            if proc.poll() is None:
                proc.terminate()
        for proc in (api, *workers):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
