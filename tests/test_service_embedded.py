"""`make run`'s path: the API and a Celery worker on the embedded defaults (SQLite database and broker), no
external server; driven with the `bitsearch submit` / `download` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from search.config import QuantConfig
from search.model import load_model
from tests.stack import ROOT, free_port

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"


def test_embedded_service_with_the_cli_client(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITSEARCH_")}
    env.update(BITSEARCH_VAR_DIR=str(tmp_path / "var"), BITSEARCH_HEARTBEAT_S="1")
    log = open(tmp_path / "local.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.local", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "local.log").read_text()[-3000:]
            try:
                health = httpx.get(f"{url}/health", timeout=5).json()
                if health["workers"]:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.time() < deadline, (tmp_path / "local.log").read_text()[-3000:]
            time.sleep(0.5)
        assert health["database"] == "ok" and health["broker"] == "ok"
        assert (tmp_path / "var" / "bitsearch.db").exists() and (tmp_path / "var" / "broker.db").exists()

        cli = [sys.executable, "-m", "cli.main"]
        out = subprocess.run(
            [
                *cli,
                "submit",
                str(RESNET),
                "--data",
                "fashion-mnist",
                "--method",
                "uniform",
                "--budget",
                "avg_wbits=4",
                "--val-samples",
                "200",
                "--calib-size",
                "128",
                "--validate-top-k",
                "0",
                "--server",
                url,
                "--wait",
                "--json",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["job"]["status"] == "succeeded"
        assert {c["avg_wbits"] for c in result["candidates"]} == {2.0, 3.0, 4.0}
        best = next(c for c in result["candidates"] if c["recommended"])

        target = tmp_path / "best.json"
        out = subprocess.run(
            [*cli, "download", str(best["id"]), "-o", str(target), "--server", url],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        config = QuantConfig.from_json(target.read_text(), load_model(RESNET))
        assert set(config.w_bits().values()) == {4}

        out = subprocess.run(
            [
                *cli,
                "submit",
                str(RESNET),
                "--data",
                "fashion-mnist",
                "--method",
                "sqnr",
                "--budget",
                "avg_wbits=1",
                "--server",
                url,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and "infeasible budget" in out.stderr and "smallest feasible value" in out.stderr
        assert httpx.get(f"{url}/leaderboard", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
