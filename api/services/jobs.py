"""Jobs without HTTP: submitting (spec, uploads, feasibility, quota, persistence, queueing), listing, reading,
cancelling and publishing. Functions take a session (or the settings to open one) and raise ServiceErrors;
api/routes/jobs.py only turns requests into calls."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session, undefer

from api.schemas import CandidateOut, JobCreated, JobOut, JobPage
from api.services import uploads
from api.services.errors import CannotRun, Conflict, InvalidRequest, NotFound, QuotaExceeded
from api.views import candidate_out, job_out
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import ACTIVE_STATES, FINAL_STATES, CandidateRecord, Job, JobStatus, ValidationStatus
from store.settings import Settings

__all__ = [
    "CANDIDATE_SORTS",
    "MAX_VALIDATE_TOP_K",
    "Upload",
    "JobRequest",
    "build_spec",
    "cancel_job",
    "candidate_for",
    "check_sweep_feasible",
    "create_job",
    "job_bodies",
    "job_candidates",
    "job_for",
    "job_view",
    "list_jobs",
    "packed_directory",
    "set_public",
]

CANDIDATE_SORTS = ("seq", "avg_wbits", "weight_bytes", "bitops", "latency_us", "val_top1", "score")
MAX_VALIDATE_TOP_K = 64


@dataclass
class Upload:
    file: BinaryIO
    filename: str


@dataclass
class JobRequest:
    """POST /jobs, parsed: the spec and where its model and data come from (exactly one of each)."""

    spec: object  # search.spec.JobSpec (imported lazily: it pulls in torch)
    validate_top_k: int
    model: Upload | None = None
    model_id: str | None = None
    data: Upload | None = None
    data_name: str | None = None
    dataset_id: str | None = None
    public: bool = False


def _json_object(text: str, what: str, example: str) -> dict:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"malformed {what}: not JSON ({e}); expected e.g. {example}") from e
    if not isinstance(raw, dict):
        raise InvalidRequest(f"malformed {what}: expected a JSON object, e.g. {example}")
    return raw


def build_spec(method: str, budget: str, options: str, default_validate_top_k: int):
    """The typed spec of a submission from its form fields, and the service's own option validate_top_k.
    Anything malformed or unknown is an InvalidRequest naming it."""
    from search.cost import BudgetError
    from search.searches import METHODS
    from search.spec import SpecError, make_spec, parse_budget

    if method not in METHODS:
        raise InvalidRequest(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    try:
        limits = parse_budget(_json_object(budget, "budget", '{"avg_wbits": 3}') if budget.strip() else {})
    except BudgetError as e:
        raise InvalidRequest(f"malformed budget: {e}") from e
    raw = _json_object(options or "{}", "options", '{"seed": 1}')
    top_k = raw.pop("validate_top_k", default_validate_top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_VALIDATE_TOP_K:
        raise InvalidRequest(f"invalid options: validate_top_k must be an integer in 0..{MAX_VALIDATE_TOP_K}")
    try:
        return make_spec(method=method, budget=limits, **raw), top_k
    except SpecError as e:
        raise InvalidRequest(f"invalid options: {e}") from e


def check_sweep_feasible(summary, spec) -> None:
    """Each budget of the spec's sweep checked as the main budget is; CannotRun names the first infeasible one."""
    for i, budget in enumerate(spec.sweep):
        try:
            uploads.check_feasible(summary, budget, spec)
        except CannotRun as e:
            raise CannotRun(f"sweep[{i}] {json.dumps(budget.limits())}: {e.message}") from e


def job_view(job: Job, candidates: int, owner_view: bool = True) -> JobOut:
    """The job's body: api.views.job_out, with every budget it runs at and its timings (a deferred column, loaded
    here when the query did not undefer it)."""
    out = job_out(job, candidates, owner_view)
    budgets = [job.budget, *(job.options or {}).get("sweep", [])]
    return out.model_copy(update={"budgets": budgets, "timings": job.timings})


def check_memory(settings: Settings, model, dataset, spec, validate_top_k: int) -> dict | None:
    """The job's expected peak memory (search/memory.py), refused when over the worker's limit; None for a
    model analysed before activation profiles were recorded."""
    import math

    from search.memory import ActivationProfile, estimate_job_memory

    profile = ActivationProfile.from_dict(model.analysis or {})
    if profile is None:
        return None
    n, layers = dataset.num_samples, model.analysis["layers"]
    calib = min(spec.calib_size, n)
    extra = spec.params.get("reward_samples", 512) if spec.method == "haq" else 0
    estimate = estimate_job_memory(
        method=spec.method,
        profile=profile,
        input_elements=math.prod(model.input_shape),
        weight_params=sum(int(l["params"]) for l in layers),
        layers=len(layers),
        calib_samples=calib,
        val_samples=min(spec.val_samples + extra, n),
        validate_samples=min(settings.validation_samples_for(sum(int(l["macs"]) for l in layers)), n)
        if validate_top_k
        else 0,
        embedding=spec.params.get("embedding", 256),
    )
    if estimate.total_mb > settings.job_memory_mb:
        raise CannotRun(
            f"the job would need {estimate.describe()}, over this server's limit of {settings.job_memory_mb:,} MB "
            f"per job; lower {estimate.lever}"
        )
    return {
        "mb": estimate.total_mb,
        "phase": estimate.phase,
        "parts_mb": estimate.parts_mb(),
        "text": estimate.describe(),
    }


def create_job(
    settings: Settings, store: ArtifactStore, owner: str, request: JobRequest, enqueue: Callable[[str], None]
) -> JobCreated:
    """Check, store and queue a job. Uploads are staged and analysed before the transaction (an analysis takes
    seconds) and moved to their final names only after it commits: a refused request leaves no file and no row.
    The owner's jobs are counted and the new one inserted under an owner lock, so the quota holds under
    concurrency; the quota is checked last, so a request that is wrong anyway says what is wrong with it."""
    r = request
    if (r.model is None) == (r.model_id is None):
        raise InvalidRequest("give exactly one of `model` (a .pt2 upload) and `model_id`")
    if sum(x is not None for x in (r.data, r.data_name, r.dataset_id)) != 1:
        raise InvalidRequest("give exactly one of `data` (a safetensors upload), `data_name` and `dataset_id`")
    uploads.check_finetune(r.spec, r.data_name is not None or r.dataset_id in uploads.BUILTIN, settings)

    staged: list[uploads.Prepared] = []
    try:
        if r.model is not None:
            staged.append(uploads.prepare_model(settings, store, r.model.file, r.model.filename or "model.pt2"))
        else:
            uploads.backfill_model_analysis(settings, store, r.model_id, owner)
        if r.data is not None:
            staged.append(uploads.prepare_dataset(settings, store, r.data.file, r.data.filename or "data.safetensors"))
        with session_scope(settings.resolved_database_url()) as db:
            uploads.lock_owner(db, owner)
            if r.model is not None:
                model_rec, summary = uploads.record_model(db, staged[0], owner)
            else:
                model_rec, summary = uploads.model_by_id(db, r.model_id, owner)
            if r.data is not None:
                data_rec = uploads.record_dataset(db, staged[-1], owner)
            elif r.data_name is not None:
                data_rec = uploads.builtin_dataset(db, r.data_name)
            else:
                data_rec = uploads.dataset_by_id(db, r.dataset_id, owner)
            uploads.check_compatible(model_rec, data_rec)
            uploads.check_feasible(summary, r.spec.budget, r.spec)
            check_sweep_feasible(summary, r.spec)
            memory = check_memory(settings, model_rec, data_rec, r.spec, r.validate_top_k)
            active = db.scalar(
                select(func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(ACTIVE_STATES))
            )
            if active >= settings.max_active_jobs:
                raise QuotaExceeded(
                    f"you already have {active} queued or running jobs, the limit per owner; "
                    "wait for one to finish or cancel one"
                )
            job = Job(
                model_id=model_rec.id,
                dataset_id=data_rec.id,
                method=r.spec.method,
                budget=r.spec.budget.limits(),
                options=r.spec.job_options(),
                validate_top_k=r.validate_top_k,
                owner=owner,
                public=r.public,
                heartbeat_at=datetime.now(UTC),
                memory_estimate=memory,
            )
            db.add(job)
            db.flush()
            created = JobCreated(
                id=job.id, status=job.status, model_id=model_rec.id, dataset_id=data_rec.id, location=f"/jobs/{job.id}"
            )
        for upload in staged:  # committed: a worker must find the files before the job is queued
            upload.place()
    finally:
        for upload in staged:
            upload.discard()  # no-op once placed
    try:
        enqueue(created.id)
    except Exception:
        pass
    return created


def _candidate_counts(db: Session, job_ids: list[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    rows = db.execute(
        select(CandidateRecord.job_id, func.count())
        .where(CandidateRecord.job_id.in_(job_ids))
        .group_by(CandidateRecord.job_id)
    ).all()
    return dict(rows)


def list_jobs(
    db: Session,
    owner: str,
    status: str | None = None,
    method: str | None = None,
    model_id: str | None = None,
    dataset_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> JobPage:
    """The owner's own jobs, newest first."""
    if status is not None and status not in {s.value for s in JobStatus}:
        raise InvalidRequest(f"unknown status {status!r}; expected one of {', '.join(s.value for s in JobStatus)}")
    q = select(Job).where(Job.owner == owner)
    for col, value in (
        (Job.status, status),
        (Job.method, method),
        (Job.model_id, model_id),
        (Job.dataset_id, dataset_id),
    ):
        if value is not None:
            q = q.where(col == value)
    total = db.scalar(select(func.count()).select_from(q.subquery()))
    page = q.options(undefer(Job.timings)).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    jobs = db.scalars(page).all()
    counts = _candidate_counts(db, [j.id for j in jobs])
    return JobPage(items=[job_view(j, counts.get(j.id, 0)) for j in jobs], total=total, limit=limit, offset=offset)


def job_for(db: Session, job_id: str, owner: str | None, write: bool = False) -> Job:
    """The job if the caller owns it (or it is public and only read); otherwise NotFound, as if it did not exist."""
    job = db.get(Job, job_id)
    if job is None or not (job.owner == owner or (job.public and not write)):
        raise NotFound(f"no job with id {job_id!r}")
    return job


def job_bodies(db: Session, job_id: str) -> tuple[str, bool, bytes, bytes] | None:
    """(owner, public, the owner's JSON body, everyone else's) of a job, or None: what the polling cache keeps."""
    job = db.get(Job, job_id, options=[undefer(Job.timings)])
    if job is None:
        return None
    count = _candidate_counts(db, [job.id]).get(job.id, 0)
    return (
        job.owner,
        job.public,
        job_view(job, count).model_dump_json().encode(),
        job_view(job, count, owner_view=False).model_dump_json().encode(),
    )


def job_candidates(
    db: Session, job_id: str, owner: str | None, sort: str = "seq", pareto: bool | None = None
) -> list[CandidateOut]:
    job = job_for(db, job_id, owner)
    field = sort.lstrip("-")
    if field not in CANDIDATE_SORTS:
        raise InvalidRequest(f"cannot sort by {field!r}; choose one of {', '.join(sorted(CANDIDATE_SORTS))}")
    col = getattr(CandidateRecord, field)
    q = select(CandidateRecord).where(CandidateRecord.job_id == job_id)
    if pareto is not None:
        q = q.where(CandidateRecord.pareto.is_(pareto))
    q = q.order_by(col.desc() if sort.startswith("-") else col.asc(), CandidateRecord.seq)
    swept = bool((job.options or {}).get("sweep"))
    return [_with_budgets(candidate_out(c, owner_view=job.owner == owner), c, swept) for c in db.scalars(q)]


def _with_budgets(out: CandidateOut, c: CandidateRecord, swept: bool) -> CandidateOut:
    """A swept job's candidate says which budget found it and which budgets it is recommended for (its meta,
    search/sweep.py); a job without a sweep has one budget, whose recommendation is the recommended candidate."""
    meta = c.meta or {}
    recommended_for = [i for i in meta.get("recommended_for") or [] if isinstance(i, int)]
    if c.recommended and 0 not in recommended_for:
        recommended_for.insert(0, 0)
    budget = meta.get("budget") if swept and isinstance(meta.get("budget"), int) else None
    return out.model_copy(update={"budget": budget, "recommended_for": recommended_for})


def cancel_job(db: Session, job_id: str, owner: str) -> JobOut:
    job = job_for(db, job_id, owner, write=True)
    if job.status in FINAL_STATES:
        raise Conflict(f"job {job_id} has already {job.status}")
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:  # nothing runs it yet; the worker skips a cancelled job
        job.status, job.finished_at, job.error = JobStatus.CANCELLED, datetime.now(UTC), "cancelled by request"
    db.commit()
    return job_view(job, _candidate_counts(db, [job.id]).get(job.id, 0))


def set_public(db: Session, job_id: str, owner: str, public: bool) -> JobOut:
    job = job_for(db, job_id, owner, write=True)
    job.public = public
    db.commit()
    return job_view(job, _candidate_counts(db, [job.id]).get(job.id, 0))


def candidate_for(db: Session, candidate_id: int, owner: str | None) -> CandidateRecord:
    """The candidate if the caller may read its job; otherwise NotFound."""
    cand = db.get(CandidateRecord, candidate_id)
    try:
        if cand is not None:
            job_for(db, cand.job_id, owner)
    except NotFound:
        cand = None
    if cand is None:
        raise NotFound(f"no candidate with id {candidate_id}")
    return cand


def packed_directory(db: Session, store: ArtifactStore, candidate_id: int, owner: str | None) -> Path:
    """The directory of a validated candidate's packed model, inside the artifact store."""
    cand = candidate_for(db, candidate_id, owner)
    v = cand.validation
    if v is None or v.status != ValidationStatus.SUCCEEDED or not v.packed_path:
        state = "not validated" if v is None else f"validation {v.status}"
        raise NotFound(f"candidate {candidate_id} has no packed model ({state})")
    directory = Path(v.packed_path)
    if not directory.is_dir() or store.root not in directory.resolve().parents:
        raise NotFound(f"the packed model of candidate {candidate_id} is missing from the artifact store")
    return directory
