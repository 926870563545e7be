"""The per-layer sensitivity report (search/sensitivity.py) from a real sqnr search on the tiny conftest model with
its activation widths searched too: the rows, the CSV and JSON, `bitsearch search --report`, and
GET /jobs/{id}/sensitivity on an embedded service whose jobs run through the worker's own code path."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from conftest import embedded_service

from search.sensitivity import (
    SENSITIVITY_METHODS,
    SensitivityError,
    SensitivityTables,
    report_columns,
    report_csv,
    report_json,
    report_rows,
    write_report,
)

# Small and fast, and both kinds of tensor measured: weights 2..8 and input activations at 4, 6 or 8 bits.
OPTIONS = {
    "calib_size": 128,
    "val_samples": 200,
    "a_bits": [4, 6, 8],
    "params": {"sweep_points": 0, "relinearize": 0},
}
BUDGET = {"avg_wbits": 3.5}


@pytest.fixture(scope="module")
def sqnr_result(tiny_model):
    from search.spec import load_job_data, make_spec, run_job

    spec = make_spec(method="sqnr", budget=BUDGET, **OPTIONS)
    return run_job(spec, tiny_model, load_job_data(spec, "fashion-mnist"))


def test_rows_hold_every_layer_and_width_and_the_recommended_widths(sqnr_result, tiny_model):
    tables = SensitivityTables.parse(sqnr_result.sensitivity)
    rows = report_rows(tables)
    config = sqnr_result.recommended.config
    assert [r["layer"] for r in rows] == [l.name for l in tiny_model.layers]
    assert tables.widths("weight") == list(range(2, 9)) and tables.widths("activation") == [4, 6, 8]
    for row, layer in zip(rows, tiny_model.layers, strict=True):
        assert (row["op"], row["params"], row["macs"]) == (layer.op, layer.params, layer.macs)
        assert row["w_chosen_bits"] == config.w_bits()[layer.name]
        assert row["a_chosen_bits"] == config.a_bits()[layer.name]
        for kind, widths in (("w", range(2, 9)), ("a", (4, 6, 8))):
            damage = [row[f"{kind}{b}_damage"] for b in widths]
            assert all(d is not None and math.isfinite(d) and d > 0 for d in damage), (layer.name, kind, damage)
            # A wider tensor never damages the model more than a narrower one.
            assert damage == sorted(damage, reverse=True), (layer.name, kind, damage)
            chosen = row[f"{kind}_chosen_bits"]
            assert row[f"{kind}_chosen_damage"] == row[f"{kind}{chosen}_damage"]
            if chosen == min(widths):
                assert row[f"{kind}_narrower_adds_to_total"] is None and "narrowest" in row["summary"]
            else:
                assert row[f"{kind}_narrower_adds_to_total"] >= 0
            if chosen == max(widths):
                assert row[f"{kind}_wider_removes_from_total"] is None
    # Every tensor's share of the chosen config's total damage: together, all of it.
    shares = [r[f"{k}_share_of_total_damage"] for r in rows for k in "wa"]
    assert sum(shares) == pytest.approx(1.0, rel=1e-4)


def test_csv_and_json_carry_the_rows(sqnr_result, tmp_path):
    tables = SensitivityTables.parse(sqnr_result.sensitivity)
    rows = report_rows(tables)
    parsed = list(csv.DictReader(io.StringIO(report_csv(tables))))
    assert list(parsed[0]) == report_columns(tables)
    assert {"w2_damage", "w8_damage", "a4_damage", "w_chosen_bits", "a_chosen_bits", "summary"} <= set(parsed[0])
    for got, row in zip(parsed, rows, strict=True):
        assert got["layer"] == row["layer"] and int(got["w_chosen_bits"]) == row["w_chosen_bits"]
        assert float(got["w3_damage"]) == row["w3_damage"]  # written at full precision
    report = report_json(tables)
    assert report["layers"] == rows and set(report["columns"]) == set(report_columns(tables))
    assert report["weight_widths"] == list(range(2, 9)) and report["method"] == "sqnr"
    assert write_report(tables, tmp_path / "r.json") == "json"
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    assert write_report(tables, tmp_path / "r.CSV") == "csv"
    assert (tmp_path / "r.CSV").read_text() == report_csv(tables)


def test_a_method_without_sensitivity_is_refused_by_name(tiny_model):
    from search.spec import load_job_data, make_spec, run_job

    spec = make_spec(method="uniform", budget={"avg_wbits": 4}, calib_size=128, val_samples=200)
    result = run_job(spec, tiny_model, load_job_data(spec, "fashion-mnist"))
    assert result.sensitivity is None and "uniform" not in SENSITIVITY_METHODS
    with pytest.raises(SensitivityError, match="method uniform does not measure per-layer sensitivity; run sqnr"):
        SensitivityTables.parse(result.sensitivity, "uniform")


def test_cli_search_report_writes_a_csv(tiny_model_path, tmp_path, capsys):
    from cli.main import main

    report = tmp_path / "sensitivity.csv"
    argv = ["search", str(tiny_model_path), "--data", "fashion-mnist", "--method", "sqnr", "--budget", "avg_wbits=3.5"]
    argv += ["--options", json.dumps(OPTIONS), "--report", str(report), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(report.open()))
    recommended = result["candidates"][result["recommended"]]
    assert {r["layer"]: int(r["w_chosen_bits"]) for r in rows} == recommended["w_bits"] and rows
    assert {r["layer"]: int(r["a_chosen_bits"]) for r in rows} == recommended["a_bits"]
    assert all(float(r["w2_damage"]) >= float(r["w8_damage"]) for r in rows)

    # A method that measures no sensitivity is refused before anything runs.
    refused = tmp_path / "uniform.csv"
    argv = ["search", str(tmp_path / "not-even-loaded.pt2"), "--data", "fashion-mnist", "--method", "uniform"]
    assert main([*argv, "--budget", "avg_wbits=4", "--report", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "--report: method uniform does not measure per-layer sensitivity; run sqnr" in err
    assert not refused.exists()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with embedded_service(tmp_path_factory.mktemp("sensitivity")) as svc:
        yield svc


def _submit(client, key, model_path, method, budget, options) -> str:
    r = client.post(
        "/jobs",
        headers={"X-API-Key": key},
        data={
            "method": method,
            "budget": json.dumps(budget),
            "options": json.dumps({**options, "validate_top_k": 0}),
            "data_name": "fashion-mnist",
        },
        files={"model": ("tiny.pt2", model_path.read_bytes())},
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def service_jobs(service, tiny_model_path):
    """An sqnr and a uniform job of alice's, run to the end by the worker's run_job (the Celery task's body)."""
    from worker.jobs import run_job

    settings, client, keys = service
    sqnr = _submit(client, keys["alice"], tiny_model_path, "sqnr", BUDGET, OPTIONS)
    queued = client.get(f"/jobs/{sqnr}/sensitivity", headers={"X-API-Key": keys["alice"]})
    uniform = _submit(client, keys["alice"], tiny_model_path, "uniform", {"avg_wbits": 4}, {"val_samples": 200})
    assert run_job(settings, sqnr) == run_job(settings, uniform) == "succeeded"
    return {"sqnr": sqnr, "uniform": uniform, "queued_answer": queued}


def test_api_serves_a_finished_sqnr_jobs_report_as_json_and_csv(service, service_jobs):
    _, client, keys = service
    job = service_jobs["sqnr"]
    alice = {"X-API-Key": keys["alice"]}
    r = client.get(f"/jobs/{job}/sensitivity", headers=alice)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    report = r.json()
    candidates = client.get(f"/jobs/{job}/candidates", headers=alice).json()
    recommended = client.get(f"/candidates/{next(c['id'] for c in candidates if c['recommended'])}", headers=alice)
    chosen = recommended.json()
    assert {row["layer"]: row["w_chosen_bits"] for row in report["layers"]} == chosen["w_bits"]
    assert {row["layer"]: row["a_chosen_bits"] for row in report["layers"]} == chosen["a_bits"]
    assert report["weight_widths"] == list(range(2, 9)) and report["activation_widths"] == [4, 6, 8]

    r = client.get(f"/jobs/{job}/sensitivity", params={"format": "csv"}, headers=alice)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert f'filename="bitsearch-job-{job}-sensitivity.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["layer"] for row in rows] == [row["layer"] for row in report["layers"]]
    assert [float(row["w2_damage"]) for row in rows] == [row["w2_damage"] for row in report["layers"]]

    r = client.get(f"/jobs/{job}/sensitivity", params={"format": "xml"}, headers=alice)
    assert r.status_code == 400 and r.json()["detail"] == "no sensitivity report format 'xml'; formats are json, csv"


def test_api_sensitivity_refusals_say_why(service, service_jobs):
    _, client, keys = service
    alice, bob = {"X-API-Key": keys["alice"]}, {"X-API-Key": keys["bob"]}
    r = client.get(f"/jobs/{service_jobs['uniform']}/sensitivity", headers=alice)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        "method uniform does not measure per-layer sensitivity; run sqnr on the same model and data"
    )
    queued = service_jobs["queued_answer"]
    assert queued.status_code == 409
    assert queued.json()["detail"] == (
        f"job {service_jobs['sqnr']} is queued; its sensitivity report is written when it succeeds"
    )
    # Another owner's private job, and a job that does not exist: the same 404 as GET /jobs/{id}.
    for headers, job in ((bob, service_jobs["sqnr"]), (alice, "no-such-job")):
        r = client.get(f"/jobs/{job}/sensitivity", headers=headers)
        assert r.status_code == 404 and r.json()["detail"] == f"no job with id {job!r}"
    assert client.get(f"/jobs/{service_jobs['sqnr']}/sensitivity").status_code == 404  # no key, private job
