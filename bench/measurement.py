"""Measurement reuse and spread (docs/benchmarks.md, "Measurement reuse and spread").

    .venv/bin/python bench/measurement.py reuse                      # ResNet-20: jobs A, B, C on SQLite
    .venv/bin/python bench/measurement.py reuse --models resnet18-224 --jobs AC
    .venv/bin/python bench/measurement.py spread --chunks 16 32      # a ResNet-110's first pass, chunk by chunk
    .venv/bin/python bench/measurement.py stack --runs 2             # the same job on 1 and on 2 real workers

reuse   Measure once, solve any budget: job A (avg_wbits 3) on a fresh database, job B (2.5, default options:
        reuses A's first pass, measures its own re-linearisation passes), job C (2.5 with relinearize 0 and
        sweep_points 0: solves from the stored pass only), each through worker.jobs.run_job on a SQLite settings
        object (spread=False), so the database's part counts. Prints each job's search seconds, phase seconds
        and passes (computed / reused).
spread  How one pass spreads: a ResNet-110-style CIFAR ResNet for 1x28x28 (random weights, BatchNorm statistics
        from Fashion-MNIST, exported at batch 1 into a temporary directory), its first sqnr pass computed here
        chunk by chunk (DamageMeter.measure, timed per chunk), the setup a remote worker pays once per job
        (model, data, Simulator, meter), and from those a PROJECTION of the pass's wall time on N workers.
stack   The same job for real on tests/stack.py's Stack (PostgreSQL + Redis, Celery workers with BITSEARCH_THREADS=1),
        once with one worker and once with two: search seconds, measure phase, who computed which chunk.

Each part prints a JSON summary (--out writes it too). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

MODELS = {
    # name: (archive, data source, builtin data?, job options besides the budget)
    "resnet20-fmnist": (ROOT / "models" / "resnet20-fmnist.pt2", "fashion-mnist", {}),
    "resnet18-224": (
        ROOT / "models" / "resnet18-224.pt2",
        ROOT / "models" / "fmnist224.safetensors",
        {"calib_size": 256, "val_samples": 512},
    ),
}
JOBS = {
    "A": ({"avg_wbits": 3}, {}),
    "B": ({"avg_wbits": 2.5}, {}),
    "C": ({"avg_wbits": 2.5}, {"params": {"relinearize": 0, "sweep_points": 0}}),
}
PHASES = ("setup", "measure", "relinearize", "solve", "score", "other")


def machine_load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# -- reuse: jobs A, B, C through worker.jobs.run_job on SQLite ------------------------------------------------


def _store_inputs(settings, archive: Path, data) -> tuple[str, str]:
    """The model (and an uploaded data set) in the artifact store with their rows, as the API stores them."""
    from search.model import load_model
    from store.db import session_scope
    from store.models import DatasetRecord, ModelRecord

    root = settings.resolved_artifact_dir()
    model_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, root / "models" / model_sha)
    loaded = load_model(archive)
    shape = list(loaded.input_shape)
    if isinstance(data, Path):
        dataset_id = hashlib.sha256(data.read_bytes()).hexdigest()
        (root / "datasets").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, root / "datasets" / dataset_id)
        dataset = dict(id=dataset_id, name=data.stem, builtin=False, size_bytes=data.stat().st_size)
        dataset |= dict(num_samples=1024, sample_shape=shape, num_classes=10)
    else:
        dataset_id = data
        dataset = dict(id=data, name=data, builtin=True, num_samples=70000, sample_shape=shape, num_classes=10)
    with session_scope(settings.resolved_database_url()) as s:
        s.merge(
            ModelRecord(
                id=model_sha,
                filename=archive.name,
                size_bytes=archive.stat().st_size,
                num_layers=len(loaded.layers),
                total_params=0,
                input_shape=shape,
                num_outputs=10,
            )
        )
        s.merge(DatasetRecord(**dataset))
    return model_sha, dataset_id


def _add_job(settings, model_id: str, dataset_id: str, budget: dict, options: dict) -> str:
    from store.db import session_scope
    from store.models import Job

    with session_scope(settings.resolved_database_url()) as s:
        job = Job(
            model_id=model_id, dataset_id=dataset_id, method="sqnr", budget=budget, options=options, validate_top_k=0
        )
        s.add(job)
        s.flush()
        return job.id


def _job_row(url: str, job_id: str) -> dict:
    from sqlalchemy import func, select

    from store.db import session_scope
    from store.models import CandidateRecord, Job

    with session_scope(url) as s:
        job = s.get(Job, job_id)
        candidates = s.scalar(select(func.count()).where(CandidateRecord.job_id == job_id))
        wall = queued = None
        if job.started_at is not None and job.finished_at is not None:
            wall = (job.finished_at - job.started_at).total_seconds()
            queued = (job.started_at - job.created_at).total_seconds()
        return {
            "status": job.status,
            "error": job.error,
            "search_seconds": job.search_seconds,
            "started_to_finished_s": wall,
            "created_to_started_s": queued,
            "timings": job.timings,
            "candidates": candidates,
            "best_val_top1": job.best_val_top1,
        }


def run_reuse(args) -> dict:
    from store.db import migrate
    from store.settings import Settings
    from worker import jobs

    out = {"part": "reuse", "threads": args.threads, "load_before": machine_load(), "models": {}}
    for name in args.models:
        archive, data, options = MODELS[name]
        missing = [str(p) for p in (archive, data) if isinstance(p, Path) and not p.exists()]
        if missing:
            print(f"{name}: skipped, missing {', '.join(missing)} (make imagenet-models builds them)", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="bench-measurement-") as tmp:
            settings = Settings(var_dir=Path(tmp) / "var", spread=False, threads=args.threads)
            settings.var_dir.mkdir(parents=True)
            url = settings.resolved_database_url()
            migrate(url)
            model_id, dataset_id = _store_inputs(settings, archive, data)
            rows = {}
            for label in args.jobs:
                budget, extra = JOBS[label]
                job_options = {**options, **extra}
                job_id = _add_job(settings, model_id, dataset_id, budget, job_options)
                started = time.perf_counter()
                status = jobs.run_job(settings, job_id)
                row = _job_row(url, job_id) | {"run_job_wall_s": time.perf_counter() - started, "options": job_options}
                if status != "succeeded":
                    raise RuntimeError(f"{name} job {label}: {status}: {row['error']}")
                rows[label] = row | {"budget": budget}
                print(_reuse_line(name, label, rows[label]), flush=True)
            out["models"][name] = rows
    out["load_after"] = machine_load()
    return out


def _reuse_line(model: str, label: str, row: dict) -> str:
    phases = row["timings"]["phases"]
    passes = row["timings"]["measurement"]
    computed = sum(p["computed"] for p in passes)
    reused = sum(p["reused"] for p in passes)
    return (
        f"{model} job {label} {row['budget']} {row['options']}: search {row['search_seconds']:.2f} s "
        f"(run_job {row['run_job_wall_s']:.2f} s), "
        + ", ".join(f"{k} {phases.get(k, 0.0):.2f}" for k in PHASES)
        + f"; passes {len(passes)}: chunks computed {computed}, reused {reused}; "
        f"candidates {row['candidates']}, best val top-1 {row['best_val_top1']}"
    )


# -- the deep model ------------------------------------------------------------------------------------------


def cifar_resnet(depth: int = 110, num_classes: int = 10) -> nn.Module:
    """He et al.'s CIFAR ResNet of depth 6n+2 for 1x28x28 (ResNet-20 is n=3, ResNet-110 n=18):
    models/architectures.py's ResNet20 with n blocks per stage."""
    from models.architectures import ResNet20

    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n+2, not {depth}")
    return ResNet20(num_classes, blocks_per_stage=(depth - 2) // 6)


@torch.no_grad()
def build_deep_model(depth: int, directory: Path) -> Path:
    """Random weights (seed 0), BatchNorm statistics from 512 Fashion-MNIST training images, exported at batch 1."""
    from search.data import fashion_mnist_splits

    torch.manual_seed(0)
    model = cifar_resnet(depth)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    train = fashion_mnist_splits().train.inputs[:512]
    for i in range(0, len(train), 128):
        model(train[i : i + 128])
    model.eval()
    path = directory / f"resnet{depth}-fmnist.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 1, 28, 28),)), str(path))
    return path


# -- spread: one pass chunk by chunk, and its projection on N workers -----------------------------------------


def _worker_setup(path: Path, spec):
    """What a remote worker builds once per job before it claims a chunk (worker.jobs.run_measure_chunks):
    the model, the data splits, the Simulator (activation calibration), the search context and its meter."""
    from search.model import load_model
    from search.searches.base import SearchContext
    from search.simulate import Simulator
    from search.spec import load_job_data

    seconds = {}
    t = time.perf_counter()
    model = load_model(path)
    seconds["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    splits = load_job_data(spec, "fashion-mnist")
    seconds["load_data"] = time.perf_counter() - t
    t = time.perf_counter()
    sim = Simulator(model, splits.calib.inputs)
    seconds["simulator"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx = SearchContext("sqnr", model, splits, spec.budget, spec.search_options(), simulator=sim)
    ctx.measurement_identity()
    ctx.damage_meter()
    seconds["meter"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    return model, splits, sim, seconds


def project(chunk_seconds: list[float], reference_s: float, setup_s: float, workers: int) -> dict:
    """The pass's wall time on `workers` processes: chunks longest first, each to the worker that would finish it
    first. The job's own worker starts at once; every other one first pays `setup_s`. Each worker pays the float
    and base-config runs (`reference_s`) before its first chunk. Database round trips are not counted."""
    finish = [None] * workers  # None: no chunk yet
    for c in sorted(chunk_seconds, reverse=True):

        def done(w: int) -> float:
            start = finish[w] if finish[w] is not None else (0.0 if w == 0 else setup_s) + reference_s
            return start + c

        best = min(range(workers), key=lambda w: (done(w), w))
        finish[best] = done(best)
    used = [f for f in finish if f is not None]
    return {"workers": workers, "used": len(used), "wall_s": max(used)}


def run_spread(args) -> dict:
    from search.quant.activation import FLOAT_ACT_BITS
    from search.searches.base import SearchContext
    from search.searches.sqnr import damage_pass
    from search.spec import make_spec

    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = {"part": "spread", "threads": args.threads, "depth": args.depth, "load_before": machine_load()}
    with tempfile.TemporaryDirectory(prefix="bench-measurement-") as tmp:
        path = build_deep_model(args.depth, Path(tmp))
        spec = make_spec(method="sqnr", budget={"avg_wbits": 3}, params={"measure_chunks": args.chunks[0]})
        model, splits, sim, setup = _worker_setup(path, spec)
        out["setup_s"] = setup
        out["layers"] = len(model.layers)
        print(f"ResNet-{args.depth}: {len(model.layers)} quantizable layers; worker setup {setup}", flush=True)
        out["passes"] = {}
        for count in args.chunks:
            spec = make_spec(method="sqnr", budget={"avg_wbits": 3}, params={"measure_chunks": count})
            ctx = SearchContext("sqnr", model, splits, spec.budget, spec.search_options(), simulator=sim)
            top_a = max(spec.a_bits)  # the first pass's base, as sqnr.measure_noise sets it
            base_a = {n: None if top_a >= FLOAT_ACT_BITS else top_a for n in ctx.layer_names}
            p, fit = damage_pass(ctx, {n: None for n in ctx.layer_names}, base_a)
            meter = ctx.damage_meter()
            seconds = []
            for i in range(len(p.chunks)):
                t = time.perf_counter()
                meter.measure(p, i)
                seconds.append(time.perf_counter() - t)
            t = time.perf_counter()
            meter.measure(p, 0)  # again, with the float and base runs kept: what chunk 0 costs without them
            again = time.perf_counter() - t
            meter.release()
            reference = max(seconds[0] - again, 0.0)
            chunk_costs = [again] + seconds[1:]
            projection = [project(chunk_costs, reference, setup["total"], n) for n in args.workers]
            # and what the same chunks would give if a helping worker had nothing to rebuild (a lower bound)
            no_setup = [project(chunk_costs, reference, 0.0, n) for n in args.workers]
            for row in projection + no_setup:
                row["speedup"] = sum(seconds) / row["wall_s"]  # against one process computing every chunk
            out["passes"][count] = {
                "chunks": len(p.chunks),
                "layers_per_chunk": [len(c) for c in p.chunks],
                "samples": p.samples,
                "w_widths": p.w_widths,
                "a_widths": p.a_widths,
                "fitted_widths": fit,
                "chunk_seconds": seconds,
                "reference_s": reference,
                "pass_s": sum(seconds),
                "projection": projection,
                "projection_without_setup": no_setup,
            }
            print(
                f"{count} chunks ({p.samples} images, widths {p.w_widths}): pass {sum(seconds):.1f} s, "
                f"float+base runs {reference:.2f} s, chunks {min(chunk_costs):.2f}..{max(chunk_costs):.2f} s "
                f"(median {statistics.median(chunk_costs):.2f})",
                flush=True,
            )
            for row, bare in zip(projection, no_setup):
                print(
                    f"   N={row['workers']:>2}: {row['wall_s']:.1f} s, speedup {row['speedup']:.2f} "
                    f"(without the helpers' setup: {bare['wall_s']:.1f} s, {bare['speedup']:.2f})",
                    flush=True,
                )
    out["load_after"] = machine_load()
    return out


# -- stack: the same job on one and on two real workers ----------------------------------------------------------


def _wait_workers(stack, count: int, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(httpx.get(f"{stack.url}/health", timeout=5).json().get("workers", [])) >= count:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {count} workers came up")


def _stack_job(stack, path: Path, options: dict) -> dict:
    from sqlalchemy import select

    from store.db import session_scope
    from store.models import MeasurementChunk

    submitted = time.perf_counter()
    r = stack.post_job("sqnr", {"avg_wbits": 3}, options, path)
    if r.status_code != 202:
        raise RuntimeError(f"POST /jobs: {r.status_code} {r.text}")
    job_id = r.json()["id"]
    job = stack.wait_job(job_id, timeout=900)
    wall = time.perf_counter() - submitted
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id}: {job}")
    row = _job_row(stack.database_url, job_id)
    keys = [p["key"] for p in row["timings"]["measurement"]]
    with session_scope(stack.database_url) as s:
        chunks = s.scalars(
            select(MeasurementChunk)
            .where(MeasurementChunk.measurement_key.in_(keys))
            .order_by(MeasurementChunk.measurement_key, MeasurementChunk.index)
        ).all()
        row["chunks"] = [{"index": c.index, "worker": c.worker, "seconds": c.seconds, "runs": c.runs} for c in chunks]
    return row | {"submit_to_done_s": wall}


def run_stack(args) -> dict:
    from tests.stack import Stack

    options = {
        "validate_top_k": 0,  # no validation task after a job, which would hold a worker during the next one
        "val_samples": args.val_samples,
        "params": {"measure_chunks": args.chunks[0], "sweep_points": 0, "relinearize": args.relinearize},
    }
    out = {"part": "stack", "depth": args.depth, "options": options, "load_before": machine_load(), "workers": {}}
    with tempfile.TemporaryDirectory(prefix="bench-measurement-") as tmp:
        if args.keep is not None:  # the stacks' logs and files outlive the run
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        path = build_deep_model(args.depth, Path(tmp))
        for count in (1, 2):
            stack = Stack(Path(tmp) / f"stack{count}", backend="postgres", threads=1)
            try:
                stack.start(workers=count)
                _wait_workers(stack, count)
                runs = []
                for seed in range(args.runs):  # a new split seed per run: a pass nobody has measured yet
                    row = _stack_job(stack, path, {**options, "seed": seed})
                    phases = row["timings"]["phases"]
                    by_worker: dict[str, int] = {}
                    for c in row["chunks"]:
                        by_worker[c["worker"]] = by_worker.get(c["worker"], 0) + 1
                    row["chunks_by_worker"] = by_worker
                    runs.append(row)
                    print(
                        f"{count} worker(s), seed {seed}: search {row['search_seconds']:.1f} s, measure "
                        f"{phases.get('measure', 0):.1f} s, setup {phases.get('setup', 0):.1f} s, submit to done "
                        f"{row['submit_to_done_s']:.1f} s; chunks per worker {sorted(by_worker.values())}; "
                        f"load {machine_load()}",
                        flush=True,
                    )
                out["workers"][count] = {
                    "runs": runs,
                    "median_search_s": statistics.median(r["search_seconds"] for r in runs),
                    "median_measure_s": statistics.median(r["timings"]["phases"].get("measure", 0) for r in runs),
                    "median_submit_to_done_s": statistics.median(r["submit_to_done_s"] for r in runs),
                }
            finally:
                stack.stop()
    one, two = out["workers"][1], out["workers"][2]
    out["ratio_measure"] = one["median_measure_s"] / two["median_measure_s"]
    out["ratio_search"] = one["median_search_s"] / two["median_search_s"]
    print(f"1 -> 2 workers: measure phase {out['ratio_measure']:.2f}x, search {out['ratio_search']:.2f}x", flush=True)
    out["load_after"] = machine_load()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("reuse", "spread", "stack"))
    parser.add_argument("--models", nargs="+", default=["resnet20-fmnist"], choices=list(MODELS), help="reuse")
    parser.add_argument("--jobs", default="ABC", help="reuse: which of jobs A, B, C to run, in order")
    parser.add_argument("--depth", type=int, default=110, help="spread, stack: the CIFAR ResNet's depth (6n+2)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32], help="spread, stack: measure_chunks")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads: reuse, the worker setting BITSEARCH_THREADS (default 0: torch's default, one per core); "
        "spread, default 1 (as the stack's workers run)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="spread: N projected")
    parser.add_argument("--runs", type=int, default=2, help="stack: jobs per worker count (split seeds 0, 1, ...)")
    parser.add_argument("--val-samples", type=int, default=500, help="stack: validation images")
    parser.add_argument("--relinearize", type=int, default=0, help="stack: re-linearisation rounds")
    parser.add_argument("--keep", type=Path, help="stack: keep the stacks' files and logs in this directory")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 0 if args.part == "reuse" else 1
    if set(args.jobs) - set(JOBS):
        parser.error(f"--jobs takes letters of {''.join(JOBS)}")
    result = {"reuse": run_reuse, "spread": run_spread, "stack": run_stack}[args.part](args)
    result["command"] = " ".join(sys.argv)
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
