"""What a worker does with a job, apart from Celery: claim it, run the search, store candidates as they
come, keep a heartbeat, honour cancellation, finish or fail with a reason, and queue validations.

Every step is idempotent. A job is claimed with a conditional UPDATE, so two deliveries of the same message
cannot both run it; a rerun after a crash first deletes the candidates of the dead attempt, and (job_id, seq)
is unique, so no candidate is stored twice.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, or_, select, update

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import FINAL_STATES, CandidateRecord, DatasetRecord, Job, ModelRecord, ValidationRecord
from store.settings import Settings

log = logging.getLogger("bitsearch.worker")


class JobCancelled(Exception):
    pass


class JobTimedOut(Exception):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything we store is UTC.
    return None if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)


def worker_name() -> str:
    import os
    return f"{socket.gethostname()}:{os.getpid()}"


def write(url: str, fn, tries: int = 6) -> None:
    """Run fn(session) in a transaction, retrying while the database connection is being re-established
    (a dropped connection or a restarting server should not fail a search that is otherwise fine)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    for attempt in range(tries):
        try:
            with session_scope(url) as s:
                fn(s)
            return
        except (OperationalError, InterfaceError) as e:  # connection-level; other errors are real bugs
            if attempt == tries - 1:
                raise
            log.warning("database write failed (%s); retrying", type(e.orig).__name__ if e.orig else e)
            time.sleep(min(8.0, 0.5 * 2 ** attempt))


# -- claiming -------------------------------------------------------------------------------------------

def claim_job(settings: Settings, job_id: str, me: str) -> bool:
    """Take the job if it is queued; fail it when it has been lost too often. False: nothing to do here."""
    url = settings.resolved_database_url()
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        if job is None or job.status in FINAL_STATES:
            return False
        if job.cancel_requested:
            _finish(s, job_id, "cancelled", None)
            return False
        if job.status == "running":
            return False  # another worker holds it; the reaper requeues it if that worker dies
        if job.attempts >= settings.max_attempts:
            _finish(s, job_id, "failed", f"the job was interrupted {job.attempts} times (worker lost); giving up")
            return False
        now = utcnow()
        claimed = s.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", worker=me, attempts=Job.attempts + 1, heartbeat_at=now,
                    started_at=now, step=0, total=0, phase="starting", best_val_top1=None, error=None)
        ).rowcount
        if claimed != 1:
            return False
        # A rerun after a crash starts over (searches are seeded, so it finds the same candidates).
        s.execute(delete(CandidateRecord).where(CandidateRecord.job_id == job_id))
    return True


def _finish(s, job_id: str, status: str, error: str | None, **values) -> None:
    s.execute(update(Job).where(Job.id == job_id, Job.status.notin_(FINAL_STATES))
              .values(status=status, error=error, finished_at=utcnow(), **values))


class Heartbeat:
    """Refreshes the job's heartbeat from a thread and notices cancellation requests."""

    def __init__(self, settings: Settings, job_id: str, me: str):
        self.url = settings.resolved_database_url()
        self.job_id, self.me, self.interval = job_id, me, settings.heartbeat_s
        self.cancelled = threading.Event()
        # The time limit is enforced here and checked at every search step: Celery's soft limit raises inside
        # whatever code is running, and library code (torch's loader) can swallow it.
        self.deadline = time.monotonic() + settings.task_time_limit_s
        self.timed_out = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        with session_scope(self.url) as s:
            s.execute(update(Job).where(Job.id == self.job_id, Job.worker == self.me, Job.status == "running")
                      .values(heartbeat_at=utcnow()))
            if s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                self.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() > self.deadline:
                self.timed_out.set()
            try:
                self.beat()
            except Exception as e:  # a dropped connection must not kill the search; the next beat retries
                log.warning("heartbeat for job %s failed: %s", self.job_id, e)


# -- running ----------------------------------------------------------------------------------------------

def load_job_inputs(settings: Settings, job: Job, model: ModelRecord, dataset: DatasetRecord):
    from search.data import load_dataset_file, load_splits, splits_from_set
    from search.model import load_model

    store = ArtifactStore(settings.resolved_artifact_dir())
    loaded = load_model(store.path("models", model.id), max_bytes=settings.max_model_bytes,
                        max_layers=settings.max_layers)
    calib_size = int(job.options.get("calib_size", 1024))
    seed = int(job.options.get("seed", 0))
    if dataset.builtin:
        splits = load_splits(dataset.id, calib_size=calib_size)
    else:
        data = load_dataset_file(store.path("datasets", dataset.id), max_bytes=settings.max_dataset_bytes)
        splits = splits_from_set(dataset.name, data, calib_size=calib_size, seed=seed)
    return loaded, splits


def search_options(job: Job):
    from search.searches import SearchOptions

    opts = {k: v for k, v in job.options.items() if k not in ("calib_size",)}
    return SearchOptions(**opts)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def run_job(settings: Settings, job_id: str) -> str:
    """Run a claimed job to its end; returns the final status."""
    import torch

    from search.cost import Budget
    from search.searches import run_search

    if settings.threads:
        torch.set_num_threads(settings.threads)
    url = settings.resolved_database_url()
    me = worker_name()
    if not claim_job(settings, job_id, me):
        return "skipped"
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        model_rec, data_rec = s.get(ModelRecord, job.model_id), s.get(DatasetRecord, job.dataset_id)
        s.expunge_all()

    seq = 0
    last_write = 0.0

    with Heartbeat(settings, job_id, me) as hb:
        def check_cancel() -> None:
            if hb.cancelled.is_set():
                raise JobCancelled()
            if hb.timed_out.is_set() or time.monotonic() > hb.deadline:
                raise JobTimedOut()

        def on_candidate(c) -> None:
            nonlocal seq
            record = dict(
                job_id=job_id, seq=seq, config=c.config.model_dump(mode="json"),
                avg_wbits=c.cost.avg_wbits, weight_bytes=c.cost.weight_bytes, bitops=float(c.cost.bitops),
                act_bytes=c.cost.act_bytes, latency_us=c.cost.latency_us, score=_finite(c.score) or 0.0,
                val_top1=c.val_top1, val_sqnr_db=_finite(c.val_sqnr_db), meta=_jsonable(c.meta))

            def insert(s) -> None:
                # A retry after a lost commit acknowledgement must not store the candidate twice.
                if s.scalar(select(CandidateRecord.id).where(CandidateRecord.job_id == job_id,
                                                             CandidateRecord.seq == record["seq"])) is None:
                    s.add(CandidateRecord(**record))

            write(url, insert)
            seq += 1
            check_cancel()

        def on_progress(p) -> None:
            nonlocal last_write
            check_cancel()
            now = time.monotonic()
            if now - last_write < 0.5 and p.step < p.total:
                return  # the database does not need every step
            last_write = now
            write(url, lambda s: s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(
                step=p.step, total=p.total, phase=p.phase[:64], heartbeat_at=utcnow(),
                best_val_top1=None if p.best is None else p.best.val_top1)))

        started = time.perf_counter()
        try:
            _set_phase(url, job_id, "loading model and data")
            model, splits = load_job_inputs(settings, job, model_rec, data_rec)
            check_cancel()
            latency = _latency_table(settings, job, model)
            result = run_search(job.method, model, splits, Budget(**job.budget), search_options(job),
                                on_progress=on_progress, latency=latency, on_candidate=on_candidate)
        except JobCancelled:
            with session_scope(url) as s:
                _finish(s, job_id, "cancelled", "cancelled by request", search_seconds=time.perf_counter() - started)
            return "cancelled"
        except Exception as e:
            reason = _reason(e, settings)
            log.exception("job %s failed", job_id)
            with session_scope(url) as s:
                _finish(s, job_id, "failed", reason, search_seconds=time.perf_counter() - started)
            return "failed"

    # The Pareto flags are known only at the end; candidates were stored in the order the search found them.
    flags = {i: (c.pareto, c is result.recommended) for i, c in enumerate(result.candidates)}
    with session_scope(url) as s:
        for rec in s.scalars(select(CandidateRecord).where(CandidateRecord.job_id == job_id)):
            rec.pareto, rec.recommended = flags.get(rec.seq, (False, False))
        best = result.recommended
        _finish(s, job_id, "succeeded", None, search_seconds=result.seconds, step=Job.total,
                best_val_top1=None if best is None else best.val_top1, phase="done")
    queue_validations(settings, job_id)
    return "succeeded"


def _set_phase(url: str, job_id: str, phase: str) -> None:
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(phase=phase))


def _latency_table(settings: Settings, job: Job, model):
    """The table a latency budget needs: the stored one for this model and machine, else measured now."""
    if job.budget.get("latency_us") is None:
        return None
    from search.cost import LatencyTable

    from store.models import LatencyTableRecord
    machine = socket.gethostname()
    url = settings.resolved_database_url()
    with session_scope(url) as s:
        rec = s.scalar(select(LatencyTableRecord).where(LatencyTableRecord.model_id == job.model_id,
                                                        LatencyTableRecord.machine == machine))
        if rec is not None:
            return LatencyTable(rec.table["layers"], rec.table.get("machine", machine))
    from kernels.latency import measure_latency_table

    _set_phase(url, job.id, "measuring kernel latencies")
    opts = search_options(job)
    table = measure_latency_table(model, w_bits=opts.w_bits, a_bits=[b for b in opts.a_bits if b <= 8] or [8])
    with session_scope(url) as s:
        s.add(LatencyTableRecord(model_id=job.model_id, machine=machine,
                                 table={"machine": table.machine, "layers": table.layers}))
    return table


def _reason(e: BaseException, settings: Settings) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    chain, cause = [], e
    while cause is not None and len(chain) < 16:  # a limit can strike inside code that wraps the exception
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, (SoftTimeLimitExceeded, JobTimedOut)) for c in chain):
        return f"the search exceeded the time limit of {settings.task_time_limit_s} s"
    # torch reports a failed allocation as RuntimeError from its CPU allocator, Python as MemoryError.
    if any(isinstance(c, MemoryError) or (isinstance(c, RuntimeError) and "can't allocate memory" in str(c))
           for c in chain):
        return f"the search ran out of memory (limit {settings.worker_max_memory_mb} MB per task)"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the artifact store is full (no space left on device)"
    if isinstance(e, ValueError):  # our input errors: bad model, data set, budget, options
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


def _jsonable(meta: dict) -> dict:
    import json

    try:
        json.dumps(meta)
        return meta
    except TypeError:
        return {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool, type(None)))}


# -- validation -----------------------------------------------------------------------------------------

def kernels_available() -> bool:
    try:
        import kernels.validate  # noqa: F401  (loads, and on first use builds, the compiled kernels)
    except Exception:  # noqa: BLE001  (a failed build raises RuntimeError, not ImportError)
        log.warning("low-bit kernels unavailable; candidates will not be validated", exc_info=True)
        return False
    return True


def queue_validations(settings: Settings, job_id: str) -> list[int]:
    """Create validation rows for the job's best Pareto candidates and queue them (once per candidate)."""
    if not kernels_available():
        return []  # candidates then show "not validated yet"
    from worker.celery_app import VALIDATE_TASK, app

    url = settings.resolved_database_url()
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        front = s.scalars(select(CandidateRecord).where(CandidateRecord.job_id == job_id,
                                                        CandidateRecord.pareto.is_(True))).all()
        front.sort(key=lambda c: -(c.val_top1 if c.val_top1 is not None else (c.val_sqnr_db or -1e9)))
        chosen = front[: job.validate_top_k]
        ids = []
        for c in chosen:
            if c.validation is None:
                s.add(ValidationRecord(candidate_id=c.id, status="queued"))
            ids.append(c.id)
    for cid in ids:
        app.send_task(VALIDATE_TASK, args=[cid], queue=settings.queue)
    return ids


def run_validation(settings: Settings, candidate_id: int) -> str:
    from kernels.validate import validate
    from search.config import QuantConfig

    url = settings.resolved_database_url()
    with session_scope(url) as s:
        claimed = s.execute(
            update(ValidationRecord).where(ValidationRecord.candidate_id == candidate_id,
                                           ValidationRecord.status.in_(("queued", "running", "failed")))
            .values(status="running", error=None)).rowcount
        if claimed != 1:
            return "skipped"
        cand = s.get(CandidateRecord, candidate_id)
        job = s.get(Job, cand.job_id)
        model_rec, data_rec = s.get(ModelRecord, job.model_id), s.get(DatasetRecord, job.dataset_id)
        config_dict = cand.config
        s.expunge_all()
    try:
        model, splits = load_job_inputs(settings, job, model_rec, data_rec)
        config = QuantConfig.model_validate(config_dict)
        config.check_against(model)
        evalset = splits.test if splits.test is not None else splits.val
        if evalset.labels is None:
            raise ValueError("validation needs labelled data")
        evalset = evalset.subset(slice(0, settings.validate_samples))
        report = validate(model, config, evalset.inputs, evalset.labels, splits.calib.inputs)
        packed = report.packed
        import tempfile
        from pathlib import Path

        store = ArtifactStore(settings.resolved_artifact_dir())
        with tempfile.TemporaryDirectory() as tmp:
            packed.save(Path(tmp))
            final = store.put_dir("packed", f"candidate-{candidate_id}", Path(tmp))
        r = report.to_dict()
        with session_scope(url) as s:
            s.execute(update(ValidationRecord).where(ValidationRecord.candidate_id == candidate_id).values(
                status="succeeded", top1=r.get("top1"), sim_top1=r.get("sim_top1"), agreement=r.get("agreement"),
                max_logit_diff=r.get("max_logit_diff"), samples=r.get("samples", len(evalset)),
                packed_bytes=r.get("packed_bytes"), latency_us={str(k): v for k, v in r.get("latency_us", {}).items()},
                threads=r.get("threads"), isa=r.get("isa"), packed_path=str(final)))
        return "succeeded"
    except Exception as e:
        log.exception("validation of candidate %s failed", candidate_id)
        with session_scope(url) as s:
            s.execute(update(ValidationRecord).where(ValidationRecord.candidate_id == candidate_id)
                      .values(status="failed", error=_reason(e, settings)))
        return "failed"


# -- recovery -------------------------------------------------------------------------------------------

def announce_worker(settings: Settings, name: str) -> None:
    from store.models import WorkerRecord

    with session_scope(settings.resolved_database_url()) as s:
        s.merge(WorkerRecord(name=name, last_seen=utcnow()))


def reap_orphans(settings: Settings) -> list[str]:
    """Requeue jobs whose worker died (stale heartbeat) and jobs whose queue message was lost.

    Sending a job twice is harmless: the claim lets only one delivery run it.
    """
    from worker.celery_app import SEARCH_TASK, VALIDATE_TASK, app

    url = settings.resolved_database_url()
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    with session_scope(url) as s:
        stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)
        # A job whose worker died after its time limit was killed for it (Celery's hard limit): fail it.
        overdue = now - timedelta(seconds=settings.task_time_limit_s)
        for jid in s.scalars(select(Job.id).where(Job.status == "running", stale, Job.started_at < overdue)).all():
            _finish(s, jid, "failed", f"the search exceeded the time limit of {settings.task_time_limit_s} s")
        lost = s.scalars(select(Job.id).where(Job.status == "running", stale)).all()
        waiting = s.scalars(select(Job.id).where(Job.status == "queued", stale)).all()
        for jid in lost:
            s.execute(update(Job).where(Job.id == jid, Job.status == "running", stale)
                      .values(status="queued", phase="requeued: its worker stopped responding", worker=None,
                              heartbeat_at=now))
        # A queued job's heartbeat_at is when it was last sent; resend in case the broker lost the message.
        for jid in waiting:
            s.execute(update(Job).where(Job.id == jid).values(heartbeat_at=now))
        v_cutoff = now - timedelta(seconds=settings.validate_time_limit_s + settings.stale_after_s)
        validations = s.scalars(select(ValidationRecord.candidate_id).where(
            ValidationRecord.status.in_(("queued", "running")), ValidationRecord.updated_at < v_cutoff)).all()
        for cid in validations:
            s.execute(update(ValidationRecord).where(ValidationRecord.candidate_id == cid).values(status="queued"))
    for jid in [*lost, *waiting]:
        app.send_task(SEARCH_TASK, args=[jid], queue=settings.queue)
    for cid in validations:
        app.send_task(VALIDATE_TASK, args=[cid], queue=settings.queue)
    return [*lost, *waiting]
