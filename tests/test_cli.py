"""The `bitsearch` console script, run as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import reference_model

BITSEARCH = Path(sys.executable).parent / "bitsearch"


def run(*args, check=True, env=None, cwd=None, input=None):
    proc = subprocess.run(
        [str(BITSEARCH), *map(str, args)], capture_output=True, text=True, timeout=600, env=env, cwd=cwd, input=input
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def client_env(tmp_path, **extra) -> dict:
    """The environment of a user with no key and no server configured (HOME under tmp_path), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BITSEARCH_API_KEY", "BITSEARCH_SERVER", "BITSEARCH_VAR_DIR", "XDG_CONFIG_HOME")
    }
    return {**env, "HOME": str(tmp_path / "home"), "COLUMNS": "200", **extra}


def test_inspect_lists_the_resnet20_layer_table():
    out = run("inspect", reference_model("resnet20-fmnist")).stdout
    assert "22 layers" in out and "layers.3.shortcut.0" in out and "fc" in out
    data = json.loads(run("inspect", reference_model("resnet20-fmnist"), "--json").stdout)
    assert data["totals"]["layers"] == 22
    assert data["layers"][9]["name"] == "layers.3.shortcut.0"
    assert data["layers"][9]["params"] == 512 and data["layers"][9]["macs"] == 512 * 14 * 14


def test_eval_reports_accuracy_sqnr_and_cost(tiny_model_path, tiny_model, tmp_path):
    data = json.loads(
        run("eval", tiny_model_path, "--data", "fashion-mnist", "--uniform", "4/8", "--split", "val", "--json").stdout
    )
    assert data["split"] == "val" and data["samples"] == 5000
    assert 0.5 < data["top1"] <= data["fp32_top1"] + 0.01 and data["sqnr_db"] > 10
    assert data["cost"]["avg_wbits"] == 4.0 and data["cost"]["weight_bytes"] > 0 and data["cost"]["bitops"] > 0
    from search.config import QuantConfig

    cfg = tmp_path / "cfg.json"
    cfg.write_text(QuantConfig.uniform(tiny_model, 4, 8).to_json())
    again = json.loads(
        run("eval", tiny_model_path, "--data", "fashion-mnist", "--config", cfg, "--split", "val", "--json").stdout
    )
    assert again["top1"] == data["top1"] and again["sqnr_db"] == data["sqnr_db"]
    table = run("eval", tiny_model_path, "--data", "fashion-mnist", "--uniform", "8/8", "--split", "val").stdout
    assert "top-1" in table and "output SQNR" in table and "BitOPs" in table


def test_errors_are_clear_and_exit_2(tiny_model_path, tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"format": "bitsearch.config", "version": 1, "model_sha256": "0" * 64, "layers": {}}))
    proc = run("eval", tiny_model_path, "--data", "fashion-mnist", "--config", bad, check=False)
    assert proc.returncode == 2 and "config is for model sha256" in proc.stderr
    junk = tmp_path / "junk.pt2"
    junk.write_text("nope")
    proc = run("inspect", junk, check=False)
    assert proc.returncode == 2 and "not a torch.export .pt2 archive" in proc.stderr
    proc = run("eval", tiny_model_path, "--data", "imagenet", "--uniform", "4/8", check=False)
    assert proc.returncode == 2 and "unknown data set 'imagenet'" in proc.stderr


# --- the search goes through the library's job spec ------------------------------------------------------------

SQNR_FAST = {"sweep_points": 2, "relinearize": 0}


def test_search_through_the_cli_matches_run_job_on_the_same_spec(tiny_model_path, tmp_path):
    import torch

    from search.model import load_model
    from search.spec import load_job_data, make_spec, run_job

    out = tmp_path / "result.json"
    threads = str(torch.get_num_threads())  # the same reduction order in both processes
    run(
        "search",
        tiny_model_path,
        "--data",
        "fashion-mnist",
        "--method",
        "sqnr",
        "--budget",
        "avg_wbits=4",
        "--seed",
        7,
        "--calib-size",
        64,
        "--val-samples",
        200,
        "--params",
        json.dumps(SQNR_FAST),
        "--out",
        out,
        "--json",
        env=client_env(tmp_path, OMP_NUM_THREADS=threads),
    )
    spec = make_spec(method="sqnr", budget={"avg_wbits": 4}, seed=7, calib_size=64, val_samples=200, params=SQNR_FAST)
    library = run_job(spec, load_model(tiny_model_path), load_job_data(spec, "fashion-mnist")).to_dict()
    through_cli = json.loads(out.read_text())

    def key(c):
        return c["w_bits"], c["a_bits"], c["val_top1"], c["val_sqnr_db"], c["fits"], c["pareto"]

    assert through_cli["candidates"] and [key(c) for c in through_cli["candidates"]] == [
        key(c) for c in library["candidates"]
    ]
    assert through_cli["recommended"] == library["recommended"]


def test_an_unknown_params_key_is_refused_by_name_before_anything_runs(tiny_model_path, tmp_path):
    bad = json.dumps({"sweep_points": 2, "bogus_key": 1})
    common = ["--data", "fashion-mnist", "--method", "sqnr", "--budget", "avg_wbits=4", "--params", bad]
    proc = run("search", tiny_model_path, *common, check=False)
    assert proc.returncode == 2 and "bogus_key" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    # submit checks the same spec locally: refused before it tries to reach the (absent) server
    proc = run(
        "submit", tiny_model_path, *common, "--server", "http://127.0.0.1:9", check=False, env=client_env(tmp_path)
    )
    assert proc.returncode == 2 and "bogus_key" in proc.stderr and "cannot reach" not in proc.stderr, proc.stderr
    proc = run(
        "search",
        tiny_model_path,
        "--data",
        "fashion-mnist",
        "--method",
        "uniform",
        "--budget",
        "avg_wbits=4",
        "--w-bits",
        "2-x",
        check=False,
    )
    assert proc.returncode == 2 and "--w-bits" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_takes_the_search_seed_and_calibration_size(tiny_model_path):
    args = [tiny_model_path, "--data", "fashion-mnist", "--uniform", "4/8", "--split", "val", "--json"]
    default = json.loads(run("eval", *args, "--calib-size", 64).stdout)
    other = json.loads(run("eval", *args, "--calib-size", 64, "--seed", 5).stdout)
    assert other["sqnr_db"] != default["sqnr_db"]  # other calibration images, other activation ranges


# --- small pieces of the client ----------------------------------------------------------------------------------


def test_progress_text_never_shows_an_unknown_total_or_a_repeated_status():
    from cli.common import progress_count, progress_label

    assert progress_count(0, None) == "" and progress_count(0, 0) == "" and progress_count(None, None) == ""
    assert progress_count(3, 7) == "3/7"
    assert progress_label("queued", "queued") == "queued" and progress_label("running", None) == "running"
    assert progress_label("running", "sqnr: allocating") == "running: sqnr: allocating"


def test_parse_bits():
    from cli.common import parse_bits

    assert parse_bits("2-8") == [2, 3, 4, 5, 6, 7, 8] and parse_bits("2,4,8") == [2, 4, 8] and parse_bits("8") == [8]
    with pytest.raises(ValueError, match="2-8, 2,4,8 or 8"):
        parse_bits("four")


def test_the_api_key_is_found_in_order_from_any_directory(tmp_path, monkeypatch):
    from cli.client import find_api_key, save_user_key, user_key_file

    for name in ("BITSEARCH_API_KEY", "BITSEARCH_VAR_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert find_api_key() == (None, "")

    path = save_user_key("bsk_user\n")
    assert path == tmp_path / "home" / ".config" / "bitsearch" / "key" == user_key_file()
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == "bsk_user\n"
    assert find_api_key() == ("bsk_user", str(path))

    (elsewhere / "var").mkdir()
    (elsewhere / "var" / "local.key").write_text("bsk_cwd\n")
    assert find_api_key()[0] == "bsk_cwd"
    var = tmp_path / "var"
    var.mkdir()
    (var / "local.key").write_text("bsk_var_dir\n")
    monkeypatch.setenv("BITSEARCH_VAR_DIR", str(var))
    assert find_api_key() == ("bsk_var_dir", str(var / "local.key"))
    monkeypatch.setenv("BITSEARCH_API_KEY", "bsk_env")
    assert find_api_key() == ("bsk_env", "$BITSEARCH_API_KEY")
    assert find_api_key("bsk_flag") == ("bsk_flag", "--api-key")

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_key_file() == tmp_path / "xdg" / "bitsearch" / "key"
    with pytest.raises(ValueError):
        save_user_key("two words")


def test_download_into_a_directory_keeps_the_default_file_name(tmp_path):
    from cli.client import download_path

    assert download_path(7, None, False) == Path("bitsearch-candidate-7.json")
    assert download_path(7, str(tmp_path), True) == tmp_path / "bitsearch-candidate-7-packed.zip"
    assert download_path(7, f"{tmp_path}/new/", False) == tmp_path / "new" / "bitsearch-candidate-7.json"
    assert (tmp_path / "new").is_dir()
    assert download_path(7, str(tmp_path / "best.json"), False) == tmp_path / "best.json"


# --- against a real server ---------------------------------------------------------------------------------------
# One stack for the module, started without a worker so that jobs stay queued; the watch test, last, adds one.

FAST_JOB = [
    "--data",
    "fashion-mnist",
    "--method",
    "uniform",
    "--budget",
    "avg_wbits=8",
    "--w-bits",
    "4,8",
    "--calib-size",
    "64",
    "--val-samples",
    "100",
    "--validate-top-k",
    "0",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tests.stack import Stack

    s = Stack(tmp_path_factory.mktemp("stack"), backend="postgres", heartbeat_s=1)
    s.start(workers=0)
    yield s
    s.stop()


@pytest.fixture
def idle_stack(stack):
    assert not stack.workers, "this test needs jobs to stay queued: run it before the worker starts"
    return stack


def as_alice(stack, tmp_path, **extra) -> dict:
    return client_env(tmp_path, BITSEARCH_API_KEY=stack.keys["alice"], BITSEARCH_SERVER=stack.url, **extra)


def job_status(stack, job_id: str) -> str:
    with stack.client() as c:
        return c.get(f"/jobs/{job_id}").json()["status"]


def test_ctrl_c_while_waiting_stops_following_not_the_job(idle_stack, tiny_model_path, tmp_path):
    stack = idle_stack
    proc = subprocess.Popen(
        [str(BITSEARCH), "submit", str(tiny_model_path), *FAST_JOB, "--wait"],
        env=as_alice(stack, tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    submitted = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if " submitted to " in line:
                submitted.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert submitted.wait(120), "".join(lines)
        time.sleep(1)  # in the polling loop by now
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)  # the reader alone drains stderr, to its end
    stderr = "".join(lines)
    job_id = re.search(r"job (\w+) submitted to", stderr).group(1)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    said = [line for line in stderr.splitlines() if line.startswith("bitsearch:")]
    assert len(said) == 1 and f"bitsearch cancel {job_id}" in said[0] and "keeps running" in said[0], stderr
    assert job_status(stack, job_id) == "queued"

    proc = run("cancel", job_id, env=as_alice(stack, tmp_path))
    assert f"job {job_id} cancelled" in proc.stdout
    assert job_status(stack, job_id) == "cancelled"


def test_jobs_lists_the_callers_jobs_and_cancel_cancels(idle_stack, tiny_model_path, tmp_path):
    stack = idle_stack
    env = as_alice(stack, tmp_path)
    created = json.loads(run("submit", tiny_model_path, *FAST_JOB, "--seed", 3, "--json", env=env).stdout)
    job_id = created["id"]
    table = run("jobs", env=env).stdout
    row = next(line for line in table.splitlines() if job_id in line)
    assert "queued" in row and "uniform" in row
    assert "None" not in table and "queued: queued" not in table and "queued  queued" not in row
    listed = json.loads(run("jobs", "--json", env=env).stdout)
    job = next(j for j in listed["items"] if j["id"] == job_id)
    assert job["status"] == "queued" and job["method"] == "uniform" and job["validate_top_k"] == 0
    # the server got the spec built locally
    assert job["options"]["seed"] == 3 and job["options"]["calib_size"] == 64 and job["options"]["w_bits"] == [4, 8]
    assert job["options"]["val_samples"] == 100
    # bob sees none of alice's jobs
    bob = json.loads(run("jobs", "--json", "--api-key", stack.keys["bob"], env=env).stdout)
    assert job_id not in [j["id"] for j in bob["items"]]

    assert f"job {job_id} cancelled" in run("cancel", job_id, env=env).stdout
    again = run("cancel", job_id, env=env, check=False)
    assert again.returncode == 2 and "already cancelled" in again.stderr and "Traceback" not in again.stderr
    cancelled = json.loads(run("jobs", "--status", "cancelled", "--json", env=env).stdout)
    assert job_id in [j["id"] for j in cancelled["items"]]


def test_login_lets_the_client_find_the_key_from_any_directory(stack, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = client_env(tmp_path)  # no key in the environment, no var/ here
    proc = run("jobs", "--server", stack.url, env=env, cwd=elsewhere, check=False)
    assert proc.returncode == 2 and "401" in proc.stderr and "bitsearch login" in proc.stderr, proc.stderr

    proc = run("login", stack.keys["bob"], env=env, cwd=elsewhere)
    key_file = tmp_path / "home" / ".config" / "bitsearch" / "key"
    assert str(key_file) in proc.stdout and key_file.stat().st_mode & 0o777 == 0o600
    bob = json.loads(run("jobs", "--server", stack.url, "--json", env=env, cwd=elsewhere).stdout)
    assert bob["total"] == 0

    run("login", env=env, cwd=tmp_path, input=stack.keys["alice"] + "\n")  # from stdin, not the shell history
    assert key_file.read_text().strip() == stack.keys["alice"]
    assert run("jobs", "--server", stack.url, "--json", env=env, cwd=elsewhere).returncode == 0


def test_watch_follows_a_job_to_its_results_and_download_writes_into_a_directory(stack, tiny_model_path, tmp_path):
    from search.config import QuantConfig
    from search.model import load_model

    if not stack.workers:
        stack.start_worker()
        stack.wait_ready()
    env = as_alice(stack, tmp_path)
    job_id = json.loads(run("submit", tiny_model_path, *FAST_JOB, "--json", env=env).stdout)["id"]
    result = json.loads(run("watch", job_id, "--json", env=env).stdout)
    assert result["job"]["status"] == "succeeded", result["job"]
    assert {c["avg_wbits"] for c in result["candidates"]} == {4.0, 8.0}
    table = run("watch", job_id, env=env).stdout
    best = next(c for c in result["candidates"] if c["recommended"])
    assert f"recommended: candidate {best['id']}" in table

    into = tmp_path / "configs"
    into.mkdir()
    out = run("download", best["id"], "-o", into, env=env).stdout.strip()
    assert Path(out) == into / f"bitsearch-candidate-{best['id']}.json"
    QuantConfig.from_json(Path(out).read_text(), load_model(tiny_model_path))
    out = run("download", best["id"], "-o", f"{tmp_path}/new/", env=env).stdout.strip()
    assert Path(out) == tmp_path / "new" / f"bitsearch-candidate-{best['id']}.json" and Path(out).is_file()
