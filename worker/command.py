"""How a worker process is started (by `make run` and the test stack), apart from the Celery app, so that
building the command creates no app and reads no settings."""

from __future__ import annotations

import sys


def worker_command(queues: str, concurrency: int, node: str) -> list[str]:
    """The command line of a worker process taking tasks from `queues` (comma-separated) as node `node`."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel=INFO",
        "-Q",
        queues,
        f"--concurrency={concurrency}",
        "-n",
        node,
        "--without-gossip",
        "--without-mingle",
    ]
