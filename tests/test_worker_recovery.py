"""The worker's recovery paths on a real database (SQLite through store/db.py) with real models and searches:
fenced job claims, validation claims, the packed-model replacement under crashes, and what a failure shows."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from store.db import engine_for, migrate, session_scope
from store.models import CandidateRecord, DatasetRecord, Job, ModelRecord, ValidationRecord
from store.settings import Settings
from tests.stack import _pg_admin
from worker import jobs

ROOT = Path(__file__).resolve().parent.parent
INTERNAL = re.compile(r"^internal error \(ref ([0-9a-f]{6})\); the operator's worker log has the details$")
FAST = {"val_samples": 200, "calib_size": 128}


def make_settings(var_dir: Path, **overrides) -> Settings:
    # No heartbeat thread beats during a test unless asked: the tests decide when a heartbeat is stale.
    return Settings(**{"var_dir": var_dir, "heartbeat_s": 3600, "stale_after_s": 60, **overrides})


def like(settings: Settings, **overrides) -> Settings:
    """The same database and artifact store with other limits."""
    return make_settings(settings.var_dir, database_url=settings.database_url, **overrides)


def stale(settings: Settings) -> Settings:
    """Settings under which every heartbeat and lease is stale, even one written a moment ago: what a reaper or
    a redelivery sees when the worker holding a job has been paused for longer than stale_after_s."""
    return like(settings, stale_after_s=-3600)


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, tmp_path) -> Settings:
    """A migrated database: the embedded SQLite file, or a fresh PostgreSQL database (row locks, timestamptz)."""
    database_url = ""
    if request.param == "postgres":
        name = f"bitsearch_test_{uuid.uuid4().hex[:10]}"
        _pg_admin(f'CREATE DATABASE "{name}"')
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    s = make_settings(tmp_path / "var", database_url=database_url)
    s.var_dir.mkdir(parents=True)
    migrate(s.resolved_database_url())
    yield s
    if database_url:
        engine_for(database_url).dispose()
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    s = make_settings(tmp_path / "var")
    s.var_dir.mkdir(parents=True)
    migrate(s.resolved_database_url())
    return s


def url(settings: Settings) -> str:
    return settings.resolved_database_url()


def add_model(settings: Settings, path: Path) -> str:
    """Store a .pt2 archive as the API would: content-addressed in the artifact store, with its rows."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    target = settings.resolved_artifact_dir() / "models" / sha
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    with session_scope(url(settings)) as s:
        s.merge(
            ModelRecord(
                id=sha,
                filename=path.name,
                size_bytes=len(data),
                num_layers=6,
                total_params=0,
                input_shape=[1, 28, 28],
                num_outputs=10,
            )
        )
        s.merge(
            DatasetRecord(
                id="fashion-mnist",
                name="fashion-mnist",
                builtin=True,
                num_samples=70000,
                sample_shape=[1, 28, 28],
                num_classes=10,
            )
        )
    return sha


def add_job(settings: Settings, model_id: str, method: str = "uniform", budget=None, options=None) -> str:
    with session_scope(url(settings)) as s:
        job = Job(
            model_id=model_id,
            dataset_id="fashion-mnist",
            method=method,
            budget=budget or {"avg_wbits": 4},
            options={**FAST, **(options or {})},
            validate_top_k=0,
        )
        s.add(job)
        s.flush()
        return job.id


def job_row(settings: Settings, job_id: str) -> dict:
    with session_scope(url(settings)) as s:
        j = s.get(Job, job_id)
        return {
            k: getattr(j, k)
            for k in (
                "status",
                "worker",
                "attempts",
                "step",
                "total",
                "phase",
                "error",
                "heartbeat_at",
                "finished_at",
                "best_val_top1",
            )
        }


def candidate_seqs(settings: Settings, job_id: str) -> list[int]:
    with session_scope(url(settings)) as s:
        return sorted(s.scalars(select(CandidateRecord.seq).where(CandidateRecord.job_id == job_id)))


@pytest.fixture(scope="module")
def search_result(tiny_model, fmnist):
    """Real candidates of the tiny CNN (uniform 2..8 bits), as a search hands them to the worker."""
    from search.cost import Budget
    from search.searches import SearchOptions, run_search

    return run_search("uniform", tiny_model, fmnist, Budget(avg_wbits=4), SearchOptions(val_samples=200))


# -- item: a requeued job's old worker stops writing ---------------------------------------------------------


def test_a_lost_claim_fences_every_write_of_the_old_attempt(settings, tiny_model_path, search_result):
    from search.searches.base import Progress

    jid = add_job(settings, add_model(settings, tiny_model_path))
    u = url(settings)
    cand = search_result.candidates[0]
    old = jobs.claim_job(settings, jid, "worker-a")
    assert old == jobs.Claim(jid, "worker-a", 1)
    jobs.store_candidate(u, old, 0, cand)
    jobs.store_progress(u, old, Progress(1, 7, "uniform", cand))
    assert candidate_seqs(settings, jid) == [0] and job_row(settings, jid)["step"] == 1

    # The reaper finds the heartbeat stale (here: any heartbeat is) and requeues the job.
    requeued, _ = jobs.requeue_orphans(stale(settings))
    assert requeued == [jid]
    before = job_row(settings, jid)
    assert before["status"] == "queued" and before["worker"] is None

    def every_old_write():
        """Each write the old attempt's run makes; each must refuse and leave everything as it was."""
        with pytest.raises(jobs.JobLost):
            jobs.store_candidate(u, old, 1, search_result.candidates[1])
        with pytest.raises(jobs.JobLost):
            jobs.store_progress(u, old, Progress(2, 7, "uniform", cand))
        with pytest.raises(jobs.JobLost):
            jobs.set_phase(u, old, "still here")
        hb = jobs.Heartbeat(settings, old)
        hb.beat()
        with pytest.raises(jobs.JobLost):
            hb.check()  # what on_progress / on_candidate call at the next step
        with pytest.raises(jobs.JobLost):
            jobs.finish_job(u, old, "succeeded", None, flags={0: (True, True)}, phase="done")
        with pytest.raises(jobs.JobLost):
            jobs.finish_job(u, old, "failed", "the old attempt's failure")

    every_old_write()
    assert job_row(settings, jid) == before and candidate_seqs(settings, jid) == [0]

    # Another claim, by a worker with the same name even: the attempt number alone fences the old run.
    new = jobs.claim_job(settings, jid, "worker-a")
    assert new == jobs.Claim(jid, "worker-a", 2)
    claimed = job_row(settings, jid)
    assert claimed["status"] == "running" and candidate_seqs(settings, jid) == []
    every_old_write()
    assert job_row(settings, jid) == claimed and candidate_seqs(settings, jid) == []

    # The current attempt writes normally.
    jobs.store_candidate(u, new, 0, cand)
    jobs.finish_job(u, new, "succeeded", None, flags={0: (True, True)}, phase="done")
    row = job_row(settings, jid)
    assert row["status"] == "succeeded" and row["attempts"] == 2 and candidate_seqs(settings, jid) == [0]
    with session_scope(u) as s:
        assert s.scalar(select(CandidateRecord.recommended).where(CandidateRecord.job_id == jid)) is True


def test_a_requeued_run_stops_at_its_next_step_without_touching_the_job(settings, tiny_model_path, caplog):
    # A random search with far more candidates than the test waits for: it would run for minutes.
    jid = add_job(
        settings,
        add_model(settings, tiny_model_path),
        method="random",
        budget={"avg_wbits": 5},
        options={"params": {"count": 5000}},
    )
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("status", jobs.run_job(settings, jid)))
    with caplog.at_level(logging.WARNING, logger="bitsearch.worker"):
        runner.start()
        try:
            deadline = time.time() + 120
            while not candidate_seqs(settings, jid):
                assert runner.is_alive() and time.time() < deadline, job_row(settings, jid)
                time.sleep(0.05)
            assert jobs.requeue_orphans(stale(settings))[0] == [jid]
            assert jobs.claim_job(settings, jid, "worker-b") == jobs.Claim(jid, "worker-b", 2)
            claimed = job_row(settings, jid)
        finally:
            runner.join(timeout=30)
            stopped = not runner.is_alive()
            if not stopped:  # whatever failed above, the run must not outlive the test's database
                jobs.requeue_orphans(stale(settings))
                runner.join(timeout=30)
    assert stopped, "the old run kept going after its job was taken"
    assert outcome["status"] == "lost"
    # The second attempt's state is exactly what its claim left: no candidate, progress or finish of the first.
    assert job_row(settings, jid) == claimed
    assert claimed["status"] == "running" and claimed["worker"] == "worker-b" and claimed["step"] == 0
    assert candidate_seqs(settings, jid) == []
    assert any("no longer held" in r.getMessage() or "taken from" in r.getMessage() for r in caplog.records)


# -- item: a validation runs once ------------------------------------------------------------------------------


def add_validation(settings: Settings, model_path: Path, search_result) -> int:
    """A finished job's recommended candidate with a queued validation, as queue_validations leaves it."""
    jid = add_job(settings, add_model(settings, model_path))
    claim = jobs.claim_job(settings, jid, "searcher")
    u = url(settings)
    cand = search_result.recommended
    jobs.store_candidate(u, claim, 0, cand)
    jobs.finish_job(u, claim, "succeeded", None, flags={0: (True, True)}, phase="done")
    with session_scope(u) as s:
        cid = s.scalar(select(CandidateRecord.id).where(CandidateRecord.job_id == jid))
        s.add(ValidationRecord(candidate_id=cid, status="queued"))
    return cid


def validation_row(settings: Settings, cid: int) -> dict:
    with session_scope(url(settings)) as s:
        v = s.scalar(select(ValidationRecord).where(ValidationRecord.candidate_id == cid))
        return {k: getattr(v, k) for k in ("status", "error", "packed_path", "updated_at", "top1", "attempts")}


def packed_dir(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"packed-{tag}"
    d.mkdir()
    (d / "model.pt2").write_bytes(tag.encode() * 1000)
    (d / "config.json").write_text(json.dumps({"tag": tag}))
    return d


def test_a_validation_is_claimed_once_and_a_stale_one_is_taken_over(settings, tiny_model_path, search_result, tmp_path):
    cid = add_validation(settings, tiny_model_path, search_result)
    first = jobs.claim_validation(settings, cid)
    assert first is not None
    running = validation_row(settings, cid)
    assert running["status"] == "running"

    # A second delivery of the task while the first runs does nothing at all.
    assert jobs.run_validation(settings, cid) == "skipped"
    assert jobs.claim_validation(settings, cid) is None
    assert validation_row(settings, cid) == running
    first.update()  # the first worker's heartbeat still holds
    renewed = validation_row(settings, cid)
    assert renewed["updated_at"] != running["updated_at"]

    # Its worker stops renewing; after stale_after_s another delivery takes the validation over ...
    paused = stale(settings)
    second = jobs.claim_validation(paused, cid)
    assert second is not None
    taken = validation_row(settings, cid)
    # ... and the first worker, if it was only paused, can neither renew, nor fail, nor publish anything.
    with pytest.raises(jobs.ValidationLost):
        first.update()
    with pytest.raises(jobs.ValidationLost):
        first.update(status="failed", error="late failure")
    with pytest.raises(jobs.ValidationLost):
        jobs.publish_packed(settings, first, packed_dir(tmp_path, "late"))
    assert validation_row(settings, cid) == taken
    assert list((settings.resolved_artifact_dir() / "packed").iterdir()) == []  # its late copy is gone too

    # The reaper requeues a running validation whose lease went stale, which also fences its holder.
    assert jobs.requeue_orphans(paused)[1] == [cid]
    assert validation_row(settings, cid)["status"] == "queued"
    with pytest.raises(jobs.ValidationLost):
        jobs.publish_packed(settings, second, packed_dir(tmp_path, "second"))
    third = jobs.claim_validation(settings, cid)
    path = jobs.publish_packed(settings, third, packed_dir(tmp_path, "third"), top1=0.5)
    done = validation_row(settings, cid)
    assert done["status"] == "succeeded" and done["packed_path"] == str(path)
    assert json.loads((path / "config.json").read_text()) == {"tag": "third"}
    # A finished validation is never run again, however often its message comes back.
    assert jobs.claim_validation(paused, cid) is None
    assert jobs.run_validation(paused, cid) == "skipped"
    assert validation_row(settings, cid) == done


def test_a_validation_that_keeps_losing_its_worker_is_failed_not_requeued_forever(
    settings, tiny_model_path, search_result
):
    cid = add_validation(settings, tiny_model_path, search_result)
    paused = stale(settings)
    for attempt in range(1, settings.max_attempts + 1):
        assert jobs.claim_validation(paused, cid) is not None  # its worker dies: the lease goes stale
        assert validation_row(settings, cid)["attempts"] == attempt
        requeued = jobs.requeue_orphans(paused)[1]
        assert requeued == ([cid] if attempt < settings.max_attempts else []), attempt
    row = validation_row(settings, cid)
    assert row["status"] == "failed" and f"interrupted {settings.max_attempts} times" in row["error"]
    assert jobs.claim_validation(paused, cid) is None


def test_a_validation_runs_on_the_kernels_and_publishes_its_packed_model(settings, tiny_model_path, search_result):
    from kernels.lower import load_packed
    from search.data import fashion_mnist_splits

    s = like(settings, validate_samples=200, heartbeat_s=0.2)
    cid = add_validation(s, tiny_model_path, search_result)
    assert jobs.run_validation(s, cid) == "succeeded"
    row = validation_row(s, cid)
    assert row["status"] == "succeeded" and row["error"] is None and 0.5 < row["top1"] <= 1
    packed = Path(row["packed_path"])
    assert packed.parent == s.resolved_artifact_dir() / "packed"
    assert sorted(p.name for p in packed.iterdir()) == ["config.json", "model.onnx", "model.pt2"]
    assert [p.name for p in packed.parent.iterdir()] == [packed.name]  # no staging or older version left
    logits = load_packed(packed)(fashion_mnist_splits(calib_size=128).test.inputs[:8])
    assert logits.shape == (8, 10)
    assert jobs.run_validation(s, cid) == "skipped"
    assert validation_row(s, cid) == row


# -- item: the packed-model replacement survives a crash anywhere -------------------------------------------

CRASH_DRIVER = r"""
import json, os, signal, sqlite3, sys
from pathlib import Path

var_dir, db, cid, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
targets = {os.path.realpath(p) for p in sys.argv[5:]}
from store.settings import Settings
from worker import jobs

settings = Settings(var_dir=var_dir, heartbeat_s=3600, stale_after_s=60)
expected = {p.name: p.read_bytes() for p in src.iterdir()}


def check(previous):
    # What a reader sees now: the row's packed_path must name one complete version, old or new.
    con = sqlite3.connect(db)
    (path,) = con.execute("SELECT packed_path FROM validations WHERE candidate_id = ?", (cid,)).fetchone()
    con.close()
    d = Path(path)
    files = {p.name: p.read_bytes() for p in d.iterdir()} if d.is_dir() else None
    return path, files in (previous, expected)


def run_child(k):
    lease = jobs.claim_validation(settings, cid)
    assert lease is not None
    seen = set()

    # Each line is a kill point the first time it runs: loops (the files of a version, the versions a prune
    # deletes, which grow with every crashed run) would otherwise multiply the runs without adding a new state.
    def local(frame, event, arg):
        if event == "line":
            seen.add((frame.f_code, frame.f_lineno))
            if len(seen) == k:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def tracer(frame, event, arg):
        return local if os.path.realpath(frame.f_code.co_filename) in targets else None

    sys.settrace(tracer)
    jobs.publish_packed(settings, lease, src)
    sys.settrace(None)


con = sqlite3.connect(db)
(path,) = con.execute("SELECT packed_path FROM validations WHERE candidate_id = ?", (cid,)).fetchone()
con.close()
previous = {p.name: p.read_bytes() for p in Path(path).iterdir()}
report = {"kills": 0, "bad": [], "completed": False}
for k in range(1, 2000):
    con = sqlite3.connect(db)
    con.execute("UPDATE validations SET status = 'queued' WHERE candidate_id = ?", (cid,))
    con.commit()
    con.close()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(k)
        except BaseException as e:
            print(f"child {k}: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    path, ok = check(previous)
    if not ok:
        report["bad"].append([k, path])
    if os.WIFSIGNALED(status):
        report["kills"] += 1
        continue
    report["completed"] = os.WEXITSTATUS(status) == 0
    report["exit"] = os.WEXITSTATUS(status)
    report["final"] = path
    break
print(json.dumps(report))
"""


def test_the_packed_model_survives_a_crash_at_every_line_of_its_replacement(
    sqlite_settings, tiny_model_path, search_result, tmp_path
):
    settings = sqlite_settings  # the driver reads the row with sqlite3 between crashes
    cid = add_validation(settings, tiny_model_path, search_result)
    # The state an earlier release left: a succeeded validation whose packed model sits at packed/candidate-N.
    legacy = settings.resolved_artifact_dir() / "packed" / f"candidate-{cid}"
    shutil.copytree(packed_dir(tmp_path, "old"), legacy)
    with session_scope(url(settings)) as s:
        s.execute(
            update(ValidationRecord)
            .where(ValidationRecord.candidate_id == cid)
            .values(status="succeeded", packed_path=str(legacy))
        )
    new = packed_dir(tmp_path, "new")
    db = str(settings.var_dir / "bitsearch.db")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASH_DRIVER,
            str(settings.var_dir),
            db,
            str(cid),
            str(new),
            str(ROOT / "worker" / "jobs.py"),
            str(ROOT / "store" / "artifacts.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # A SIGKILL before each line the replacement runs, in turn, then one run left to finish.
    assert report["kills"] > 20 and report["completed"], (report, out.stderr[-3000:])
    assert report["bad"] == [], report
    final = Path(report["final"])
    assert final != legacy and json.loads((final / "config.json").read_text()) == {"tag": "new"}
    # The finished run pruned the legacy directory, every crashed run's version and staging directory.
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_put_dir_never_touches_the_current_version(sqlite_settings, tmp_path):
    settings = sqlite_settings
    from store.artifacts import ArtifactStore

    store = ArtifactStore(settings.resolved_artifact_dir())
    first = store.put_dir("packed", "candidate-7", packed_dir(tmp_path, "one"))
    broken = packed_dir(tmp_path, "broken")
    (broken / "nested").mkdir()  # copying a directory as a file fails half-way through
    with pytest.raises(IsADirectoryError):
        store.put_dir("packed", "candidate-7", broken)
    assert store.versions("packed", "candidate-7") == [first]
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.pt2"]
    other = store.put_dir("packed", "candidate-70", packed_dir(tmp_path, "other"))
    second = store.put_dir("packed", "candidate-7", packed_dir(tmp_path, "two"))
    assert first.is_dir() and second.is_dir() and first != second
    store.prune("packed", "candidate-7", keep=second)
    assert store.versions("packed", "candidate-7") == [second] and other.is_dir()  # another key is not a version


# -- item: what a failure shows the user ------------------------------------------------------------------------


def test_an_unexpected_failure_stores_a_reference_and_logs_the_traceback(settings, tiny_model_path, caplog):
    model_id = add_model(settings, tiny_model_path)
    jid = add_job(settings, model_id)
    missing = settings.resolved_artifact_dir() / "models" / model_id
    missing.unlink()  # the artifact store lost the file: FileNotFoundError naming the server path
    with caplog.at_level(logging.ERROR, logger="bitsearch.worker"):
        assert jobs.run_job(settings, jid) == "failed"
    row = job_row(settings, jid)
    m = INTERNAL.match(row["error"] or "")
    assert m, row["error"]
    logged = [r for r in caplog.records if m.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info[0] is FileNotFoundError
    assert str(missing) in logging.Formatter().formatException(logged[0].exc_info)


def test_expected_failures_keep_their_message_and_no_server_path(settings, tiny_model_path, tmp_path):
    model_id = add_model(settings, tiny_model_path)
    infeasible = add_job(settings, model_id, budget={"weight_bytes": 10})
    assert jobs.run_job(settings, infeasible) == "failed"
    error = job_row(settings, infeasible)["error"]
    assert "infeasible" in error and "smallest feasible value" in error, error

    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip" * 50)
    bad_model = add_job(settings, add_model(settings, corrupt))
    assert jobs.run_job(settings, bad_model) == "failed"
    error = job_row(settings, bad_model)["error"]
    assert "not a torch.export .pt2 archive" in error, error
    for err in (job_row(settings, infeasible)["error"], error):
        assert str(tmp_path) not in err and "Traceback" not in err and "\n" not in err

    out_of_time = add_job(settings, model_id)
    assert jobs.run_job(like(settings, task_time_limit_s=0), out_of_time) == "failed"
    assert job_row(settings, out_of_time)["error"] == "the search exceeded the time limit of 0 s"


def test_a_cancelled_run_finishes_with_that_reason(settings, tiny_model_path):
    jid = add_job(
        settings,
        add_model(settings, tiny_model_path),
        method="random",
        budget={"avg_wbits": 5},
        options={"params": {"count": 5000}},
    )
    outcome = {}
    fast_beat = like(settings, heartbeat_s=0.2)
    runner = threading.Thread(target=lambda: outcome.setdefault("status", jobs.run_job(fast_beat, jid)))
    runner.start()
    try:
        deadline = time.time() + 120
        while not candidate_seqs(settings, jid):
            assert runner.is_alive() and time.time() < deadline, job_row(settings, jid)
            time.sleep(0.05)
    finally:
        with session_scope(url(settings)) as s:  # what POST /jobs/{id}/cancel does to a running job
            s.execute(update(Job).where(Job.id == jid).values(cancel_requested=True))
        runner.join(timeout=30)
    assert outcome.get("status") == "cancelled"
    row = job_row(settings, jid)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by request" and row["finished_at"]


def test_reason_classifies_by_where_an_error_comes_from(sqlite_settings):
    settings = sqlite_settings
    import torch

    from search.cost import Budget

    try:
        Budget.parse(["avg_wbits<3"])
    except ValueError as e:
        ours = e
    assert "malformed budget" in jobs._reason(ours, settings, "job x")
    try:
        torch.nn.functional.l1_loss(torch.zeros(2), torch.zeros(2), reduction="/srv/secret/path")
    except ValueError as e:
        theirs = e  # a ValueError, but torch's: its text is not a message for users
    assert INTERNAL.match(jobs._reason(theirs, settings, "job x"))
    text = (
        'Traceback (most recent call last):\n  File "/srv/bitsearch/search/model.py", line 3, in f\n'
        "    load()\nValueError: cannot read /srv/var/artifacts/models/abc: bad header"
    )
    assert jobs.public_text(text) == "ValueError: cannot read abc: bad header"
