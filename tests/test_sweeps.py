"""Budget sweeps (search/sweep.py): one job at several budgets measures once, stores each config once, recommends
what a job at each budget alone recommends, and keeps one Pareto front; the API takes and refuses sweeps and the
leaderboard tells a swept job's budgets apart."""

from __future__ import annotations

import json
import re

import pytest
from conftest import embedded_service

from tests.stack import ROOT

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
QUICK = {"calib_size": 128, "val_samples": 200}
SQNR = {"params": {"sweep_points": 1, "relinearize": 1}, "val_samples": 200}


def _spec(method, budget, sweep=(), **fields):
    from search.spec import make_spec

    return make_spec(method=method, budget=budget, sweep=list(sweep), **fields)


def _key(c):
    return c.config.model_dump_json()


def test_a_sqnr_sweep_measures_once_and_recommends_what_each_budget_alone_does(tiny_model, fmnist):
    from search.spec import run_job
    from search.sweep import SweepResult

    budgets = [{"avg_wbits": 3}, {"avg_wbits": 2.5}, {"avg_wbits": 4}]
    progress, stored = [], []
    result = run_job(
        _spec("sqnr", budgets[0], budgets[1:], **SQNR),
        tiny_model,
        fmnist,
        on_progress=progress.append,
        on_candidate=stored.append,
    )
    assert isinstance(result, SweepResult) and [b.limits() for b in result.budgets] == budgets

    # The first pass (every layer around the float model) is measured by the main budget's run and reused by the
    # others; the passes around each budget's own allocation are each measured where they are asked for.
    first = [r for r in result.measurement if r["around_float"]]
    assert [r["budget"] for r in first] == [0, 1, 2] and len({r["key"] for r in first}) == 1
    assert first[0]["computed"] == first[0]["chunks"] and first[0]["reused"] == 0
    assert all(r["computed"] == 0 and r["reused"] == r["chunks"] for r in first[1:])

    # Each budget's recommendation is the config a job at that budget alone recommends.
    for index, budget in enumerate(budgets):
        alone = run_job(_spec("sqnr", budget, **SQNR), tiny_model, fmnist)
        mine = result.recommended_per_budget[index]
        assert mine is not None and _key(mine) == _key(alone.recommended), index
        assert index in mine.meta["recommended_for"]
        assert mine.val_top1 == alone.recommended.val_top1
    assert result.recommended is result.recommended_per_budget[0]

    # Each config once, handed on as found, with the index of the budget that found it; one front over them all.
    assert [id(c) for c in stored] == [id(c) for c in result.candidates]
    assert len({_key(c) for c in result.candidates}) == len(result.candidates)
    assert {c.meta["budget"] for c in result.candidates} >= {0, 2}  # 4 bits finds configs 3 bits does not
    assert any(c.pareto for c in result.candidates if c.meta["budget"] != 0)
    assert all(c.fits == result.budget.fits(c.cost) for c in result.candidates)
    # Progress over the whole job: never backwards, ending at its total, naming the budget it is at.
    steps = [p.step for p in progress]
    assert steps == sorted(steps) and progress[-1].step == progress[-1].total
    assert all(p.step <= p.total for p in progress) and progress[-1].phase.startswith("budget 3/3")
    assert result.sensitivity is not None and result.phase_seconds["measure"] > 0
    d = result.to_dict()
    assert d["budgets"] == budgets and d["recommended"] == d["recommended_per_budget"][0]


def test_a_config_found_under_two_budgets_is_stored_once(tiny_model, fmnist):
    from search.spec import run_job

    stored = []
    result = run_job(
        _spec("uniform", {"avg_wbits": 4}, [{"avg_wbits": 8}, {"avg_wbits": 3}], val_samples=200),
        tiny_model,
        fmnist,
        on_candidate=stored.append,
    )
    widths = [c.meta["uniform"] for c in result.candidates]
    assert widths == [f"W{b}A8" for b in range(2, 9)]  # the third budget found nothing new
    assert [c.meta["budget"] for c in result.candidates] == [0, 0, 0, 1, 1, 1, 1]
    assert [id(c) for c in stored] == [id(c) for c in result.candidates]
    third = result.recommended_per_budget[2]
    assert third.meta["uniform"] == "W3A8" and third.meta["budget"] == 0 and third.meta["recommended_for"] == [2]
    # fits: the main budget's
    assert [c.fits for c in result.candidates] == [True] * 3 + [False] * 4


def test_a_sweep_is_checked_with_the_spec():
    from search.spec import JobSpec, SpecError

    spec = _spec("uniform", {"avg_wbits": 4}, [{"avg_wbits": 3}, ["avg_wbits=6"]])
    assert [b.limits() for b in spec.budgets()] == [{"avg_wbits": 4}, {"avg_wbits": 3}, {"avg_wbits": 6}]
    assert spec.job_options()["sweep"] == [{"avg_wbits": 3}, {"avg_wbits": 6}]
    again = JobSpec.from_job("uniform", spec.budget.limits(), json.loads(json.dumps(spec.job_options())))
    assert again == spec
    for sweep, words in [
        ([{"weight_bytes": 60000}], "sweep[0] limits weight_bytes; every sweep budget limits the same metrics"),
        ([{"avg_wbits": 3}, {"avg_wbits": 3.0}], "sweep[1] repeats sweep[0] (avg_wbits=3)"),
        ([{"avg_wbits": 4}], "sweep[0] repeats budget (avg_wbits=4)"),
        ([{"speed": 3}], "sweep[0]: unknown metric"),
        ([{"avg_wbits": b / 4} for b in range(8, 25)], "at most 16 budgets"),
    ]:
        with pytest.raises(SpecError, match=re.escape(words)):
            _spec("uniform", {"avg_wbits": 4}, sweep)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with embedded_service(tmp_path_factory.mktemp("sweeps")) as svc:
        yield svc


def _post(client, key, budget, options, method="uniform"):
    return client.post(
        "/jobs",
        headers={"Authorization": f"Bearer {key}"},
        files={"model": ("resnet20.pt2", RESNET.read_bytes(), "application/zip")},
        data={
            "method": method,
            "budget": json.dumps(budget),
            "options": json.dumps(options),
            "data_name": "fashion-mnist",
        },
    )


def test_the_api_takes_a_sweep_and_names_an_infeasible_budget(service):
    from store.db import session_scope
    from store.models import Job

    settings, client, keys = service
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    r = _post(client, keys["alice"], {"avg_wbits": 4}, {**QUICK, "sweep": [{"avg_wbits": 1.5}, {"avg_wbits": 2}]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith('sweep[0] {"avg_wbits": 1.5}: infeasible budget: avg_wbits <= 1.5')
    r = _post(client, keys["alice"], {"avg_wbits": 4}, {**QUICK, "sweep": [{"bitops": 10**9}]})
    assert r.status_code == 400 and "sweep[0] limits bitops" in r.json()["detail"]

    r = _post(client, keys["alice"], {"avg_wbits": 4}, {**QUICK, "sweep": [{"avg_wbits": 3}, {"avg_wbits": 8}]})
    assert r.status_code == 202, r.text
    job = client.get(r.headers["Location"], headers=auth).json()
    assert job["budgets"] == [{"avg_wbits": 4}, {"avg_wbits": 3}, {"avg_wbits": 8}] and job["timings"] is None
    # What the worker writes at the end of a job comes back with it.
    timings = {"phases": {"setup": 0.5, "score": 1.25}, "measurement": []}
    with session_scope(settings.resolved_database_url()) as db:
        db.get(Job, job["id"]).timings = timings
    listed = client.get("/jobs", headers=auth).json()["items"]
    assert next(j for j in listed if j["id"] == job["id"])["timings"] == timings


def test_the_leaderboard_tells_a_swept_jobs_budgets_apart(service):
    """The worker's own job runner, in this process: the swept job's candidates are stored with the budget that
    found them, and the leaderboard lists its front over both budgets."""
    from worker.jobs import run_job

    settings, client, keys = service
    auth = {"Authorization": f"Bearer {keys['bob']}"}
    options = {**QUICK, "validate_top_k": 0, "sweep": [{"avg_wbits": 8}]}
    r = _post(client, keys["bob"], {"avg_wbits": 4}, options)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert run_job(settings, job_id) == "succeeded"

    cands = client.get(f"/jobs/{job_id}/candidates", headers=auth).json()
    assert [c["budget"] for c in cands] == [0, 0, 0, 1, 1, 1, 1]
    assert [c["recommended_for"] for c in cands if c["recommended"]] == [[0]]
    # every budget's recommendation is stored, also those a later budget made of an earlier candidate
    assert sorted(i for c in cands for i in c["recommended_for"]) == [0, 1]
    board = client.get("/api/leaderboard", headers=auth).json()
    rows = [row for g in board["groups"] for row in g["rows"] if row["job_id"] == job_id]
    assert rows and all(row["job_budgets"] == 2 for row in rows)
    assert {row["budget_index"] for row in rows} == {0, 1}  # the front runs over both budgets
    assert all(row["budget"] == [{"avg_wbits": 4}, {"avg_wbits": 8}][row["budget_index"]] for row in rows)
    assert sum(row["recommended_for"] == [0] for row in rows) == 1
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["timings"]["phases"]["score"] > 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tests.stack import Stack

    s = Stack(tmp_path_factory.mktemp("sweep-pages"), backend="postgres", max_model_bytes=4 * 2**20)
    s.start(workers=1)
    yield s
    s.stop()


def test_the_leaderboard_page_draws_a_swept_jobs_front(stack):
    """In Chromium, on a real stack: a job swept over two budgets is drawn as one line through its front, and its
    rows say which budget found each candidate and which is the main budget's recommendation."""
    from tests.test_pages import CHART_PROBLEMS, _browser, _css, _fresh, _wait

    options = {**QUICK, "validate_top_k": 0, "sweep": [{"avg_wbits": 8}]}
    r = stack.post_job("uniform", {"avg_wbits": 4}, options, RESNET)
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    with stack.client() as c:
        rows = [row for g in c.get("/api/leaderboard").json()["groups"] for row in g["rows"]]
    assert {row["budget_index"] for row in rows} == {0, 1}

    driver = _browser(1400, 900)
    try:
        _fresh(driver, stack.url + "/leaderboard", stack.keys["alice"])
        _wait(driver, lambda d: _css(d, "table.board tbody tr") and _css(d, "svg.chart .point"))
        line = _css(driver, f"svg.chart polyline.job-front[data-job='{job['id']}']")
        assert len(line) == 1 and int(line[0].get_attribute("data-points")) == len(rows) >= 2
        assert len(line[0].get_attribute("points").split()) == len(rows)
        assert "a budget sweep's front" in _css(driver, ".legend")[0].text
        methods = [td.text for td in _css(driver, "table.board tbody tr td:first-child")]
        assert any("#0 avg_wbits ≤ 4" in m for m in methods) and any("#1 avg_wbits ≤ 8" in m for m in methods)
        assert sum("★ #0" in m for m in methods) == 1
        assert driver.execute_script(CHART_PROBLEMS) == {"outside": [], "touching": 0, "offAxes": 0}
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
        driver.save_screenshot(str(ROOT / "test-artifacts" / "leaderboard-sweep.png"))
    finally:
        driver.quit()


def test_the_cli_takes_a_sweep_and_shows_the_best_per_budget(tiny_model_path, tmp_path):
    import argparse
    import subprocess
    import sys
    from pathlib import Path

    from rich.console import Console

    from cli.common import add_spec_arguments, print_budget_recommendations, spec_from_args
    from search.model import load_model
    from search.spec import run_job

    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    flags = ["--method", "uniform", "--budget", "avg_wbits=4", "--val-samples", "200", "--calib-size", "64"]
    args = parser.parse_args([*flags, "--sweep", "avg_wbits=8", "--sweep", "avg_wbits=3"])
    spec = spec_from_args(args)
    assert [b.limits() for b in spec.budgets()] == [{"avg_wbits": 4}, {"avg_wbits": 8}, {"avg_wbits": 3}]
    with pytest.raises(ValueError, match=re.escape("sweep[0] limits avg_wbits, act_bytes")):
        spec_from_args(parser.parse_args([*flags, "--sweep", "avg_wbits=3,act_bytes=4096"]))

    # `bitsearch search --json` carries the budgets and each one's recommended candidate.
    out = subprocess.run(
        [str(Path(sys.executable).parent / "bitsearch"), "search", str(tiny_model_path), "--data", "fashion-mnist"]
        + [*flags, "--sweep", "avg_wbits=8", "--sweep", "avg_wbits=3", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["budgets"] == [{"avg_wbits": 4}, {"avg_wbits": 8}, {"avg_wbits": 3}]
    swept = run_job(spec, load_model(tiny_model_path), _splits(spec))
    best = [result["candidates"][i]["meta"]["uniform"] for i in result["recommended_per_budget"]]
    assert best == [c.meta["uniform"] for c in swept.recommended_per_budget] and best[2] == "W3A8"
    assert result["recommended"] == result["recommended_per_budget"][0]

    # The table a swept search prints: one row per budget, naming the budget that found its candidate.
    console = Console(record=True, width=160)
    print_budget_recommendations(console, swept)
    text = console.export_text()
    assert "best per budget" in text and "avg_wbits <= 8" in text and "avg_wbits <= 3" in text
    assert text.count("#0") >= 2  # budget #0's row, and the budget that found #2's candidate


def _splits(spec):
    from search.spec import load_job_data

    return load_job_data(spec, "fashion-mnist")
