"""The API's side of the security review, on the real stack (uvicorn on PostgreSQL; no worker runs a job here):
uploads analysed in a limited child process, the per-owner job limit under concurrency, keys checked before a
body is read, concurrent uploads of one file, nothing stored by a refused request, and what the API lets leak."""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import create_engine, text

from tests.conftest import TinyNet, export_model
from tests.stack import ROOT, Stack

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
QUICK = {"val_samples": 200, "calib_size": 128, "validate_top_k": 0}
FAILED_AUTH_BURST = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("apisec"),
        backend="postgres",
        max_active_jobs=4,
        auth_failures_burst=FAILED_AUTH_BURST,
        auth_failures_per_s=0.2,
    )
    s.start(workers=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[Path]:
    """Five small, distinct models (different seeds, so different sha256)."""
    out = tmp_path_factory.mktemp("tiny_models")
    paths = []
    for seed in range(5):
        torch.manual_seed(seed)
        paths.append(export_model(TinyNet(), out / f"tiny{seed}.pt2"))
    return paths


def form(method="uniform", budget=None, options=None, **extra) -> dict:
    return {
        "method": method,
        "budget": json.dumps(budget or {"avg_wbits": 4}),
        "options": json.dumps(options or QUICK),
        **extra,
    }


def upload(path: Path) -> dict:
    return {"model": (path.name, path.read_bytes(), "application/zip")}


def post(client: httpx.Client, model: Path | None = None, **fields) -> httpx.Response:
    fields.setdefault("data_name", "fashion-mnist")
    return client.post("/jobs", data=form(**fields), files=upload(model) if model is not None else None)


def sql(stack: Stack, query: str, **params):
    engine = create_engine(stack.database_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query), params)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def clear_jobs(stack: Stack) -> None:
    """Every job of every owner finished: each test starts under the active-job limit."""
    sql(stack, "UPDATE jobs SET status = 'cancelled' WHERE status IN ('queued', 'running')")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- (2) analysis in a child process --------------------------------------------------------------------------------


def test_analysis_child_reports_the_model_and_is_killed_at_its_time_limit():
    """The child's JSON, rebuilt in the API, prices configs exactly as the loaded model does; an analysis over the
    time limit is killed and named."""
    from api.analysis import AnalysisFailed, analyse
    from api.services.errors import CannotRun
    from api.services.uploads import ModelSummary
    from search.cost import cost_of
    from search.model import load_model
    from store.settings import Settings

    result = analyse("model", RESNET, Settings(upload_analysis_time_s=60))
    model = load_model(RESNET)
    summary = ModelSummary(result.stored(), result.total_params)
    assert result.input_shape == [1, 28, 28] and result.num_outputs == 10
    assert result.total_params == model.total_params and len(summary.layers) == len(model.layers) == 22
    for w, a in ((2, 8), (4, 4), (8, 16)):
        bits_w = {l.name: w for l in model.layers}
        bits_a = {l.name: a for l in model.layers}
        assert cost_of(summary, bits_w, bits_a) == cost_of(model, bits_w, bits_a)

    with pytest.raises(AnalysisFailed) as e:
        analyse("model", RESNET, Settings(upload_analysis_time_s=0.05))
    assert e.value.kind is CannotRun and "time limit of 0.05 s" in e.value.message


def test_an_analysis_over_the_memory_limit_gets_413_and_the_api_stays_up(tmp_path):
    # 200 MB of address space is less than a child with torch loaded already has: every allocation fails.
    s = Stack(tmp_path / "mem", backend="postgres", upload_analysis_memory_mb=200)
    s.start(workers=0)
    try:
        with s.client() as c:
            r = post(c, RESNET)
            assert r.status_code == 413, r.text
            assert "more memory than this server's limit of 200 MB" in r.json()["detail"], r.text
            assert c.get("/health").json()["database"] == "ok"
            r = post(c, RESNET)  # and again: the API process is untouched
            assert r.status_code == 413, r.text
        assert s.api.poll() is None
        assert sql(s, "SELECT count(*) FROM models")[0][0] == 0
        assert not list((s.var_dir / "artifacts" / "models").glob("*"))
    finally:
        s.stop()


# -- (3) the per-owner active-job limit ----------------------------------------------------------------------------


def _race_for_slots(stack: Stack) -> None:
    with stack.client() as c:
        first = post(c, RESNET)
        assert first.status_code == 202, first.text
        model_id = first.json()["model_id"]
    barrier = threading.Barrier(20)

    def submit(_):
        with stack.client() as c:
            barrier.wait()
            return post(c, model_id=model_id)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(submit, range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * 3 + [429] * 17, [r.text for r in responses if r.status_code not in (202, 429)]
    assert all("limit per owner" in r.json()["detail"] for r in responses if r.status_code == 429)
    active = sql(stack, "SELECT count(*) FROM jobs WHERE owner = 'alice' AND status IN ('queued', 'running')")
    assert active[0][0] == 4

    # At the limit, a request that is wrong anyway hears what is wrong with it, not the quota.
    with stack.client() as c:
        r = post(c, model_id=model_id, budget={"avg_wbits": 1.5})
        assert r.status_code == 422 and "smallest feasible value is 2" in r.json()["detail"], r.text
        r = post(c, model_id=model_id)
        assert r.status_code == 429, r.text


def test_the_active_job_limit_holds_under_concurrent_submissions(stack):
    clear_jobs(stack)
    _race_for_slots(stack)


def test_the_active_job_limit_holds_on_sqlite(tmp_path):
    s = Stack(tmp_path / "lite", backend="sqlite", max_active_jobs=4)
    s.start(workers=0)
    try:
        _race_for_slots(s)
    finally:
        s.stop()


# -- (5) concurrent uploads ----------------------------------------------------------------------------------------


def test_concurrent_uploads_store_one_row_per_file(stack, tiny_models):
    clear_jobs(stack)
    same, others = tiny_models[0], tiny_models[1:5]
    # Alice and Bob two each of the same file and of the others: under the limit of 4 active jobs per owner.
    work = [
        ("alice", same),
        ("alice", same),
        ("bob", same),
        ("bob", same),
        ("alice", others[0]),
        ("alice", others[1]),
        ("bob", others[2]),
        ("bob", others[3]),
    ]
    barrier = threading.Barrier(len(work))

    def submit(item):
        owner, path = item
        with stack.client(owner) as c:
            barrier.wait()
            return post(c, path)

    with ThreadPoolExecutor(len(work)) as pool:
        responses = list(pool.map(submit, work))
    assert [r.status_code for r in responses] == [202] * 8, [r.text for r in responses]
    shas = {sha256(p) for p in tiny_models[:5]}
    assert {r.json()["model_id"] for r in responses} == shas
    rows = [r for r in sql(stack, "SELECT id FROM models") if r[0] in shas]
    assert sorted(r[0] for r in rows) == sorted(shas)  # one row each
    owned = [r for r in sql(stack, "SELECT owner, object_id FROM ownerships WHERE kind = 'model'") if r[1] in shas]
    assert len(owned) == len(set(owned)) == 6  # alice: same + 2 others, bob: same + 2 others
    for sha in shas:
        assert (stack.var_dir / "artifacts" / "models" / sha).is_file()
    assert not list((stack.var_dir / "artifacts").rglob(".incoming-*"))


# -- (7) nothing stored by a refused request ------------------------------------------------------------------------


def test_a_refused_request_leaves_no_file_and_no_row(stack, tmp_path):
    from search.data import LabelledSet, save_dataset_file

    clear_jobs(stack)
    torch.manual_seed(1234)
    model = export_model(TinyNet(), tmp_path / "new.pt2")
    wrong = tmp_path / "wrong_shape.safetensors"
    save_dataset_file(LabelledSet(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)), wrong)
    with stack.client() as c:
        r = c.post(
            "/jobs",
            data=form(),
            files={**upload(model), "data": (wrong.name, wrong.read_bytes(), "application/octet-stream")},
        )
    assert r.status_code == 422 and "[3, 32, 32]" in r.json()["detail"], r.text
    model_sha, data_sha = sha256(model), sha256(wrong)
    assert not (stack.var_dir / "artifacts" / "models" / model_sha).exists()
    assert not (stack.var_dir / "artifacts" / "datasets" / data_sha).exists()
    assert not list((stack.var_dir / "artifacts").rglob(".incoming-*"))
    assert sql(stack, "SELECT count(*) FROM models WHERE id = :i", i=model_sha)[0][0] == 0
    assert sql(stack, "SELECT count(*) FROM datasets WHERE id = :i", i=data_sha)[0][0] == 0
    assert sql(stack, "SELECT count(*) FROM ownerships WHERE object_id IN (:m, :d)", m=model_sha, d=data_sha)[0][0] == 0


# -- (8) what leaks ---------------------------------------------------------------------------------------------------


def test_an_unknown_op_gets_a_one_line_400_without_server_paths(stack, tmp_path):
    @torch.library.custom_op("bitsearch_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    class UsesCustomOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(torch.ops.bitsearch_test.double(x).flatten(1))

    path = export_model(UsesCustomOp(), tmp_path / "custom.pt2")
    with stack.client() as c:
        r = post(c, path)
    detail = r.json()["detail"]
    assert r.status_code == 400 and "bitsearch_test.double" in detail, r.text
    assert (
        "\n" not in detail and "Traceback" not in detail and str(ROOT) not in detail and "site-packages" not in detail
    )
    assert len(detail) <= 600


def test_a_server_error_is_generic_and_logged_with_its_request_id(stack):
    clear_jobs(stack)
    with stack.client() as c:
        job_id = post(c, RESNET).json()["id"]
        sql(stack, "ALTER TABLE candidates RENAME TO candidates_hidden")
        try:
            r = c.get(f"/jobs/{job_id}/candidates")
        finally:
            sql(stack, "ALTER TABLE candidates_hidden RENAME TO candidates")
        assert c.get(f"/jobs/{job_id}/candidates").status_code == 200
    assert r.status_code == 500
    body = r.json()
    rid = body["request_id"]
    assert r.headers["x-request-id"] == rid and rid in body["detail"]
    assert "candidates" not in r.text and "Error" not in r.text and "SELECT" not in r.text
    log = (stack.logs / "api.log").read_text()
    line = next(l for l in log.splitlines() if rid in l)
    assert "failed" in line
    after = log[log.index(line) :]
    assert "UndefinedTable" in after[:20000]  # the details are in the log, under the id
    assert log.count(f"request {rid}") == 1  # logged once


def test_job_error_details_are_shown_to_the_owner_only(stack):
    from store.models import CandidateRecord, ValidationRecord

    clear_jobs(stack)
    secret = "internal error: KeyError: '/srv/bitsearch/worker/jobs.py' weights"
    with stack.client("alice") as alice:
        job_id = post(alice, RESNET).json()["id"]
    sql(stack, "UPDATE jobs SET status = 'failed', error = :e, public = true WHERE id = :j", e=secret, j=job_id)
    engine = create_engine(stack.database_url)
    from sqlalchemy.orm import Session

    with Session(engine) as db:
        cand = CandidateRecord(
            job_id=job_id,
            seq=0,
            config={"layers": {}},
            avg_wbits=4.0,
            weight_bytes=1,
            bitops=1,
            act_bytes=1,
            score=0.0,
            pareto=True,
        )
        cand.validation = ValidationRecord(status="failed", error=secret)
        db.add(cand)
        db.commit()
        cand_id = cand.id
    engine.dispose()
    time.sleep(0.6)  # past the job view cache
    with stack.client("alice") as alice, stack.client("bob") as bob, stack.client(None) as anon:
        assert alice.get(f"/jobs/{job_id}").json()["error"] == secret
        assert alice.get(f"/candidates/{cand_id}").json()["validation"]["error"] == secret
        assert alice.get(f"/jobs/{job_id}/candidates").json()[0]["validation"]["error"] == secret
        for other in (bob, anon):
            job = other.get(f"/jobs/{job_id}").json()
            assert job["status"] == "failed" and job["error"] == "failed", job
            assert other.get(f"/candidates/{cand_id}").json()["validation"]["error"] == "failed"
            assert other.get(f"/jobs/{job_id}/candidates").json()[0]["validation"]["error"] == "failed"
            assert "KeyError" not in other.get(f"/jobs/{job_id}").text


def test_no_key_reaches_a_log_line(stack):
    keys = [stack.keys["alice"], stack.keys["bob"]]
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        assert c.get("/leaderboard", params={"key": keys[0]}).status_code == 200  # an old link
        assert c.get("/api/leaderboard", params={"key": keys[1]}).status_code == 200
        assert c.get("/jobs", headers={"X-API-Key": keys[0]}).status_code == 200
        assert c.get("/nope", params={"api_key": keys[1]}).status_code == 404
    page = httpx.get(f"{stack.url}/static/common.js").text
    assert "location.hash" in page and 'get("key")' in page
    time.sleep(0.5)
    log = (stack.logs / "api.log").read_text()
    assert "GET /leaderboard?key=bsk_<redacted>" in log
    assert not any(k in log for k in keys)
    assert not any(k[4:] in log for k in keys)


def test_the_pages_take_the_key_from_the_fragment(stack):
    """The pages read the key from a #key= fragment (never sent to the server), keep it in this browser and send
    it in a header: a private job's page shows the job once the key was given, and no URL shows the key."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from store.models import JobStatus
    from tests.test_service import _browser

    JOB_STATES = {s.value for s in JobStatus}

    clear_jobs(stack)
    with stack.client("alice") as alice:
        job_id = post(alice, RESNET).json()["id"]
    driver = _browser()
    try:
        driver.get(f"{stack.url}/leaderboard/jobs/{job_id}")
        # Anonymous: a private job is not shown; the page asks for a key instead.
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "need-key"))
        assert "not public" in driver.find_element(By.ID, "need-key").text
        driver.get(f"{stack.url}/leaderboard#key={stack.keys['alice']}")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "key-forget"))
        assert "key" not in driver.current_url.split("/leaderboard", 1)[1]
        assert driver.execute_script("return localStorage.getItem('bitsearch-key')") == stack.keys["alice"]
        driver.get(f"{stack.url}/leaderboard/jobs/{job_id}")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text in JOB_STATES)
        driver.find_element(By.ID, "key-forget").click()  # the key box forgets it again
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "key-input"))
        assert driver.execute_script("return localStorage.getItem('bitsearch-key')") is None
    finally:
        driver.quit()
    assert stack.keys["alice"] not in (stack.logs / "api.log").read_text()


# -- (4) keys before bodies -------------------------------------------------------------------------------------------


def _post_head_then_wait(stack: Stack, headers: dict[str, str], declared: int, sent: int) -> tuple[bytes, float]:
    """Send a POST's headers and `sent` of `declared` body bytes, then wait for an answer without sending more."""
    host, port = "127.0.0.1", stack.port
    head = [
        "POST /jobs HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: multipart/form-data; boundary=xyz",
        f"Content-Length: {declared}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.sendall(b"--xyz\r\n" + b"x" * (sent - 7))
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            pass
    return answer, time.monotonic() - started


def test_a_body_without_a_valid_key_is_not_read(stack):
    declared = 50 * 2**20
    for headers in ({}, {"Authorization": "Bearer bsk_" + secrets.token_urlsafe(32)}):
        answer, seconds = _post_head_then_wait(stack, headers, declared, sent=64 * 1024)
        # Answered while 50 MB were still owed: the server did not wait for (or read) the body.
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert seconds < 10
    # A valid key gets as far as the body: the server waits for it (no answer until it comes or times out).
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.keys['alice']}\r\n"
                f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {declared}\r\n\r\n"
            ).encode()
            + b"--xyz\r\n"
        )
        sock.settimeout(1.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)

    # The same through an ordinary client streaming a generator: a quick 401, far from the whole body sent.
    sent = 0

    def body():
        nonlocal sent
        chunk = b"y" * (1 << 20)
        for _ in range(50):
            sent += len(chunk)
            yield chunk

    started = time.monotonic()
    try:
        r = httpx.post(
            f"{stack.url}/jobs",
            content=body(),
            timeout=30,
            headers={"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": str(declared)},
        )
        status = r.status_code
    except httpx.HTTPError:  # the server closed the connection while the client was still sending
        status = None
    assert status in (401, None) and time.monotonic() - started < 10
    assert sent < declared


def test_invalid_keys_are_rate_limited_per_address(stack):
    with stack.client("bob") as bob:
        assert bob.get("/jobs").status_code == 200
    codes = []
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for _ in range(50):
            codes.append(
                c.get("/jobs", headers={"Authorization": "Bearer bsk_" + secrets.token_urlsafe(32)}).status_code
            )
        last = c.get("/jobs", headers={"X-API-Key": "bsk_nope"})
    assert set(codes) == {401, 429}, codes
    assert codes.count(401) <= FAILED_AUTH_BURST and codes[-1] == 429
    assert "invalid API key" in last.json()["detail"] and int(last.headers["retry-after"]) >= 1
    with stack.client("bob") as bob:  # a key known (and cached) to be valid, from the same address, still works
        assert bob.get("/jobs").status_code == 200
