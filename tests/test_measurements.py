"""Measure once, solve any budget: measurement passes keyed by what decides them, split into chunks that any
worker computes, reused by later jobs and by a retried job (search/measurement.py, worker/measurements.py)."""

from __future__ import annotations

import time

import pytest
import torch
from sqlalchemy import select

from search.cost import Budget
from search.data import fashion_mnist_splits
from search.measurement import Measurements
from search.searches import SearchContext, SearchOptions, run_search
from search.searches import sqnr as sqnr_module
from search.simulate import Simulator
from store.db import session_scope
from store.models import Job, MeasurementChunk
from tests.stack import ROOT, Stack
from tests.test_worker_recovery import add_job, add_model, like, settings  # noqa: F401 (a fixture)
from worker import jobs

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"


def _ctx(model, splits, sim, options: SearchOptions | None = None, **params) -> SearchContext:
    options = options or SearchOptions(val_samples=200)
    options = options.model_copy(update={"params": params})
    return SearchContext("sqnr", model, splits, Budget(avg_wbits=3), options, simulator=sim)


# -- the library ----------------------------------------------------------------------------------------


def test_a_pass_split_into_chunks_gives_the_same_tables_as_one_chunk(tiny_model, fmnist, tiny_sim):
    whole = sqnr_module.measure_noise(_ctx(tiny_model, fmnist, tiny_sim, measure_chunks=1))
    ctx = _ctx(tiny_model, fmnist, tiny_sim, measure_chunks=4)
    chunked = sqnr_module.measure_noise(ctx)
    assert ctx.measurements.records[0].chunks == 4
    assert chunked.w_noise == whole.w_noise and chunked.a_noise == whole.a_noise  # exactly


def test_the_key_changes_with_every_field_that_changes_the_measurement(tiny_model, fmnist, tiny_sim):
    def key(ctx, base=None):
        base_w = base or {n: None for n in ctx.layer_names}
        return sqnr_module.damage_pass(ctx, base_w, {n: 8 for n in ctx.layer_names})[0].key

    reference = key(_ctx(tiny_model, fmnist, tiny_sim))
    assert key(_ctx(tiny_model, fmnist, tiny_sim)) == reference  # the same inputs: the same measurement
    other_calibration = fashion_mnist_splits(calib_size=256, seed=1)
    variants = {
        "clip": key(_ctx(tiny_model, fmnist, tiny_sim, SearchOptions(clip="max"))),
        "scheme": key(_ctx(tiny_model, fmnist, tiny_sim, SearchOptions(scheme="pot"))),
        "activation calibration": key(_ctx(tiny_model, fmnist, tiny_sim, SearchOptions(act_calibration="minmax"))),
        "bit choices": key(_ctx(tiny_model, fmnist, tiny_sim, SearchOptions(w_bits=[2, 4, 8]))),
        "images measured": key(_ctx(tiny_model, fmnist, tiny_sim, propagation_samples=32)),
        "fitted widths": key(_ctx(tiny_model, fmnist, tiny_sim, fitted_widths=True)),
        "chunks": key(_ctx(tiny_model, fmnist, tiny_sim, measure_chunks=3)),
        "split seed": key(_ctx(tiny_model, other_calibration, Simulator(tiny_model, other_calibration.calib.inputs))),
        "base config": key(_ctx(tiny_model, fmnist, tiny_sim), {n: 4 for n in tiny_model.layer_nodes}),
    }
    assert reference not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_a_second_budget_in_the_same_process_measures_nothing_again(tiny_model, fmnist, tiny_sim):
    measurements = Measurements()
    options = SearchOptions(val_samples=200, params={"sweep_points": 1, "relinearize": 0})
    first = run_search(
        "sqnr", tiny_model, fmnist, Budget(avg_wbits=3), options, simulator=tiny_sim, measurements=measurements
    )
    second = run_search(
        "sqnr", tiny_model, fmnist, Budget(avg_wbits=2.5), options, simulator=tiny_sim, measurements=measurements
    )
    assert first.measurement[0]["computed"] == first.measurement[0]["chunks"] > 0
    assert second.measurement == [
        {**first.measurement[0], "computed": 0, "reused": first.measurement[0]["chunks"], "seconds": 0.0}
    ]
    assert second.phase_seconds["measure"] < 0.2 * first.phase_seconds["measure"]
    alone = run_search("sqnr", tiny_model, fmnist, Budget(avg_wbits=2.5), options, simulator=tiny_sim)
    assert [c.config for c in second.candidates] == [c.config for c in alone.candidates]


# -- the worker, on a real database (SQLite and PostgreSQL) ------------------------------------------------


def _timings(store_settings, job_id: str) -> dict:
    with session_scope(store_settings.resolved_database_url()) as s:
        job = s.get(Job, job_id)
        assert job.status == "succeeded", job.error
        return job.timings


def test_a_new_budget_reuses_the_stored_measurement_and_a_changed_field_measures_again(
    settings,  # noqa: F811
    tiny_model_path,
):
    settings = like(settings, spread=False)
    model_id = add_model(settings, tiny_model_path)
    options = {"params": {"sweep_points": 1, "relinearize": 0}}
    first = add_job(settings, model_id, "sqnr", {"avg_wbits": 3}, options)
    assert jobs.run_job(settings, first) == "succeeded"
    measured = _timings(settings, first)
    (pass_,) = measured["measurement"]
    assert pass_["computed"] == pass_["chunks"] and pass_["reused"] == 0

    again = add_job(settings, model_id, "sqnr", {"avg_wbits": 2.5}, options)
    assert jobs.run_job(settings, again) == "succeeded"
    reused = _timings(settings, again)
    assert reused["measurement"][0] | {"seconds": 0} == pass_ | {"computed": 0, "reused": pass_["chunks"], "seconds": 0}
    assert reused["phases"]["measure"] < 0.5 and reused["phases"]["solve"] < 2.0

    # The activation calibration was stored by the first job and read by the second (same model and images).
    calibrations = settings.resolved_artifact_dir() / "calibrations"
    assert len(list(calibrations.iterdir())) == 1
    # So were the float model's outputs on the validation images, which every candidate is compared with.
    assert len(list((settings.resolved_artifact_dir() / "references").iterdir())) == 1

    for changed in ({"clip": "max"}, {"seed": 1}):  # the library test above covers every field
        job = add_job(settings, model_id, "sqnr", {"avg_wbits": 2.5}, {**options, **changed})
        assert jobs.run_job(settings, job) == "succeeded"
        (remeasured,) = _timings(settings, job)["measurement"]
        assert remeasured["key"] != pass_["key"] and remeasured["computed"] == remeasured["chunks"], changed
    assert len(list(calibrations.iterdir())) == 2  # another split seed: other calibration images


# -- real worker processes: one search over two workers, and a worker killed mid-measurement -----------------

# Three passes (the first and two relinearisation rounds) of 8 chunks: long enough that the second worker has
# loaded the job (model, data, calibration) before the last pass, even on a busy machine.
SPREAD = {
    "val_samples": 200,
    "calib_size": 128,
    "validate_top_k": 0,
    "params": {"measure_chunks": 8, "sweep_points": 1, "relinearize": 2},
}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("spread"), backend="postgres", heartbeat_s=1, stale_after_s=6, threads=1)
    s.start(workers=2)
    yield s
    s.stop()


def _submit(stack, budget: dict, **changed) -> str:
    options = SPREAD | changed  # validate_top_k 0: no validation holds a worker during the next job
    r = stack.post_job("sqnr", budget, options, RESNET)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _chunks(stack, job_id: str) -> list[MeasurementChunk]:
    with session_scope(stack.database_url) as s:
        keys = [p["key"] for p in (s.get(Job, job_id).timings or {}).get("measurement", [])]
        rows = s.scalars(select(MeasurementChunk).where(MeasurementChunk.measurement_key.in_(keys))).all()
        s.expunge_all()
        return rows


def _configs(stack, job_id: str) -> list[dict]:
    from store.models import CandidateRecord

    with session_scope(stack.database_url) as s:
        return list(
            s.scalars(
                select(CandidateRecord.config).where(CandidateRecord.job_id == job_id).order_by(CandidateRecord.seq)
            )
        )


def test_one_search_spreads_over_two_workers_and_finds_what_one_process_finds(two_workers):
    job_id = _submit(two_workers, {"avg_wbits": 3})
    job = two_workers.wait_job(job_id, timeout=600)
    assert job["status"] == "succeeded", job
    chunks = _chunks(two_workers, job_id)
    assert chunks and all(c.status == "done" and c.runs == 1 for c in chunks)
    assert len({c.worker for c in chunks}) == 2  # both workers computed chunks of this one search

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        from search.model import load_model
        from search.spec import load_job_data, make_spec, run_job

        options = {k: v for k, v in SPREAD.items() if k != "validate_top_k"}
        spec = make_spec(method="sqnr", budget={"avg_wbits": 3}, **options)
        alone = run_job(spec, load_model(RESNET), load_job_data(spec, "fashion-mnist"))
    finally:
        torch.set_num_threads(threads)
    assert _configs(two_workers, job_id) == [c.config.model_dump(mode="json") for c in alone.candidates]


def test_a_worker_killed_mid_measurement_costs_only_the_chunks_it_held(two_workers):
    """The retried job reuses every finished chunk: the chunks computed twice are at most those in flight on the
    killed worker (a new split seed: a measurement nobody has made yet)."""
    import os

    from store.models import MeasurementRecord

    job_id = _submit(two_workers, {"avg_wbits": 3}, seed=1)
    deadline = time.time() + 300
    while True:
        assert time.time() < deadline, "the measurement never got under way"
        with session_scope(two_workers.database_url) as s:
            job = s.get(Job, job_id)
            keys = s.scalars(select(MeasurementRecord.key).where(MeasurementRecord.job_id == job_id)).all()
            states = [
                c.status for c in s.scalars(select(MeasurementChunk).where(MeasurementChunk.measurement_key.in_(keys)))
            ]
            holder = job.worker
        if states.count("done") >= 2 and "pending" in states:
            break
        time.sleep(0.05)
    pid = int(holder.rsplit(":", 1)[1])
    (victim,) = [w for w in two_workers.workers if w.poll() is None and os.getpgid(pid) == w.pid]
    two_workers.kill_worker(victim)
    two_workers.start_worker()  # two again, for the tests after this one
    with session_scope(two_workers.database_url) as s:
        in_flight = s.scalars(
            select(MeasurementChunk).where(
                MeasurementChunk.measurement_key.in_(keys),
                MeasurementChunk.status == "running",
                MeasurementChunk.worker.like(f"%:{pid}"),
            )
        ).all()
    # The other worker's reaper requeues the job once its heartbeat is stale; it then runs there.
    job = two_workers.wait_job(job_id, timeout=600)
    assert job["status"] == "succeeded", job
    chunks = _chunks(two_workers, job_id)
    assert all(c.status == "done" for c in chunks)
    rerun = sum(c.runs - 1 for c in chunks)
    assert rerun <= len(in_flight) <= 1
    with session_scope(two_workers.database_url) as s:
        assert s.get(Job, job_id).attempts == 2


HAQ = {"episodes": 12, "warmup": 4, "batch_episodes": 4, "reward_samples": 128}


def test_haq_episodes_scored_as_passes_are_reused_by_a_rerun_and_match_one_process(
    settings,  # noqa: F811
    tiny_model_path,
    tiny_model,
):
    from search.spec import load_job_data, make_spec, run_job

    settings = like(settings, spread=False)
    model_id = add_model(settings, tiny_model_path)
    options = {"params": HAQ}
    first = add_job(settings, model_id, "haq", {"avg_wbits": 3}, options)
    assert jobs.run_job(settings, first) == "succeeded"
    passes = _timings(settings, first)["measurement"]
    assert {p["kind"] for p in passes} == {"score"} and all(p["computed"] == p["chunks"] for p in passes)
    assert sum(p["chunks"] for p in passes) >= 8  # batches of 4 episodes (repeats scored once) and the final policy

    rerun = add_job(settings, model_id, "haq", {"avg_wbits": 3}, options)  # as a retried attempt runs it again
    assert jobs.run_job(settings, rerun) == "succeeded"
    again = _timings(settings, rerun)["measurement"]
    assert [p["key"] for p in again] == [p["key"] for p in passes]
    assert all(p["computed"] == 0 and p["reused"] == p["chunks"] for p in again)

    spec = make_spec(method="haq", budget={"avg_wbits": 3}, val_samples=200, calib_size=128, params=HAQ)
    alone = run_job(spec, tiny_model, load_job_data(spec, "fashion-mnist"))
    from store.models import CandidateRecord

    with session_scope(settings.resolved_database_url()) as s:
        for job_id in (first, rerun):
            stored = s.scalars(
                select(CandidateRecord.config).where(CandidateRecord.job_id == job_id).order_by(CandidateRecord.seq)
            ).all()
            assert stored == [c.config.model_dump(mode="json") for c in alone.candidates]


def test_haq_scores_a_batch_of_episodes_on_both_workers(two_workers):
    options = SPREAD | {
        # long enough that the second worker has loaded the job before the last batch
        "params": {**HAQ, "episodes": 40, "warmup": 8, "batch_episodes": 8, "reward_samples": 512}
    }
    r = two_workers.post_job("haq", {"avg_wbits": 3}, options, RESNET)
    assert r.status_code == 202, r.text
    job = two_workers.wait_job(r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    chunks = _chunks(two_workers, job["id"])
    assert len(chunks) >= 30 and all(c.status == "done" for c in chunks)
    assert len({c.worker for c in chunks}) == 2  # both workers scored episodes of this one search


def test_a_stored_calibration_gives_the_simulator_it_was_taken_from(tmp_path, tiny_model, fmnist, tiny_sim):
    from search.config import QuantConfig
    from search.measurement import load_calibration, save_calibration

    save_calibration(tiny_sim.stats, tmp_path / "calibration")
    restored = Simulator(tiny_model, fmnist.calib.inputs, stats=load_calibration(tmp_path / "calibration"))
    for calibration in ("mse", "percentile", "minmax"):
        config = QuantConfig.from_bits(
            tiny_model,
            {n: 3 for n in tiny_model.layer_nodes},
            {n: 5 for n in tiny_model.layer_nodes},
            act_calibration=calibration,
        )
        x = fmnist.val.inputs[:300]
        tiny_sim.apply(config)
        expected = tiny_sim.forward(x)
        restored.apply(config)
        assert torch.equal(restored.forward(x), expected), calibration  # bit for bit
    tiny_sim.set_float()
