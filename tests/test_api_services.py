"""The service layer on its own (api/services/): called directly with a session, and through FastAPI's TestClient
in this process, on an embedded SQLite database. No Redis, PostgreSQL or worker: these run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import embedded_service

from tests.stack import ROOT

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
QUICK = {"calib_size": 128, "val_samples": 200}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Settings on a fresh SQLite file; the app built from them; two owners' keys."""
    with embedded_service(tmp_path_factory.mktemp("svc"), BITSEARCH_MAX_ACTIVE_JOBS="2") as svc:
        yield svc


def _post(client, key, budget=None, options=None, method="uniform", **form):
    files = {}
    if "model_id" not in form:
        files["model"] = ("resnet20.pt2", RESNET.read_bytes(), "application/zip")
    form.setdefault("data_name", "fashion-mnist")
    return client.post(
        "/jobs",
        headers={"Authorization": f"Bearer {key}"},
        files=files,
        data={
            "method": method,
            "budget": json.dumps(budget or {"avg_wbits": 4}),
            "options": json.dumps(QUICK if options is None else options),
            **form,
        },
    )


def test_build_spec_names_what_is_wrong_without_http():
    from api.services.errors import InvalidRequest
    from api.services.jobs import build_spec

    spec, top_k = build_spec("sqnr", '{"avg_wbits": 3}', '{"seed": 5, "params": {"sweep_points": 2}}', 4)
    assert spec.seed == 5 and spec.params == {"sweep_points": 2} and spec.budget.avg_wbits == 3 and top_k == 4
    for args, words in [
        (("genetic", '{"avg_wbits": 3}', "{}"), "unknown method 'genetic'"),
        (("sqnr", '{"avg_wbits": 3', "{}"), "malformed budget: not JSON"),
        (("sqnr", '{"speed": 3}', "{}"), "unknown metric"),
        (("sqnr", '{"avg_wbits": 3}', '{"params": {"sweeps": 2}}'), "unknown sqnr option(s) 'sweeps'"),
        (("sqnr", '{"avg_wbits": 3}', '{"colour": "red"}'), "unknown option 'colour'"),
        (("sqnr", '{"avg_wbits": 3}', '{"validate_top_k": 500}'), "validate_top_k"),
        (("sqnr", '{"avg_wbits": 3}', '{"finetune": {"epochs": 1}}'), "'sqnr' does not fine-tune"),
    ]:
        with pytest.raises(InvalidRequest, match=words.replace("(", r"\(").replace(")", r"\)")):
            build_spec(*args, 4)


def test_create_list_cancel_through_the_service_functions(service):
    from api.services import jobs
    from api.services.errors import CannotRun, Conflict, NotFound, QuotaExceeded
    from store.artifacts import ArtifactStore
    from store.db import session_scope

    settings, _, _ = service
    store = ArtifactStore(settings.resolved_artifact_dir())
    queued: list[str] = []

    def request(budget='{"avg_wbits": 4}', **kw):
        spec, top_k = jobs.build_spec("uniform", budget, json.dumps(QUICK), 0)
        return jobs.JobRequest(
            spec, top_k, model=jobs.Upload(open(RESNET, "rb"), "resnet20.pt2"), data_name="fashion-mnist", **kw
        )

    created = jobs.create_job(settings, store, "carol", request(), queued.append)
    assert queued == [created.id] and (store.path("models", created.model_id)).is_file()
    with pytest.raises(CannotRun, match="infeasible budget"):
        jobs.create_job(settings, store, "carol", request('{"avg_wbits": 1.5}'), queued.append)
    jobs.create_job(settings, store, "carol", request(), queued.append)
    with pytest.raises(QuotaExceeded, match="2 queued or running jobs"):
        jobs.create_job(settings, store, "carol", request(), queued.append)
    url = settings.resolved_database_url()
    with session_scope(url) as db:
        page = jobs.list_jobs(db, "carol")
        assert page.total == 2 and {j.id for j in page.items} >= {created.id}
        assert jobs.list_jobs(db, "dave").total == 0
        with pytest.raises(NotFound):
            jobs.job_for(db, created.id, "dave")
        assert jobs.cancel_job(db, created.id, "carol").status == "cancelled"
        with pytest.raises(Conflict, match="already cancelled"):
            jobs.cancel_job(db, created.id, "carol")
        with pytest.raises(NotFound):
            jobs.cancel_job(db, created.id, "dave")


def test_domain_errors_become_statuses_in_one_handler(service):
    _, client, keys = service
    r = _post(client, keys["alice"], options={**QUICK, "params": {"count": 3}})
    assert r.status_code == 400 and "unknown uniform option(s) 'count'" in r.json()["detail"]
    r = _post(client, keys["alice"], budget={"avg_wbits": 1.5})
    assert r.status_code == 422 and "infeasible budget" in r.json()["detail"]
    r = client.get("/jobs/does-not-exist", headers={"Authorization": f"Bearer {keys['bob']}"})
    assert r.status_code == 404 and "no job with id" in r.json()["detail"]


def test_job_responses_carry_utc_timestamps_with_z(service):
    _, client, keys = service
    r = _post(client, keys["bob"])
    assert r.status_code == 202, r.text
    job = client.get(r.headers["Location"], headers={"Authorization": f"Bearer {keys['bob']}"}).json()
    assert job["created_at"].endswith("Z") and job["status"] == "queued"
    listed = client.get("/jobs", headers={"Authorization": f"Bearer {keys['bob']}"}).json()["items"]
    assert all(j["created_at"].endswith("Z") for j in listed)
    cancelled = client.post(f"/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {keys['bob']}"}).json()
    assert cancelled["finished_at"].endswith("Z") and cancelled["status"] == "cancelled"


def test_stored_options_rebuild_the_same_spec(service):
    """What POST /jobs stores is what the worker turns back into a spec (worker/jobs.py job_spec)."""
    from search.spec import JobSpec
    from store.db import session_scope
    from store.models import Job

    settings, client, keys = service
    options = {"seed": 7, "calib_size": 64, "val_samples": 150, "w_bits": [2, 4, 8], "params": {"count": 3}}
    r = _post(client, keys["bob"], method="random", options=options)
    assert r.status_code == 202, r.text
    with session_scope(settings.resolved_database_url()) as db:
        job = db.get(Job, r.json()["id"])
        spec = JobSpec.from_job(job.method, job.budget, job.options)
    assert (spec.seed, spec.calib_size, spec.val_samples, spec.w_bits, spec.params) == (
        7,
        64,
        150,
        [2, 4, 8],
        {"count": 3},
    )
    assert Path(settings.resolved_artifact_dir(), "models", r.json()["model_id"]).is_file()


def test_a_job_says_whether_its_batch1_export_was_rewritten_or_runs_slowly(service, tmp_path):
    import torch

    from tests.test_rebatch import SqueezeAll, batch1_reference

    _, client, keys = service
    headers = {"Authorization": f"Bearer {keys['bob']}"}
    fixed = tmp_path / "squeeze.pt2"
    torch.export.save(torch.export.export(SqueezeAll().eval(), (torch.randn(1, 1, 28, 28),)), str(fixed))
    rewritable = batch1_reference("resnet20-fmnist", tmp_path / "resnet20-b1.pt2")

    def post(path, method):
        return client.post(
            "/jobs",
            headers=headers,
            files={"model": (Path(path).name, Path(path).read_bytes(), "application/zip")},
            data={
                "method": method,
                "data_name": "fashion-mnist",
                "budget": '{"avg_wbits": 4}',
                "options": json.dumps(QUICK),
            },
        )

    for path, note in ((fixed, "runs 1 sample(s) per call, which is slow"), (rewritable, "rewrote it to run at any")):
        r = post(path, "imprinting")
        assert r.status_code == 202, r.text
        job = client.get(r.json()["location"], headers=headers).json()
        assert any(note in n for n in job["notes"]), job["notes"]
        assert path != fixed or any("'squeeze'" in n for n in job["notes"]), job["notes"]
        client.post(f"{r.json()['location']}/cancel", headers=headers)


def test_a_job_states_its_expected_memory_and_one_over_the_limit_is_refused(service):
    from api.services import jobs
    from api.services.errors import CannotRun
    from api.views import job_out
    from store.artifacts import ArtifactStore
    from store.db import session_scope

    settings, _, _ = service
    store = ArtifactStore(settings.resolved_artifact_dir())

    def request(calib_size, top_k=1):
        options = {**QUICK, "calib_size": calib_size, "validate_top_k": top_k}
        spec, top_k = jobs.build_spec("sqnr", '{"avg_wbits": 4}', json.dumps(options), 1)
        return jobs.JobRequest(
            spec, top_k, model=jobs.Upload(open(RESNET, "rb"), "resnet20.pt2"), data_name="fashion-mnist"
        )

    created = jobs.create_job(settings, store, "frank", request(128), lambda _: None)
    with session_scope(settings.resolved_database_url()) as db:
        job = job_out(jobs.job_for(db, created.id, "frank"), 0)
        assert job.expected_memory_mb and 300 < job.expected_memory_mb < 4000
        assert any(n.startswith("expected peak memory: about") for n in job.notes)
        jobs.cancel_job(db, created.id, "frank")
    tight = settings.model_copy(update={"job_memory_mb": job.expected_memory_mb + 50})
    with pytest.raises(CannotRun, match=r"would need about [\d,]+ MB .* over this server's limit .* lower calib_size"):
        jobs.create_job(tight, store, "frank", request(50000, top_k=0), lambda _: None)
    tighter = settings.model_copy(update={"job_memory_mb": job.expected_memory_mb - 1})
    with pytest.raises(CannotRun, match=r"in its validation .* lower validate_top_k=0"):
        jobs.create_job(tighter, store, "frank", request(128, top_k=4), lambda _: None)
