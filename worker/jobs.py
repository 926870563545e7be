"""What a worker does with a job, apart from Celery: claim it, run the search, store candidates as they
come, keep a heartbeat, honour cancellation, finish or fail with a reason, and queue validations.

Every step is idempotent. A job is claimed with a conditional UPDATE, so two deliveries of the same message
cannot both run it; a rerun after a crash first deletes the candidates of the dead attempt, and (job_id, seq)
is unique, so no candidate is stored twice.

A claim is fenced: every later write of the run (candidate, progress, heartbeat, finish) is conditional on the
job still being running under this worker and this attempt number. A worker the reaper gave up on (its
heartbeat went stale: a long pause, a network partition) may still be alive; at its next write it finds the
job gone, and stops without touching it. Validations are claimed and fenced the same way (see ValidationLease).
"""

from __future__ import annotations

import errno
import logging
import math
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from sqlalchemy import and_, delete, or_, select, update

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import (
    FINAL_STATES,
    CandidateRecord,
    DatasetRecord,
    Job,
    JobStatus,
    MeasurementRecord,
    ModelRecord,
    ValidationRecord,
    ValidationStatus,
)
from store.settings import Settings

log = logging.getLogger("bitsearch.worker")

ROOT = Path(__file__).resolve().parent.parent


class JobCancelled(Exception):
    pass


class JobTimedOut(Exception):
    pass


class JobLost(Exception):
    """This worker no longer holds the job: the reaper requeued it (another worker may be running it now), or
    it was finished elsewhere. The run ends here and leaves the job alone."""


class ValidationLost(Exception):
    """As JobLost, for a validation: its lease was taken over or requeued."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything we store is UTC.
    return None if t is None or t.tzinfo else t.replace(tzinfo=UTC)


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
            time.sleep(min(8.0, 0.5 * 2**attempt))


# -- claiming -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One worker's hold on one attempt of a job: the fencing token every write of the run carries."""

    job_id: str
    worker: str
    attempt: int

    def holds(self):
        return and_(
            Job.id == self.job_id,
            Job.attempts == self.attempt,
            Job.worker == self.worker,
            Job.status == JobStatus.RUNNING,
        )


def fenced(s, claim: Claim, **values) -> None:
    """The first statement of every write a running job makes: update the job only while the claim holds.

    Being an UPDATE of the job's row, it also orders the rest of the transaction before any requeue or claim
    of the job (PostgreSQL holds the row lock until commit; SQLite the database write lock), so a candidate
    inserted after this check cannot outlive a reclaim, whose first act is to delete the candidates.
    """
    values.setdefault("heartbeat_at", utcnow())
    if s.execute(update(Job).where(claim.holds()).values(**values)).rowcount != 1:
        raise JobLost(f"job {claim.job_id} attempt {claim.attempt} is no longer held by {claim.worker}")


def claim_job(settings: Settings, job_id: str, me: str) -> Claim | None:
    """Take the job if it is queued; fail it when it has been lost too often. None: nothing to do here."""
    url = settings.resolved_database_url()
    now = utcnow()
    with session_scope(url) as s:
        # The claim is the transaction's first statement, and reads come after it: on SQLite a transaction that
        # reads before it writes fails at once ("database is locked") if another connection commits in between.
        claimed = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.QUEUED,
                Job.cancel_requested.is_(False),
                Job.attempts < settings.max_attempts,
            )
            .values(
                status=JobStatus.RUNNING,
                worker=me,
                attempts=Job.attempts + 1,
                heartbeat_at=now,
                started_at=now,
                step=0,
                total=0,
                phase="starting",
                best_val_top1=None,
                error=None,
            )
        ).rowcount
        if claimed == 1:
            # Read inside the claiming transaction: the row is ours until commit, so this is our attempt number.
            attempt = s.scalar(select(Job.attempts).where(Job.id == job_id))
            # A rerun after a crash starts over (searches are seeded, so it finds the same candidates).
            s.execute(delete(CandidateRecord).where(CandidateRecord.job_id == job_id))
            return Claim(job_id, me, int(attempt))
        # Not claimable: finished, running under another worker (the reaper requeues it if that worker dies),
        # or queued but cancelled or lost too often, which is decided here.
        job = s.get(Job, job_id)
        if job is not None and job.status == JobStatus.QUEUED:
            if job.cancel_requested:
                _finish(s, job_id, JobStatus.CANCELLED, "cancelled by request")
            elif job.attempts >= settings.max_attempts:
                _finish(
                    s,
                    job_id,
                    JobStatus.FAILED,
                    f"the job was interrupted {job.attempts} times (worker lost); giving up",
                )
    return None


def _finish(s, job_id: str, status: str, error: str | None, **values) -> None:
    """Finish a job that no worker holds (claim-time decisions and the reaper); a held job uses finish_job."""
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.notin_(FINAL_STATES))
        .values(status=status, error=error, finished_at=utcnow(), **values)
    )


class _Beating:
    """A thread that calls `_tick` every `interval` seconds while the `with` block runs, until `_tick` says stop."""

    def __init__(self, interval: float, name: str):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self._tick() is False:
                return

    def _tick(self) -> bool:
        raise NotImplementedError


class Heartbeat(_Beating):
    """Refreshes the job's heartbeat from a thread and notices cancellation requests and a lost claim."""

    def __init__(self, settings: Settings, claim: Claim):
        super().__init__(settings.heartbeat_s, f"heartbeat-{claim.job_id}")
        self.url = settings.resolved_database_url()
        self.claim, self.job_id = claim, claim.job_id
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        # The time limit is enforced here and checked at every search step: Celery's soft limit raises inside
        # whatever code is running, and library code (torch's loader) can swallow it.
        self.deadline = time.monotonic() + settings.task_time_limit_s
        self.timed_out = threading.Event()

    def beat(self) -> None:
        try:
            with session_scope(self.url) as s:
                fenced(s, self.claim)
                if s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                    self.cancelled.set()
        except JobLost:
            self.lost.set()

    def check(self) -> None:
        """Called at every step of the search: stop it when the job was lost, cancelled or ran out of time."""
        if self.lost.is_set():
            raise JobLost(f"job {self.job_id} attempt {self.claim.attempt} was taken from {self.claim.worker}")
        if self.cancelled.is_set():
            raise JobCancelled()
        if self.timed_out.is_set() or time.monotonic() > self.deadline:
            raise JobTimedOut()

    def _tick(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out.set()
        try:
            self.beat()
        except Exception as e:  # a dropped connection must not kill the search; the next beat retries
            log.warning("heartbeat for job %s failed: %s", self.job_id, e)
        return not self.lost.is_set()


# -- running ----------------------------------------------------------------------------------------------


def job_spec(job: Job):
    """The typed spec the job was submitted with (api/services/jobs.py stored spec.job_options())."""
    from search.spec import JobSpec

    return JobSpec.from_job(job.method, job.budget, job.options)


def load_job_inputs(settings: Settings, job: Job, model: ModelRecord, dataset: DatasetRecord):
    """The model and the data splits of a job, by the same function the CLI uses (search.spec.load_job_data):
    the spec's seed and calibration size choose the calibration images, for built-in and uploaded data alike."""
    from search.model import load_model
    from search.spec import load_job_data

    store = ArtifactStore(settings.resolved_artifact_dir())
    loaded = load_model(
        store.path("models", model.id), max_bytes=settings.max_model_bytes, max_layers=settings.max_layers
    )
    source = dataset.id if dataset.builtin else store.path("datasets", dataset.id)
    splits = load_job_data(job_spec(job), source, name=dataset.name, max_bytes=settings.max_dataset_bytes)
    return loaded, splits


def calibrated_simulator(settings: Settings, model, splits):
    """The job's simulator, with its activation calibration read from the artifact store when a job on the same
    model and calibration images made it before (search.measurement.calibration_key), else made and kept:
    calibrating is the one step a job on a measured model would otherwise repeat."""

    from search.measurement import calibration_key, load_calibration, save_calibration
    from search.simulate import Simulator

    store = ArtifactStore(settings.resolved_artifact_dir())
    path = store.path("calibrations", calibration_key(model.sha256, splits.calib.inputs))
    if path.exists():
        try:
            return Simulator(model, splits.calib.inputs, stats=load_calibration(path))
        except Exception as e:  # a damaged file: calibrate again and replace it
            log.warning("stored calibration %s unreadable (%s); calibrating again", path.name, e)
    sim = Simulator(model, splits.calib.inputs)
    store.write("calibrations", path.name, lambda tmp: save_calibration(sim.stats, tmp))
    return sim


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def store_candidate(url: str, claim: Claim, seq: int, c) -> None:
    """Store the search's candidate number `seq`, if the claim still holds (JobLost otherwise)."""
    record = dict(
        job_id=claim.job_id,
        seq=seq,
        config=c.config.model_dump(mode="json"),
        avg_wbits=c.cost.avg_wbits,
        weight_bytes=c.cost.weight_bytes,
        bitops=float(c.cost.bitops),
        act_bytes=c.cost.act_bytes,
        latency_us=c.cost.latency_us,
        score=_finite(c.score) or 0.0,
        val_top1=c.val_top1,
        val_sqnr_db=_finite(c.val_sqnr_db),
        meta=_jsonable(c.meta),
    )

    def insert(s) -> None:
        fenced(s, claim)
        # A retry after a lost commit acknowledgement must not store the candidate twice.
        if (
            s.scalar(
                select(CandidateRecord.id).where(CandidateRecord.job_id == claim.job_id, CandidateRecord.seq == seq)
            )
            is None
        ):
            s.add(CandidateRecord(**record))

    write(url, insert)


def store_progress(url: str, claim: Claim, p) -> None:
    write(
        url,
        lambda s: fenced(
            s,
            claim,
            step=p.step,
            total=p.total,
            phase=p.phase[:64],
            best_val_top1=None if p.best is None else p.best.val_top1,
        ),
    )


def set_phase(url: str, claim: Claim, phase: str) -> None:
    write(url, lambda s: fenced(s, claim, phase=phase[:64]))


def finish_job(
    url: str,
    claim: Claim,
    status: str,
    error: str | None,
    flags: dict | None = None,
    metas: dict | None = None,
    **values,
) -> None:
    """End the claimed run with `status`; with `flags` ({seq: (pareto, recommended)}), mark the candidates too,
    and with `metas` ({seq: meta}) store their final meta (a sweep's later budgets add to earlier candidates').

    JobLost when the claim no longer holds: then neither the job nor its candidates are touched.
    """

    def fn(s) -> None:
        fenced(s, claim, status=status, error=error, finished_at=utcnow(), **values)
        if flags is not None:
            for rec in s.scalars(select(CandidateRecord).where(CandidateRecord.job_id == claim.job_id)):
                rec.pareto, rec.recommended = flags.get(rec.seq, (False, False))
                if metas is not None and rec.seq in metas:
                    rec.meta = metas[rec.seq]

    try:
        write(url, fn)
    except JobLost:
        # write() retries after a dropped connection; if the first commit went through, this attempt finished
        # the job itself and the retry's fence finds it no longer running.
        with session_scope(url) as s:
            done = s.scalar(
                select(Job.id).where(
                    Job.id == claim.job_id,
                    Job.attempts == claim.attempt,
                    Job.worker == claim.worker,
                    Job.status == status,
                )
            )
        if done is None:
            raise


def run_job(settings: Settings, job_id: str) -> str:
    """Claim the job and run it to its end; returns the final status ("skipped": not ours to run, "lost": the
    reaper requeued it while this worker ran it, and the attempt that holds it now decides its outcome)."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    claim = claim_job(settings, job_id, worker_name())
    if claim is None:
        return "skipped"
    try:
        return _run_claimed(settings, claim)
    except JobLost as e:
        log.warning("stopping: %s (the job was requeued; its current attempt owns it now)", e)
        return "lost"


def _run_claimed(settings: Settings, claim: Claim) -> str:
    from search.spec import run_job as run_spec
    from worker.measurements import DatabaseMeasurements

    url = settings.resolved_database_url()
    job_id = claim.job_id
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        model_rec, data_rec = s.get(ModelRecord, job.model_id), s.get(DatasetRecord, job.dataset_id)
        s.expunge_all()

    seq = 0
    last_write = 0.0

    with Heartbeat(settings, claim) as hb:

        def on_candidate(c) -> None:
            nonlocal seq
            store_candidate(url, claim, seq, c)
            seq += 1
            hb.check()

        def on_progress(p) -> None:
            nonlocal last_write
            hb.check()
            now = time.monotonic()
            if now - last_write < 0.5 and p.step < p.total:
                return  # the database does not need every step
            last_write = now
            store_progress(url, claim, p)

        started = time.perf_counter()
        try:
            set_phase(url, claim, "loading model and data")
            model, splits = load_job_inputs(settings, job, model_rec, data_rec)
            hb.check()
            latency = _latency_table(settings, claim, job, model)
            set_phase(url, claim, "calibrating")
            calibrating = time.perf_counter()
            sim = calibrated_simulator(settings, model, splits)
            calibrate_seconds = time.perf_counter() - calibrating
            hb.check()
            measurements = DatabaseMeasurements(
                settings, job_id, claim.worker, hb.check, partial(offer_chunks, settings) if settings.spread else None
            )
            result = run_spec(
                job_spec(job),
                model,
                splits,
                on_progress=on_progress,
                on_candidate=on_candidate,
                latency=latency,
                simulator=sim,
                measurements=measurements,
            )
        except Exception as e:
            chain = _chain(e)
            lost = next((c for c in chain if isinstance(c, JobLost)), None)
            if lost is not None:
                raise lost from None
            seconds = time.perf_counter() - started
            if any(isinstance(c, JobCancelled) for c in chain):
                finish_job(url, claim, JobStatus.CANCELLED, "cancelled by request", search_seconds=seconds)
                return "cancelled"
            finish_job(url, claim, JobStatus.FAILED, _reason(e, settings, f"job {job_id}"), search_seconds=seconds)
            return "failed"

    # The Pareto flags are known only at the end; candidates were stored in the order the search found them.
    flags = {i: (c.pareto, c is result.recommended) for i, c in enumerate(result.candidates)}
    best = result.recommended
    finish_job(
        url,
        claim,
        JobStatus.SUCCEEDED,
        None,
        flags=flags,
        metas={i: _jsonable(c.meta) for i, c in enumerate(result.candidates)},
        search_seconds=result.seconds + calibrate_seconds,
        step=Job.total,
        best_val_top1=None if best is None else best.val_top1,
        phase="done",
        timings={
            "phases": {"calibrate": round(calibrate_seconds, 3), **result.phase_seconds},
            "measurement": result.measurement,
        },
        sensitivity=None if result.sensitivity is None else _jsonable(result.sensitivity),
    )
    queue_validations(settings, job_id)
    return "succeeded"


def offer_chunks(settings: Settings, key: str, index: int) -> None:
    """Offer chunk `index` of measurement `key` to the workers on the search queue (worker/measurements.py)."""
    from worker.celery_app import MEASURE_TASK, app

    app.send_task(MEASURE_TASK, args=[key, index], queue=settings.queue)


# One loaded job per process for measure_chunk tasks: the chunks of a pass arrive one after another.
_measure_context: dict[str, tuple] = {}


def run_measure_chunks(settings: Settings, key: str) -> int:
    """Compute chunks of measurement `key` that nobody holds, on the model and data of the job that asked for it
    (whose inputs must give the pass's identity: the same model and calibration images). Returns how many."""
    import torch

    from search.spec import pass_runner
    from worker.measurements import compute_offered_chunks

    if settings.threads:
        torch.set_num_threads(settings.threads)
    url = settings.resolved_database_url()

    def meter_for(p):
        with session_scope(url) as s:
            job = s.get(Job, s.get(MeasurementRecord, key).job_id)
            model_rec, data_rec = s.get(ModelRecord, job.model_id), s.get(DatasetRecord, job.dataset_id)
            s.expunge_all()
        if job.id not in _measure_context:
            _measure_context.clear()
            model, splits = load_job_inputs(settings, job, model_rec, data_rec)
            _measure_context[job.id] = (model, splits, calibrated_simulator(settings, model, splits))
        return pass_runner(job_spec(job), *_measure_context[job.id], p)

    return compute_offered_chunks(settings, key, worker_name(), meter_for)


def _latency_table(settings: Settings, claim: Claim, job: Job, model):
    """The table a latency budget needs: the stored one for this model and machine, else measured now."""
    if job.budget.get("latency_us") is None:
        return None
    from search.cost import LatencyTable
    from store.models import LatencyTableRecord

    machine = socket.gethostname()
    url = settings.resolved_database_url()
    with session_scope(url) as s:
        rec = s.scalar(
            select(LatencyTableRecord).where(
                LatencyTableRecord.model_id == job.model_id, LatencyTableRecord.machine == machine
            )
        )
        if rec is not None:
            return LatencyTable(rec.table["layers"], rec.table.get("machine", machine))
    from kernels.latency import measure_latency_table

    set_phase(url, claim, "measuring kernel latencies")
    opts = job_spec(job)
    table = measure_latency_table(model, w_bits=opts.w_bits, a_bits=[b for b in opts.a_bits if b <= 8] or [8])
    with session_scope(url) as s:
        s.add(
            LatencyTableRecord(
                model_id=job.model_id, machine=machine, table={"machine": table.machine, "layers": table.layers}
            )
        )
    return table


# -- what a failure tells the user ------------------------------------------------------------------------

INTERNAL_ERROR = "internal error (ref {ref}); the operator's worker log has the details"

# Our input checks raise ValueError subclasses from these packages; a ValueError from anywhere else (torch,
# numpy) is as unexpected as any other exception, and its text is not written for users.
_OWN_CODE = tuple(ROOT / d for d in ("search", "kernels", "worker", "store"))


def _chain(e: BaseException) -> list[BaseException]:
    chain, cause = [], e
    while cause is not None and len(chain) < 16:  # a limit can strike inside code that wraps the exception
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _raised_by_us(e: BaseException) -> bool:
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    origin = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(origin.is_relative_to(d) for d in _OWN_CODE)


def _user_error_text(e: BaseException) -> str | None:
    """The message of an error the user can act on (bad model, data set, budget, options), else None."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
        return f"invalid {e.title}: {problems}"
    if isinstance(e, ValueError) and _raised_by_us(e):
        return str(e)
    return None


def _reason(e: BaseException, settings: Settings, what: str, task: str = "search") -> str:
    """The error text stored for users (the API shows it), and the failure logged for the operator.

    Expected failures get a clear sentence; anything else a generic one with a reference to the log entry,
    which has the traceback: an exception's own text can name server paths and internals.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    chain = _chain(e)
    reason = None
    if any(isinstance(c, (SoftTimeLimitExceeded, JobTimedOut)) for c in chain):
        limit = settings.task_time_limit_s if task == "search" else settings.validate_time_limit_s
        reason = f"the {task} exceeded the time limit of {limit} s"
    # torch reports a failed allocation as RuntimeError from its CPU allocator, Python as MemoryError.
    elif any(
        isinstance(c, MemoryError) or (isinstance(c, RuntimeError) and "can't allocate memory" in str(c)) for c in chain
    ):
        reason = f"the {task} ran out of memory (limit {settings.worker_max_memory_mb} MB per task)"
    elif any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in chain):
        reason = "the artifact store is full (no space left on device)"
    elif (text := _user_error_text(e)) is not None:
        reason = public_text(text)
    if reason:
        log.warning("%s failed: %s", what, reason, exc_info=e)
        return reason
    ref = secrets.token_hex(3)
    log.error("%s failed with an internal error (ref %s)", what, ref, exc_info=e)
    return INTERNAL_ERROR.format(ref=ref)


_TRACEBACK_HEADER = re.compile(r"^\s*Traceback \(most recent call last\)")
_FRAME_LINE = re.compile(r'^\s*File ".*", line \d+')
# An absolute path of two or more components, not part of a URL or a relative path.
_ABS_PATH = re.compile(r"(?<![\w.~/:\\-])/(?:[^\s/'\"`<>|:;,()\[\]{}]+/)+[^\s/'\"`<>|:;,()\[\]{}]*")


def public_text(text: str, limit: int = 1000) -> str:
    """`text` fit for users: one line, no traceback, no absolute path (each is cut to its last component)."""
    kept, in_traceback = [], False
    for line in str(text).splitlines():
        if _TRACEBACK_HEADER.match(line):
            in_traceback = True
            continue
        if in_traceback and line[:1].isspace():
            continue  # a traceback's frames and source lines are indented; its last line is the exception
        in_traceback = False
        if _FRAME_LINE.match(line) or not line.strip():
            continue
        kept.append(line.strip())
    one_line = " ".join(kept)
    one_line = _ABS_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", one_line)
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


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
    except Exception:
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
        front = s.scalars(
            select(CandidateRecord).where(CandidateRecord.job_id == job_id, CandidateRecord.pareto.is_(True))
        ).all()
        front.sort(key=lambda c: -(c.val_top1 if c.val_top1 is not None else (c.val_sqnr_db or -1e9)))
        chosen = front[: job.validate_top_k]
        ids = []
        for c in chosen:
            if c.validation is None:
                s.add(ValidationRecord(candidate_id=c.id, status=ValidationStatus.QUEUED))
            ids.append(c.id)
    for cid in ids:
        app.send_task(VALIDATE_TASK, args=[cid], queue=settings.resolved_validation_queue())
    return ids


class ValidationLease:
    """One worker's hold on a running validation.

    The validations table has no worker or attempt column, so the lease token is the row's `updated_at` as
    this worker last wrote it: the claim and every renewal set it to a new value, and every write is
    conditional on finding the value this lease wrote last. A worker that took over a stale validation (or
    the reaper that requeued it) has written another value, so the old worker's writes match nothing.
    """

    def __init__(self, url: str, candidate_id: int, token: datetime):
        self.url, self.candidate_id, self.token = url, candidate_id, token
        self._lock = threading.Lock()  # the heartbeat thread and the task both write through the lease

    def holds(self):
        return and_(
            ValidationRecord.candidate_id == self.candidate_id,
            ValidationRecord.status == ValidationStatus.RUNNING,
            ValidationRecord.updated_at == self.token,
        )

    def update(self, **values) -> None:
        """Update the validation while the lease holds (renewing it); ValidationLost otherwise."""
        with self._lock:
            now = utcnow()

            def fn(s) -> None:
                if (
                    s.execute(update(ValidationRecord).where(self.holds()).values(updated_at=now, **values)).rowcount
                    != 1
                ):
                    raise ValidationLost(f"the validation of candidate {self.candidate_id} was taken over")

            write(self.url, fn)
            self.token = now

    def published(self, path: Path) -> bool:
        """Whether the validation succeeded with `path` (a commit whose acknowledgement was lost)."""
        with session_scope(self.url) as s:
            return (
                s.scalar(
                    select(ValidationRecord.id).where(
                        ValidationRecord.candidate_id == self.candidate_id,
                        ValidationRecord.status == ValidationStatus.SUCCEEDED,
                        ValidationRecord.packed_path == str(path),
                    )
                )
                is not None
            )


def claim_validation(settings: Settings, candidate_id: int) -> ValidationLease | None:
    """Take the validation if it is queued, or running with a lease nobody renewed for stale_after_s (its worker
    is gone). None: another worker runs it, or it has finished."""
    url = settings.resolved_database_url()
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    with session_scope(url) as s:
        claimed = s.execute(
            update(ValidationRecord)
            .where(
                ValidationRecord.candidate_id == candidate_id,
                or_(
                    ValidationRecord.status == ValidationStatus.QUEUED,
                    and_(ValidationRecord.status == ValidationStatus.RUNNING, ValidationRecord.updated_at < stale),
                ),
            )
            .values(status=ValidationStatus.RUNNING, error=None, updated_at=now, attempts=ValidationRecord.attempts + 1)
        ).rowcount
    return ValidationLease(url, candidate_id, now) if claimed == 1 else None


class ValidationHeartbeat(_Beating):
    """Renews a validation's lease from a thread, so the reaper can tell a long validation from a dead one."""

    def __init__(self, settings: Settings, lease: ValidationLease):
        super().__init__(settings.heartbeat_s, f"validation-heartbeat-{lease.candidate_id}")
        self.lease = lease
        self.lost = threading.Event()

    def _tick(self) -> bool:
        try:
            self.lease.update()
        except ValidationLost:
            self.lost.set()
            return False
        except Exception as e:  # a dropped connection: the next beat retries
            log.warning("heartbeat for the validation of candidate %s failed: %s", self.lease.candidate_id, e)
        return True


def publish_packed(settings: Settings, lease: ValidationLease, packed_dir: Path, **values) -> Path:
    """Store the packed model and mark the validation succeeded, pointing at it; ValidationLost if the lease
    no longer holds (and then nothing is left behind).

    The stored packed_path switches from the previous version (if any) to the new one in one row update, and
    the previous version is deleted only after that: a crash at any point leaves packed_path naming a
    complete directory.
    """
    store = ArtifactStore(settings.resolved_artifact_dir())
    key = f"candidate-{lease.candidate_id}"
    version = store.put_dir("packed", key, packed_dir)
    try:
        lease.update(status=ValidationStatus.SUCCEEDED, packed_path=str(version), **values)
    except ValidationLost:
        if not lease.published(version):
            shutil.rmtree(version, ignore_errors=True)
            raise
    store.prune("packed", key, keep=version)
    return version


def run_validation(settings: Settings, candidate_id: int) -> str:
    """Claim the validation of a candidate and run it on the kernels; returns its final status ("skipped":
    another worker holds it or it has finished, "lost": it was taken over while this worker ran it)."""
    lease = claim_validation(settings, candidate_id)
    if lease is None:
        return "skipped"
    try:
        with ValidationHeartbeat(settings, lease):
            try:
                values, packed, write_onnx = _validate(settings, candidate_id)
                with tempfile.TemporaryDirectory() as tmp:
                    packed.save(Path(tmp))
                    write_onnx(Path(tmp))  # GET /candidates/{id}/export?format=onnx serves it
                    publish_packed(settings, lease, Path(tmp), **values)
                return "succeeded"
            except ValidationLost:
                raise
            except Exception as e:
                reason = _reason(e, settings, f"validation of candidate {candidate_id}", task="validation")
                lease.update(status=ValidationStatus.FAILED, error=reason)
                return "failed"
    except ValidationLost as e:
        log.warning("stopping: %s (its current holder decides its outcome)", e)
        return "lost"


def _validate(settings: Settings, candidate_id: int):
    """Run the candidate on the kernels: the validation's columns and the packed model."""
    from kernels.validate import validate
    from search.config import QuantConfig
    from search.data import DatasetError

    url = settings.resolved_database_url()
    with session_scope(url) as s:
        cand = s.get(CandidateRecord, candidate_id)
        job = s.get(Job, cand.job_id)
        model_rec, data_rec = s.get(ModelRecord, job.model_id), s.get(DatasetRecord, job.dataset_id)
        config_dict = cand.config
        s.expunge_all()
    model, splits = load_job_inputs(settings, job, model_rec, data_rec)
    config = QuantConfig.model_validate(config_dict)
    config.check_against(model)
    evalset = splits.test if splits.test is not None else splits.val
    if evalset.labels is None:
        raise DatasetError("validation needs labelled data")
    evalset = evalset.subset(slice(0, settings.validation_samples_for(sum(l.macs for l in model.layers))))
    from kernels.onnx_export import write_onnx_artifact
    from search.simulate import Simulator

    # One calibration for the kernels and the ONNX export: the same activation ranges and corrected biases.
    sim = Simulator(model, splits.calib.inputs)
    report = validate(model, config, evalset.inputs, evalset.labels, splits.calib.inputs, simulator=sim)
    r = report.to_dict()
    values = dict(
        top1=r.get("top1"),
        sim_top1=r.get("sim_top1"),
        agreement=r.get("agreement"),
        max_logit_diff=r.get("max_logit_diff"),
        samples=r.get("samples", len(evalset)),
        packed_bytes=r.get("packed_bytes"),
        latency_us={str(k): v for k, v in r.get("latency_us", {}).items()},
        latency_iqr_us={str(k): v for k, v in r.get("latency_iqr_us", {}).items()},
        latency_conditions=r.get("latency_conditions"),
        threads=r.get("threads"),
        isa=r.get("isa"),
    )
    return values, report.packed, partial(write_onnx_artifact, model=model, config=config, simulator=sim)


# -- recovery -------------------------------------------------------------------------------------------


def announce_worker(settings: Settings, name: str) -> None:
    from store.models import WorkerRecord

    with session_scope(settings.resolved_database_url()) as s:
        # Write first (see claim_job): merge() would read the row before writing it.
        if s.execute(update(WorkerRecord).where(WorkerRecord.name == name).values(last_seen=utcnow())).rowcount == 0:
            s.add(WorkerRecord(name=name, last_seen=utcnow()))


def requeue_orphans(settings: Settings) -> tuple[list[str], list[int]]:
    """The database half of the reaper: requeue jobs and validations whose worker died (stale heartbeat),
    fail jobs past their time limit, and pick the queued ones whose message may have been lost. Returns the
    job ids and candidate ids to send again.

    A requeue changes the row a lost worker's fenced writes are conditional on, so that worker stops at its
    next write even if it was only paused, not dead.
    """
    url = settings.resolved_database_url()
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    # Every statement writes and returns what it changed (see claim_job: no read before the first write).
    with session_scope(url) as s:
        stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)
        # A job whose worker died after its time limit was killed for it (Celery's hard limit): fail it.
        overdue = now - timedelta(seconds=settings.task_time_limit_s)
        s.execute(
            update(Job)
            .where(Job.status == JobStatus.RUNNING, stale, Job.started_at < overdue)
            .values(
                status=JobStatus.FAILED,
                error=f"the search exceeded the time limit of {settings.task_time_limit_s} s",
                finished_at=now,
            )
        )
        # A queued job's heartbeat_at is when it was last sent; resend in case the broker lost the message.
        waiting = s.scalars(
            update(Job).where(Job.status == JobStatus.QUEUED, stale).values(heartbeat_at=now).returning(Job.id)
        ).all()
        lost = s.scalars(
            update(Job)
            .where(Job.status == JobStatus.RUNNING, stale)
            .values(
                status=JobStatus.QUEUED, phase="requeued: its worker stopped responding", worker=None, heartbeat_at=now
            )
            .returning(Job.id)
        ).all()

        # A running validation renews updated_at every heartbeat; a queued one's updated_at is when it was
        # last sent, and it may wait behind long searches, so it is resent far less often.
        unsent = now - timedelta(seconds=settings.validate_time_limit_s + settings.stale_after_s)
        v_waiting = s.scalars(
            update(ValidationRecord)
            .where(ValidationRecord.status == ValidationStatus.QUEUED, ValidationRecord.updated_at < unsent)
            .values(updated_at=now)
            .returning(ValidationRecord.candidate_id)
        ).all()
        # A validation whose worker died max_attempts times is failed rather than sent again: it may be what
        # kills the worker (memory), and it would otherwise be requeued forever.
        v_dead = (ValidationRecord.status == ValidationStatus.RUNNING, ValidationRecord.updated_at < cutoff)
        s.execute(
            update(ValidationRecord)
            .where(*v_dead, ValidationRecord.attempts >= settings.max_attempts)
            .values(
                status=ValidationStatus.FAILED,
                updated_at=now,
                error=f"the validation was interrupted {settings.max_attempts} times (worker lost); giving up",
            )
        )
        v_lost = s.scalars(
            update(ValidationRecord)
            .where(*v_dead)
            .values(status=ValidationStatus.QUEUED, updated_at=now)
            .returning(ValidationRecord.candidate_id)
        ).all()
    return [*lost, *waiting], [*v_lost, *v_waiting]


def reap_orphans(settings: Settings) -> list[str]:
    """Requeue what dead workers left (requeue_orphans) and send it again; returns the job ids.

    Sending a job or validation twice is harmless: the claim lets only one delivery run it.
    """
    from worker.celery_app import SEARCH_TASK, VALIDATE_TASK, app

    job_ids, candidate_ids = requeue_orphans(settings)
    for jid in job_ids:
        app.send_task(SEARCH_TASK, args=[jid], queue=settings.queue)
    for cid in candidate_ids:
        app.send_task(VALIDATE_TASK, args=[cid], queue=settings.resolved_validation_queue())
    return job_ids
