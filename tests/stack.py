"""A real bitsearch deployment for tests and benchmarks: the API under uvicorn and Celery worker processes,
on PostgreSQL + Redis (a fresh database and queue per stack) or on the embedded SQLite defaults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from worker.command import worker_command

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)


class Stack:
    def __init__(self, var_dir: Path, backend: str = "postgres", **settings):
        self.var_dir = Path(var_dir)
        self.backend = backend
        self.name = uuid.uuid4().hex[:10]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(
            os.environ, BITSEARCH_VAR_DIR=str(self.var_dir), BITSEARCH_QUEUE=f"test-{self.name}", PYTHONUNBUFFERED="1"
        )
        if backend == "postgres":
            self.database = f"bitsearch_test_{self.name}"
            self.env["BITSEARCH_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}"
            self.env["BITSEARCH_BROKER_URL"] = REDIS_URL
        for key, value in settings.items():
            self.env[f"BITSEARCH_{key.upper()}"] = str(value)
        self.keys: dict[str, str] = {}
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs = self.var_dir / "logs"

    @property
    def database_url(self) -> str:
        return self.env.get("BITSEARCH_DATABASE_URL") or f"sqlite:///{(self.var_dir / 'bitsearch.db').resolve()}"

    def start(self, workers: int = 1) -> Stack:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if self.backend == "postgres":
            _pg_admin(f'CREATE DATABASE "{self.database}"')
        for owner in ("alice", "bob"):
            self.keys[owner] = self.create_key(owner)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            cwd=ROOT,
            stdout=open(self.logs / "api.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        for _ in range(workers):
            self.start_worker()
        self.wait_ready()
        return self

    def create_key(self, owner: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "store.admin", "create-key", owner],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def start_worker(self, queues: str = "both") -> subprocess.Popen:
        """A worker on the search queue, the validation queue, or (the default) both."""
        n = len(self.workers)
        search, validate = self.env["BITSEARCH_QUEUE"], f"{self.env['BITSEARCH_QUEUE']}-validate"
        names = {"search": search, "validate": validate, "both": f"{search},{validate}"}[queues]
        proc = subprocess.Popen(
            worker_command(names, 1, f"w{n}-{self.name}@%h"),
            env=self.env,
            cwd=ROOT,
            stdout=open(self.logs / f"worker{n}.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own process group: kill_worker takes the forked children too
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker and its children: no chance to clean up, as in a crash or an OOM kill."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited: {(self.logs / 'api.log').read_text()[-3000:]}")
            try:
                h = httpx.get(f"{self.url}/health", timeout=5).json()
                if h.get("workers") or not self.workers:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the stack did not come up; api log: {(self.logs / 'api.log').read_text()[-3000:]}")

    def client(self, owner: str | None = "alice") -> httpx.Client:
        """A client with `owner`'s key (None: anonymous)."""
        headers = {"Authorization": f"Bearer {self.keys[owner]}"} if owner else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers)

    def post_job(self, method: str, budget: dict, options: dict, model: Path, owner: str = "alice") -> httpx.Response:
        """POST /jobs as `owner`: `model` uploaded, the built-in Fashion-MNIST data set."""
        with self.client(owner) as c:
            return c.post(
                "/jobs",
                data={
                    "method": method,
                    "budget": json.dumps(budget),
                    "options": json.dumps(options),
                    "data_name": "fashion-mnist",
                },
                files={"model": (model.name, model.read_bytes(), "application/zip")},
            )

    def wait_job(self, job_id: str, timeout: float = 600, until=("succeeded", "failed", "cancelled")) -> dict:
        deadline = time.time() + timeout
        with self.client() as c:
            while time.time() < deadline:
                job = c.get(f"/jobs/{job_id}").json()
                if job["status"] in until:
                    return job
                time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s: {job}")

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=20)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            try:
                self.api.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.api.kill()
        if self.backend == "postgres":
            from store.db import engine_for

            engine_for.cache_clear()
            try:
                _pg_admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            except Exception:
                pass
