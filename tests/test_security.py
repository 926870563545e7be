"""A public service that takes model files from strangers: hostile uploads, access control, limits, fuzzing.
Runs against a real stack (uvicorn + Celery worker on PostgreSQL and Redis)."""

from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from sqlalchemy import create_engine, text
from torch import nn

from tests.conftest import TinyNet, export_model
from tests.hostile import with_guard_code, with_pickled_sample_inputs, with_pickled_weight
from tests.stack import ROOT, Stack

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
QUICK = {"val_samples": 200, "calib_size": 128, "validate_top_k": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("secure"),
        backend="postgres",
        heartbeat_s=1,
        stale_after_s=10,
        max_layers=64,
        max_model_bytes=4 * 2**20,
        max_dataset_bytes=4 * 2**20,
        max_request_bytes=10 * 2**20,
    )
    s.start(workers=1)
    yield s
    s.stop()


def post_job(client, model: Path | None = RESNET, budget=None, options=None, method="uniform", data=None, **form):
    fields = {
        "method": method,
        "budget": json.dumps(budget or {"avg_wbits": 4}),
        "options": options if isinstance(options, str) else json.dumps(options or QUICK),
        **form,
    }
    files = {}
    if model is not None:
        files["model"] = (model.name, model.read_bytes(), "application/zip")
    if data is not None:
        files["data"] = (data.name, data.read_bytes(), "application/octet-stream")
    else:
        fields.setdefault("data_name", "fashion-mnist")
    return client.post("/jobs", data=fields, files=files)


def stored_files(stack) -> list[str]:
    root = stack.var_dir / "artifacts"
    return sorted(str(p.relative_to(stack.var_dir)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def all_files(stack) -> set[str]:
    return {str(p) for p in stack.var_dir.rglob("*") if p.is_file() and "logs" not in p.parts}


# -- hostile uploads --------------------------------------------------------------------------------------------


def test_hostile_archives_are_refused_and_never_run(stack, tmp_path, tiny_model_path):
    marker = tmp_path / "pwned"
    crafted = {
        "pickled weight": with_pickled_weight(tiny_model_path, tmp_path / "w.pt2", marker),
        "pickled sample inputs": with_pickled_sample_inputs(tiny_model_path, tmp_path / "s.pt2", marker),
        "guard code": with_guard_code(tiny_model_path, tmp_path / "g.pt2", marker),
    }
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/archive_format", "pt2")
        zf.writestr("archive/data/weights/weight_0", b"\0" * (256 << 20))  # 256 MiB in a few hundred KiB
    traversal = tmp_path / "traversal.pt2"
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("archive/archive_format", "pt2")
        zf.writestr("archive/../../../tmp/evil", "x")
    nan_model = TinyNet()
    with torch.no_grad():
        nan_model.fc1.weight[0, 0] = math.nan

    class Deep(nn.Module):  # more layers than the stack's max_layers (64)
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(80)])

        def forward(self, x):
            return self.layers(x.flatten(1)[:, :8])

    before = all_files(stack)
    with stack.client() as c:
        for name, path in crafted.items():
            r = post_job(c, path)
            if name in ("guard code", "pickled sample inputs"):
                # Guard strings are dropped and sample inputs never read: what is left is an ordinary model,
                # accepted (or refused only for its input shape), and nothing in the file ran.
                assert r.status_code in (202, 422), (name, r.text)
            else:
                assert r.status_code == 400 and "pickl" in r.json()["detail"].lower(), (name, r.text)
        r = post_job(c, bomb)
        assert r.status_code == 400 and "zip bomb" in r.json()["detail"], r.text
        r = post_job(c, traversal)
        assert r.status_code == 400 and "relative path" in r.json()["detail"], r.text
        r = post_job(c, export_model(nan_model, tmp_path / "nan.pt2"))
        assert r.status_code == 400 and "NaN" in r.json()["detail"], r.text
        r = post_job(c, export_model(Deep(), tmp_path / "deep.pt2", example=(torch.randn(2, 1, 28, 28),)))
        assert r.status_code == 400 and "more than 64 quantizable layers" in r.json()["detail"], r.text
        assert c.get("/health").json()["database"] == "ok"  # the server is still up
    assert not marker.exists()
    assert not Path("/tmp/evil").exists()
    new = all_files(stack) - before
    # Only the guard-code and sample-inputs models (valid once what could run is dropped) may have been stored.
    assert all("/artifacts/models/" in f and ".incoming" not in f for f in new), new


def test_hostile_data_sets_budgets_and_options_get_clear_4xx(stack, tmp_path):
    def dataset(name, **tensors):
        from safetensors.torch import save_file

        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        return path

    cases = [
        (
            dataset("shape", inputs=torch.randn(4, 1, 20, 20), labels=torch.zeros(4, dtype=torch.long)),
            422,
            "[1, 20, 20]",
        ),
        (
            dataset("dtype", inputs=torch.randn(4, 1, 28, 28).double(), labels=torch.zeros(4, dtype=torch.long)),
            400,
            "float32",
        ),
        (dataset("labels_dtype", inputs=torch.randn(4, 1, 28, 28), labels=torch.zeros(4)), 400, "int64"),
        (
            dataset("labels_range", inputs=torch.randn(4, 1, 28, 28), labels=torch.tensor([0, 1, 2, 50])),
            422,
            "labels up to 50",
        ),
        (dataset("negative", inputs=torch.randn(4, 1, 28, 28), labels=torch.tensor([0, -1, 2, 3])), 400, "negative"),
        (dataset("nan", inputs=torch.full((4, 1, 28, 28), math.nan)), 400, "NaN"),
        (dataset("extra", inputs=torch.randn(4, 1, 28, 28), secret=torch.zeros(1)), 400, "unexpected tensors"),
    ]
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"\xff" * 1000)
    cases.append((not_safetensors, 400, "safetensors"))
    with stack.client() as c:
        for path, status, words in cases:
            r = post_job(c, data=path)
            assert r.status_code == status and words in r.json()["detail"], (path.name, r.status_code, r.text)
        for budget, words in [
            ({"avg_wbits": -2}, "avg_wbits"),
            ({"weight_bytes": 1e300}, "weight_bytes"),
            ({"bitops": "lots"}, "number"),
            ({"speed": 3}, "unknown metric"),
            ([3], "JSON object"),
        ]:
            r = post_job(c, budget=budget)
            assert r.status_code == 400 and words in r.json()["detail"], (budget, r.text)
        for options, words in [
            ({"seed": "x"}, "seed"),
            ({"w_bits": [0, 9]}, "w_bits"),
            ({"a_bits": [1]}, "a_bits"),
            ({"calib_size": -5}, "calib_size"),
            ({"colour": "red"}, "colour"),
            ("[1, 2]", "JSON object"),
            ("{not json", "not JSON"),
            ({"params": "fast"}, "params"),
        ]:
            r = post_job(c, options=options)
            assert r.status_code == 400 and words in r.json()["detail"], (options, r.text)
        r = c.post("/jobs", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "method" in r.json()["detail"]
        r = c.post("/jobs", content=b"x" * (11 * 2**20), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]


# -- access control -----------------------------------------------------------------------------------------------


def test_keys_are_required_and_hashed_at_rest(stack):
    with stack.client(None) as anon:
        r = post_job(anon)
        assert r.status_code == 401 and "API key is required" in r.json()["detail"]
        assert anon.get("/jobs").status_code == 401
        r = anon.get("/jobs", headers={"Authorization": "Bearer bsk_not-a-real-key"})
        assert r.status_code == 401 and "invalid" in r.json()["detail"]
    engine = create_engine(stack.database_url)
    with engine.connect() as conn:
        dump = " ".join(str(row) for row in conn.execute(text("SELECT * FROM api_keys")))
    engine.dispose()
    assert stack.keys["alice"] not in dump and stack.keys["bob"] not in dump
    assert stack.keys["alice"][:12] in dump  # the recognisable prefix only


def test_other_owners_get_404_until_the_job_is_public(stack):
    with stack.client("alice") as alice, stack.client("bob") as bob, stack.client(None) as anon:
        r = post_job(alice)
        assert r.status_code == 202, r.text
        job_id, model_id = r.json()["id"], r.json()["model_id"]
        job = stack.wait_job(job_id, timeout=300)
        assert job["status"] == "succeeded", job
        cand = alice.get(f"/jobs/{job_id}/candidates").json()[0]["id"]
        assert alice.get(f"/candidates/{cand}/config").status_code == 200

        hidden = [
            ("GET", f"/jobs/{job_id}"),
            ("GET", f"/jobs/{job_id}/candidates"),
            ("GET", f"/candidates/{cand}"),
            ("GET", f"/candidates/{cand}/config"),
            ("GET", f"/candidates/{cand}/packed"),
            ("POST", f"/jobs/{job_id}/cancel"),
        ]
        for client in (bob, anon):
            for verb, path in hidden:
                r = client.request(verb, path)
                assert r.status_code in ((404,) if client is bob or verb == "GET" else (401,)), (verb, path, r.text)
            assert job_id not in json.dumps(client.get("/api/leaderboard").json())
        assert job_id not in [j["id"] for j in bob.get("/jobs").json()["items"]]
        assert bob.patch(f"/jobs/{job_id}", json={"public": True}).status_code == 404
        # Bob cannot start a job on Alice's model by its id (he never uploaded it).
        r = post_job(bob, model=None, model_id=model_id)
        assert r.status_code == 404 and "no model" in r.json()["detail"]

        assert alice.patch(f"/jobs/{job_id}", json={"public": True}).json()["public"] is True
        for client in (bob, anon):
            assert client.get(f"/jobs/{job_id}").status_code == 200
            assert client.get(f"/candidates/{cand}/config").status_code == 200
            assert job_id in json.dumps(client.get("/api/leaderboard").json())
        assert bob.post(f"/jobs/{job_id}/cancel").status_code == 404  # public is read-only
        assert bob.patch(f"/jobs/{job_id}", json={"public": False}).status_code == 404


# -- fuzzing ---------------------------------------------------------------------------------------------------------


def test_fuzzed_requests_never_get_a_server_error(stack):
    """Every operation of the OpenAPI schema, with bounded generated requests (schemathesis + hypothesis)."""
    from hypothesis import given

    api = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    headers = {"Authorization": f"Bearer {stack.keys['bob']}"}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case):
            case.call_and_validate(headers=headers, checks=[schemathesis.checks.not_a_server_error])

        fuzz()
    with stack.client() as c:
        assert c.get("/health").json()["database"] == "ok"


# -- limits ------------------------------------------------------------------------------------------------------------


def test_rate_limit_active_jobs_and_time_limit(tmp_path):
    s = Stack(
        tmp_path / "limits",
        backend="postgres",
        rate_limit_per_s=5,
        rate_limit_burst=10,
        max_active_jobs=1,
        task_time_limit_s=2,
        heartbeat_s=1,
    )
    s.start(workers=1)
    try:
        with s.client("alice") as alice:
            r = post_job(alice, method="haq", options={**QUICK, "params": {"episodes": 500}})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            r = post_job(alice)
            assert r.status_code == 429 and "limit per owner" in r.json()["detail"]
            job = None
            for _ in range(120):
                time.sleep(1)
                job = alice.get(f"/jobs/{job_id}").json()
                if job["status"] in ("failed", "succeeded"):
                    break
            assert job["status"] == "failed" and "time limit of 2 s" in job["error"], job
            codes = [alice.get(f"/jobs/{job_id}").status_code for _ in range(30)]
            assert 429 in codes and codes[0] == 200
            r = next(alice.get(f"/jobs/{job_id}") for _ in range(5))
            if r.status_code == 429:
                assert "rate limit" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        with s.client("bob") as bob:
            assert bob.get("/jobs").status_code == 200  # one key's flood does not block another
    finally:
        s.stop()


def test_a_search_over_the_memory_limit_fails_with_that_reason(tmp_path):
    s = Stack(tmp_path / "memory", backend="postgres", worker_max_memory_mb=1300, heartbeat_s=1)
    s.start(workers=1)
    try:
        with s.client("alice") as alice:
            # Imprinting keeps every layer's activations for the calibration images: far over 1.3 GB here.
            r = post_job(
                alice,
                method="imprinting",
                budget={"avg_wbits": 3},
                options={**QUICK, "calib_size": 4096, "val_samples": 2000},
            )
            assert r.status_code == 202, r.text
            job = s.wait_job(r.json()["id"], timeout=300)
        assert job["status"] == "failed" and "out of memory (limit 1300 MB" in job["error"], job
        assert s.workers[0].poll() is None  # the worker survived its task
    finally:
        s.stop()
