"""The service end to end on real parts: uvicorn + Celery worker processes on PostgreSQL and Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from search.config import QuantConfig
from search.data import LabelledSet, fashion_mnist_splits, save_dataset_file
from search.model import load_model
from search.simulate import Simulator
from tests.stack import ROOT, Stack

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
ARTIFACTS = ROOT / "test-artifacts"
FAST = {"val_samples": 500, "calib_size": 256, "validate_top_k": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("stack"),
        backend="postgres",
        heartbeat_s=1,
        stale_after_s=6,
        max_model_bytes=4 * 2**20,
        max_dataset_bytes=4 * 2**20,
        max_request_bytes=12 * 2**20,
        validate_samples=1000,
    )
    s.start(workers=1)
    yield s
    s.stop()


def submit(stack, method, budget, options=None, model=RESNET, data_name="fashion-mnist", files=None, **form):
    with stack.client() as c:
        fields = {"method": method, "budget": json.dumps(budget), "options": json.dumps(options or FAST), **form}
        if data_name is not None:
            fields["data_name"] = data_name
        upload = dict(files or {})
        if model is not None:
            upload["model"] = (Path(model).name, Path(model).read_bytes(), "application/zip")
        return c.post("/jobs", data=fields, files=upload or None)


def db_rows(stack, sql: str, **params):
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).all()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def finished_jobs(stack):
    """One sqnr and one imprinting job on ResNet-20, run to the end."""
    sqnr = submit(stack, "sqnr", {"avg_wbits": 3})
    assert sqnr.status_code == 202, sqnr.text
    assert sqnr.headers["location"] == f"/jobs/{sqnr.json()['id']}"
    imprinting = submit(
        stack,
        "imprinting",
        {"avg_wbits": 3},
        {**FAST, "params": {"patience": 3, "validate_top": 2, "curve_points": 3}},
        model=None,
        model_id=sqnr.json()["model_id"],
    )
    assert imprinting.status_code == 202, imprinting.text
    # Identical uploads are stored once and reusable by id.
    assert imprinting.json()["model_id"] == sqnr.json()["model_id"]
    jobs = {m: stack.wait_job(r.json()["id"], timeout=900) for m, r in (("sqnr", sqnr), ("imprinting", imprinting))}
    return jobs


def test_jobs_succeed_and_candidates_meet_the_budget(stack, finished_jobs):
    with stack.client() as c:
        for method, job in finished_jobs.items():
            assert job["status"] == "succeeded", job
            assert job["progress"]["step"] == job["progress"]["total"] > 0
            assert job["search_seconds"] > 0 and job["started_at"] and job["finished_at"]
            cands = c.get(f"/jobs/{job['id']}/candidates", params={"sort": "-val_top1"}).json()
            assert cands and all(x["avg_wbits"] <= 3 + 1e-9 for x in cands)
            assert any(x["pareto"] for x in cands)
            assert sum(x["recommended"] for x in cands) == 1
            assert cands[0]["val_top1"] >= cands[-1]["val_top1"]  # sorted as asked
            listed = c.get("/jobs", params={"method": method, "status": "succeeded"}).json()
            assert job["id"] in [j["id"] for j in listed["items"]]


def test_config_download_reevaluates_to_the_stored_accuracy(stack, finished_jobs):
    job = finished_jobs["sqnr"]
    with stack.client() as c:
        rec = next(x for x in c.get(f"/jobs/{job['id']}/candidates").json() if x["recommended"])
        resp = c.get(f"/candidates/{rec['id']}/config")
        detail = c.get(f"/candidates/{rec['id']}").json()
    assert resp.status_code == 200 and "attachment" in resp.headers["content-disposition"]
    model = load_model(RESNET)
    config = QuantConfig.from_json(resp.text, model)
    assert config.w_bits() == detail["w_bits"]
    splits = fashion_mnist_splits(calib_size=FAST["calib_size"])
    result = Simulator(model, splits.calib.inputs).evaluate(config, splits.val.subset(slice(0, FAST["val_samples"])))
    assert result.top1 == pytest.approx(rec["val_top1"], abs=1e-6)


def test_pareto_candidates_are_validated_on_the_kernels(stack, finished_jobs, tmp_path):
    import zipfile

    job = finished_jobs["sqnr"]
    deadline = time.time() + 600
    with stack.client() as c:
        while True:
            validated = [x for x in c.get(f"/jobs/{job['id']}/candidates").json() if x["validation"]]
            if validated and all(v["validation"]["status"] in ("succeeded", "failed") for v in validated):
                break
            assert time.time() < deadline, validated
            time.sleep(1)
        assert len(validated) == FAST["validate_top_k"]
        v = validated[0]["validation"]
        assert v["status"] == "succeeded", v
        assert v["samples"] == 1000 and v["agreement"] >= 0.995 and abs(v["top1"] - v["sim_top1"]) <= 0.002
        assert (
            v["packed_bytes"] > 0
            and v["latency_us"]["1"] > 0
            and 0 <= v["latency_iqr_us"]["1"] < 10 * v["latency_us"]["1"]
            and set(v["latency_conditions"]) >= {"others_cpu_share", "under_load", "timings", "repeats"}
            and v["isa"] in ("scalar", "avx2", "avx512", "avx512vnni")
        )
        resp = c.get(f"/candidates/{validated[0]['id']}/packed")
        assert resp.status_code == 200
        (tmp_path / "packed.zip").write_bytes(resp.content)
        with zipfile.ZipFile(tmp_path / "packed.zip") as zf:
            assert set(zf.namelist()) == {"model.pt2", "config.json"}
            zf.extractall(tmp_path / "packed")
        # The validation also wrote the ONNX QDQ model (tests/test_onnx_export.py checks its arithmetic).
        resp = c.get(f"/candidates/{validated[0]['id']}/export", params={"format": "onnx"})
        assert resp.status_code == 200, resp.text
        onnx_bytes = resp.content
    from kernels.lower import load_packed

    packed = load_packed(tmp_path / "packed")
    images = fashion_mnist_splits(calib_size=FAST["calib_size"]).test.inputs[:200]
    logits = packed(images)
    assert logits.shape == (200, 10)
    from kernels.onnx_export import onnx_session, run_onnx

    onnx_logits = run_onnx(onnx_session(onnx_bytes), images)
    assert (onnx_logits.argmax(1) == logits.argmax(1)).float().mean() >= 0.98


def test_leaderboard_json_lists_both_methods(stack, finished_jobs):
    with stack.client() as c:
        board = c.get("/api/leaderboard").json()
    assert len(board["groups"]) == 1
    group = board["groups"][0]
    assert group["model"]["filename"] == "resnet20-fmnist.pt2" and group["dataset"]["id"] == "fashion-mnist"
    assert {r["method"] for r in group["rows"]} == {"sqnr", "imprinting"}
    assert any(r["front"] for r in group["rows"])
    assert all(r["weight_bytes"] > 0 and r["avg_wbits"] <= 3 + 1e-9 for r in group["rows"])


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def test_leaderboard_page_in_headless_chromium(stack, finished_jobs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with stack.client() as c:
        rows = c.get("/api/leaderboard").json()["groups"][0]["rows"]
    ARTIFACTS.mkdir(exist_ok=True)
    driver = _browser()
    try:
        driver.get(f"{stack.url}/leaderboard#key={stack.keys['alice']}")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.board tbody tr"))
        table_rows = driver.find_elements(By.CSS_SELECTOR, "table.board tbody tr")
        assert len(table_rows) == len(rows)
        text_ = driver.find_element(By.CSS_SELECTOR, "table.board").text
        assert "sqnr" in text_ and "imprinting" in text_
        points = driver.find_elements(By.CSS_SELECTOR, "svg.chart .point")
        assert len(points) == len(rows)
        assert driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline.front")
        # Sorting by weight bytes puts the smallest first.
        driver.find_element(By.CSS_SELECTOR, 'th[data-key="weight_bytes"]').click()
        driver.find_element(By.CSS_SELECTOR, 'th[data-key="weight_bytes"]').click()
        first = driver.find_element(By.CSS_SELECTOR, "table.board tbody tr td:nth-child(5)").text
        assert int(first.replace(",", "")) == min(r["weight_bytes"] for r in rows)
        driver.save_screenshot(str(ARTIFACTS / "leaderboard.png"))

        job = finished_jobs["sqnr"]
        driver.get(f"{stack.url}/leaderboard/jobs/{job['id']}")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bits-chart rect.layer-bar"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#bits-chart rect.layer-bar")) == 22  # ResNet-20's layers
        driver.save_screenshot(str(ARTIFACTS / "job.png"))
    finally:
        driver.quit()
    assert (ARTIFACTS / "leaderboard.png").stat().st_size > 10_000


def test_bad_requests_get_clear_4xx_and_store_nothing(stack, tmp_path):
    models_dir = stack.var_dir / "artifacts" / "models"
    before = sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []

    r = submit(stack, "genetic", {"avg_wbits": 3})
    assert r.status_code == 400 and "unknown method 'genetic'" in r.json()["detail"]
    r = submit(stack, "sqnr", "avg_wbits<3")
    assert r.status_code == 400 and "malformed budget" in r.json()["detail"]
    r = submit(stack, "sqnr", {"avg_wbits": -1})
    assert r.status_code == 400 and "avg_wbits" in r.json()["detail"]
    r = submit(stack, "sqnr", {"avg_wbits": 1.5})
    assert r.status_code == 422 and "smallest feasible value is 2" in r.json()["detail"]
    r = submit(stack, "sqnr", {"avg_wbits": 3}, {"w_bits": "many"})
    assert r.status_code == 400 and "w_bits" in r.json()["detail"]

    not_zip = tmp_path / "model.pt2"
    not_zip.write_bytes(b"this is not a torch.export archive" * 10)
    r = submit(stack, "sqnr", {"avg_wbits": 3}, model=not_zip)
    assert r.status_code == 400 and "model.pt2" in r.json()["detail"], r.text

    big = tmp_path / "big.pt2"
    big.write_bytes(b"\0" * (5 * 2**20))  # over max_model_bytes (4 MiB), under the request limit
    r = submit(stack, "sqnr", {"avg_wbits": 3}, model=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    huge = tmp_path / "huge.pt2"
    huge.write_bytes(b"\0" * (13 * 2**20))  # over the whole-request limit
    r = submit(stack, "sqnr", {"avg_wbits": 3}, model=huge)
    assert r.status_code == 413

    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_dataset_file(LabelledSet(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)), wrong_shape)
    files = {"data": ("wrong_shape.safetensors", wrong_shape.read_bytes(), "application/octet-stream")}
    r = submit(stack, "sqnr", {"avg_wbits": 3}, data_name=None, files=files)
    assert r.status_code == 422 and "[3, 32, 32]" in r.json()["detail"] and "[1, 28, 28]" in r.json()["detail"]

    many_labels = tmp_path / "labels.safetensors"
    save_dataset_file(LabelledSet(torch.randn(8, 1, 28, 28), torch.arange(8) * 3), many_labels)
    files = {"data": ("labels.safetensors", many_labels.read_bytes(), "application/octet-stream")}
    r = submit(stack, "sqnr", {"avg_wbits": 3}, data_name=None, files=files)
    assert r.status_code == 422 and "labels up to 21" in r.json()["detail"]

    # An option the method does not take is a malformed request, like an unknown key.
    r = submit(stack, "sqnr", {"avg_wbits": 3}, {**FAST, "finetune": {"epochs": 1}})
    assert r.status_code == 400 and "'sqnr' does not fine-tune" in r.json()["detail"]
    r = submit(stack, "sqnr", {"avg_wbits": 3}, {**FAST, "params": {"sweeps": 3}})
    assert r.status_code == 400 and "unknown sqnr option(s) 'sweeps'" in r.json()["detail"]
    r = submit(stack, "imprinting", {"avg_wbits": 3}, {**FAST, "finetune": {"epochs": 40}})
    assert r.status_code == 422 and "2200000 training images" in r.json()["detail"]
    r = submit(stack, "haq", {"avg_wbits": 3}, {**FAST, "finetune": {"steps": 10**6}})
    assert r.status_code == 422 and "limit of 240000" in r.json()["detail"]
    unlabelled_train = tmp_path / "calib.safetensors"
    save_dataset_file(LabelledSet(torch.randn(8, 1, 28, 28), torch.arange(8)), unlabelled_train)
    files = {"data": ("calib.safetensors", unlabelled_train.read_bytes(), "application/octet-stream")}
    r = submit(stack, "imprinting", {"avg_wbits": 3}, {**FAST, "finetune": {"epochs": 1}}, data_name=None, files=files)
    assert r.status_code == 422 and "only the built-in data sets have one" in r.json()["detail"]

    after = sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []
    assert after == before  # nothing half-stored: no new model, no leftover temporary file
    with stack.client() as c:
        assert c.get("/jobs/nope").status_code == 404
        assert c.get("/candidates/999999/config").status_code == 404
        assert c.get("/jobs", params={"status": "sleeping"}).status_code == 400
        assert c.get("/health").json()["database"] == "ok"


def test_cancel_stops_a_running_search(stack):
    r = submit(stack, "haq", {"avg_wbits": 3}, {**FAST, "params": {"episodes": 400, "reward_samples": 128}})
    job_id = r.json()["id"]
    deadline = time.time() + 300
    with stack.client() as c:
        while c.get(f"/jobs/{job_id}").json()["progress"]["step"] < 2:
            assert time.time() < deadline
            time.sleep(0.5)
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 200
        job = stack.wait_job(job_id, timeout=120)
        assert job["status"] == "cancelled" and job["error"] == "cancelled by request"
        assert job["progress"]["step"] < 400
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 409


def test_killed_worker_leaves_no_stuck_job_and_no_duplicates(stack):
    r = submit(stack, "haq", {"avg_wbits": 3}, {**FAST, "params": {"episodes": 40, "reward_samples": 128}})
    job_id = r.json()["id"]
    deadline = time.time() + 300
    with stack.client() as c:
        while True:
            job = c.get(f"/jobs/{job_id}").json()
            if job["status"] == "running" and job["candidates"] >= 2:
                break
            assert time.time() < deadline and job["status"] in ("queued", "running"), job
            time.sleep(0.3)
    stack.kill_worker(stack.workers[0])
    stack.start_worker()
    job = stack.wait_job(job_id, timeout=600)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    rows = db_rows(stack, "SELECT seq, config FROM candidates WHERE job_id = :j", j=job_id)
    seqs = [r[0] for r in rows]
    assert len(seqs) == len(set(seqs)) == job["candidates"] > 0
    configs = [json.dumps(r[1], sort_keys=True) for r in rows]
    assert len(configs) == len(set(configs))


def test_health_reports_database_broker_and_workers(stack):
    with stack.client() as c:
        h = c.get("/health").json()
        assert h["database"] == "ok" and h["broker"] == "ok" and h["workers"] and h["status"] == "ok"
        schema = c.get("/openapi.json").json()
    for path in (
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/candidates",
        "/candidates/{candidate_id}",
        "/candidates/{candidate_id}/config",
        "/candidates/{candidate_id}/packed",
        "/candidates/{candidate_id}/export",
        "/jobs/{job_id}/cancel",
        "/health",
        "/leaderboard",
        "/api/leaderboard",
    ):
        assert path in schema["paths"], path


def test_one_spec_gives_the_same_configs_through_the_cli_and_the_service(stack, tiny_model_path):
    """The service and the CLI build the same JobSpec and load data with the same function: with a non-zero seed
    (which picks the calibration images) they find the same configs with the same scores."""
    import subprocess
    import sys

    options = {"seed": 7, "calib_size": 128, "val_samples": 300, "params": {"sweep_points": 2, "relinearize": 0}}
    r = submit(stack, "sqnr", {"avg_wbits": 4}, {**options, "validate_top_k": 0}, model=tiny_model_path)
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    with stack.client() as c:
        served = c.get(f"/jobs/{job['id']}/candidates").json()
    cli = subprocess.run(
        [
            str(Path(sys.executable).parent / "bitsearch"),
            "search",
            str(tiny_model_path),
            "--data",
            "fashion-mnist",
            "--method",
            "sqnr",
            "--budget",
            "avg_wbits=4",
            "--seed",
            "7",
            "--calib-size",
            "128",
            "--val-samples",
            "300",
            "--params",
            json.dumps(options["params"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    local = json.loads(cli.stdout)["candidates"]
    with stack.client() as c:
        served_bits = [c.get(f"/candidates/{s['id']}").json()["w_bits"] for s in served]
    assert [c["w_bits"] for c in local] == served_bits
    assert [c["val_top1"] for c in local] == pytest.approx([s["val_top1"] for s in served], abs=1e-9)


def test_validations_run_on_their_own_queue(tmp_path, tiny_model_path):
    """A worker that takes only searches never runs a validation, and one that takes only validations never runs
    a search: a search does not wait behind validations on the kernels."""
    s = Stack(tmp_path / "queues", backend="postgres", heartbeat_s=1, validate_samples=300)
    s.start(workers=0)
    try:
        s.start_worker("search")
        s.start_worker("validate")
        s.wait_ready()
        r = submit(
            s,
            "uniform",
            {"avg_wbits": 8},
            {"calib_size": 128, "val_samples": 200, "validate_top_k": 1},
            model=tiny_model_path,
        )
        assert r.status_code == 202, r.text
        assert s.wait_job(r.json()["id"], timeout=300)["status"] == "succeeded"
        deadline = time.time() + 300
        with s.client() as c:
            while time.time() < deadline:
                cands = c.get(f"/jobs/{r.json()['id']}/candidates").json()
                states = [c_["validation"]["status"] for c_ in cands if c_["validation"]]
                if states and all(st in ("succeeded", "failed") for st in states):
                    break
                time.sleep(1)
        assert states == ["succeeded"], cands
        search_log, validate_log = ((s.logs / f"worker{i}.log").read_text() for i in (0, 1))
        # Celery logs "Task <name>[<id>] received" for each task a worker takes (its banner lists every task).
        assert "run_search[" in search_log and "validate_candidate[" not in search_log
        assert "validate_candidate[" in validate_log and "run_search[" not in validate_log
    finally:
        s.stop()
