"""/jobs: submit, list, inspect and cancel searches."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Response, UploadFile
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import deps, intake
from api.routes import leaderboard
from api.cache import TTLCache
from api.security import Caller, caller, optional_caller
from api.schemas import CandidateOut, JobCreated, JobOptions, JobOut, JobPage
from api.views import candidate_out, job_out
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import FINAL_STATES, JOB_STATES, CandidateRecord, Job
from store.settings import Settings, get_settings
from worker.celery_app import SEARCH_TASK

router = APIRouter(tags=["jobs"])

CANDIDATE_SORTS = {"seq", "avg_wbits", "weight_bytes", "bitops", "latency_us", "val_top1", "score"}


def _pydantic_message(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())


def parse_budget(text: str):
    from search.cost import METRICS, Budget

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"malformed budget: not JSON ({e}); expected e.g. {{\"avg_wbits\": 3}}") from e
    if not isinstance(raw, dict) or not raw:
        raise HTTPException(400, f"malformed budget: expected a JSON object of limits, e.g. {{\"avg_wbits\": 3}}; "
                                 f"metrics: {', '.join(METRICS)}")
    unknown = set(raw) - set(METRICS)
    if unknown:
        raise HTTPException(400, f"malformed budget: unknown metric(s) {sorted(unknown)}; expected {', '.join(METRICS)}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw.values()):
        raise HTTPException(400, "malformed budget: every limit must be a number")
    try:
        return Budget(**raw)
    except ValidationError as e:
        raise HTTPException(400, f"malformed budget: {_pydantic_message(e)}") from e


def parse_options(text: str) -> JobOptions:
    try:
        raw = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"malformed options: not JSON ({e})") from e
    if not isinstance(raw, dict):
        raise HTTPException(400, "malformed options: expected a JSON object")
    try:
        return JobOptions(**raw)
    except ValidationError as e:
        raise HTTPException(400, f"invalid options: {_pydantic_message(e)}") from e


@router.post("/jobs", status_code=202, response_model=JobCreated,
             summary="Submit a search: a model, data, a method and a budget")
def create_job(
    response: Response,
    method: Annotated[str, Form(description="imprinting | sqnr | haq | uniform | random")],
    budget: Annotated[str, Form(description='JSON limits, e.g. {"avg_wbits": 3} or {"weight_bytes": 60000}')],
    options: Annotated[str, Form(description="JSON JobOptions (bit choices, seed, calib_size, ...)")] = "{}",
    model: Annotated[UploadFile | None, File(description="a torch.export .pt2 archive")] = None,
    model_id: Annotated[str | None, Form(description="the id (sha256) of a model uploaded before")] = None,
    data: Annotated[UploadFile | None, File(description="a safetensors data set (inputs, labels)")] = None,
    data_name: Annotated[str | None, Form(description="a built-in data set: fashion-mnist")] = None,
    dataset_id: Annotated[str | None, Form(description="the id of a data set uploaded before")] = None,
    public: Annotated[bool, Form(description="list the job's candidates on everyone's leaderboard")] = False,
    who: Caller = Depends(caller),
    settings: Settings = Depends(deps.settings),
    store: ArtifactStore = Depends(deps.artifacts),
) -> JobCreated:
    from search.searches import METHODS

    if method not in METHODS:
        raise HTTPException(400, f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    parsed_budget = parse_budget(budget)
    opts = parse_options(options)
    if (model is None) == (model_id is None):
        raise HTTPException(400, "give exactly one of `model` (a .pt2 upload) and `model_id`")
    if sum(x is not None for x in (data, data_name, dataset_id)) != 1:
        raise HTTPException(400, "give exactly one of `data` (a safetensors upload), `data_name` and `dataset_id`")
    intake.check_finetune(method, opts, data_name is not None or dataset_id in intake.BUILTIN, settings)

    # Uploads are staged and analysed before the transaction (an analysis takes seconds), and moved to their
    # final names only after it commits: a refused request leaves no file and no row.
    uploads: list[intake.Prepared] = []
    try:
        if model is not None:
            uploads.append(intake.prepare_model(settings, store, model.file, model.filename or "model.pt2"))
        else:
            intake.backfill_model_analysis(settings, store, model_id, who.owner)
        if data is not None:
            uploads.append(intake.prepare_dataset(settings, store, data.file, data.filename or "data.safetensors"))
        with session_scope(settings.resolved_database_url()) as db:
            intake.lock_owner(db, who.owner)
            if model is not None:
                model_rec, summary = intake.record_model(db, uploads[0], who.owner)
            else:
                model_rec, summary = intake.model_by_id(db, model_id, who.owner)
            if data is not None:
                data_rec = intake.record_dataset(db, uploads[-1], who.owner)
            elif data_name is not None:
                data_rec = intake.builtin_dataset(db, data_name)
            else:
                data_rec = intake.dataset_by_id(db, dataset_id, who.owner)
            intake.check_compatible(model_rec, data_rec)
            intake.check_feasible(summary, parsed_budget, opts)
            # The quota comes last, so a request that is wrong anyway says what is wrong with it; the owner lock
            # makes this count and the insert below atomic.
            active = db.scalar(select(func.count()).select_from(Job).where(
                Job.owner == who.owner, Job.status.in_(("queued", "running"))))
            if active >= settings.max_active_jobs:
                raise HTTPException(429, f"you already have {active} queued or running jobs, the limit per owner; "
                                         "wait for one to finish or cancel one")
            job = Job(model_id=model_rec.id, dataset_id=data_rec.id, method=method, budget=parsed_budget.limits(),
                      options=opts.search_options(), validate_top_k=opts.validate_top_k, owner=who.owner,
                      public=public, heartbeat_at=datetime.now(timezone.utc))
            db.add(job)
            db.flush()
            created = JobCreated(id=job.id, status=job.status, model_id=model_rec.id, dataset_id=data_rec.id,
                                 location=f"/jobs/{job.id}")
        for upload in uploads:  # committed: a worker must find the files before the job is queued
            upload.place()
    finally:
        for upload in uploads:
            upload.discard()  # no-op once placed
    try:
        deps.send_task(SEARCH_TASK, [created.id])
    except Exception:  # broker down: the job stays queued and the workers' reaper sends it again
        pass
    response.headers["Location"] = created.location
    return created


@router.get("/jobs", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    status: Annotated[str | None, Query(description=" | ".join(JOB_STATES))] = None,
    method: str | None = None,
    model_id: str | None = None,
    dataset_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    who: Caller = Depends(caller),
    db: Session = Depends(deps.db),
) -> JobPage:
    """The caller's own jobs."""
    if status is not None and status not in JOB_STATES:
        raise HTTPException(400, f"unknown status {status!r}; expected one of {', '.join(JOB_STATES)}")
    q = select(Job).where(Job.owner == who.owner)
    for col, value in ((Job.status, status), (Job.method, method), (Job.model_id, model_id),
                       (Job.dataset_id, dataset_id)):
        if value is not None:
            q = q.where(col == value)
    total = db.scalar(select(func.count()).select_from(q.subquery()))
    jobs = db.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    counts = _candidate_counts(db, [j.id for j in jobs])
    return JobPage(items=[job_out(j, counts.get(j.id, 0)) for j in jobs], total=total, limit=limit, offset=offset)


def _candidate_counts(db: Session, job_ids: list[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    rows = db.execute(select(CandidateRecord.job_id, func.count()).where(CandidateRecord.job_id.in_(job_ids))
                      .group_by(CandidateRecord.job_id)).all()
    return dict(rows)


def get_job_or_404(db: Session, job_id: str, who: Caller, write: bool = False) -> Job:
    """The job if the caller owns it (or it is public and only read); otherwise 404, as if it did not exist."""
    job = db.get(Job, job_id)
    if job is None or not (job.owner == who.owner or (job.public and not write)):
        raise HTTPException(404, f"no job with id {job_id!r}")
    return job


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Status, progress and timings of a job")
async def get_job(job_id: str, who: Caller = Depends(optional_caller)) -> Response:
    # The polling path: served from a short-lived cache of the serialized job, access checked on every hit.
    view = job_views.get(job_id)
    if view is TTLCache.MISSING:
        view = await run_in_threadpool(_job_view, job_id)
        job_views.put(job_id, view)
    if view is None or not (view[0] == who.owner or view[1]):
        raise HTTPException(404, f"no job with id {job_id!r}")
    return Response(view[2] if view[0] == who.owner else view[3], media_type="application/json")


job_views = TTLCache(ttl_s=0.5)


def _job_view(job_id: str) -> tuple[str, bool, bytes, bytes] | None:
    """(owner, public, the owner's JSON body, everyone else's) of a job, or None."""
    with session_scope(get_settings().resolved_database_url()) as db:
        job = db.get(Job, job_id)
        if job is None:
            return None
        count = _candidate_counts(db, [job.id]).get(job.id, 0)
        return (job.owner, job.public, job_out(job, count).model_dump_json().encode(),
                job_out(job, count, owner_view=False).model_dump_json().encode())


@router.get("/jobs/{job_id}/candidates", response_model=list[CandidateOut], summary="A job's candidate configs")
def job_candidates(
    job_id: str,
    sort: Annotated[str, Query(description="a field, '-' prefix for descending: " + ", ".join(sorted(CANDIDATE_SORTS)))]
    = "seq",
    pareto: Annotated[bool | None, Query(description="only the Pareto front (true) or only the rest (false)")] = None,
    who: Caller = Depends(optional_caller),
    db: Session = Depends(deps.db),
) -> list[CandidateOut]:
    job = get_job_or_404(db, job_id, who)
    field = sort.lstrip("-")
    if field not in CANDIDATE_SORTS:
        raise HTTPException(400, f"cannot sort by {field!r}; choose one of {', '.join(sorted(CANDIDATE_SORTS))}")
    col = getattr(CandidateRecord, field)
    q = select(CandidateRecord).where(CandidateRecord.job_id == job_id)
    if pareto is not None:
        q = q.where(CandidateRecord.pareto.is_(pareto))
    q = q.order_by(col.desc() if sort.startswith("-") else col.asc(), CandidateRecord.seq)
    return [candidate_out(c, owner_view=job.owner == who.owner) for c in db.scalars(q)]


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: str, who: Caller = Depends(caller), db: Session = Depends(deps.db)) -> JobOut:
    job = get_job_or_404(db, job_id, who, write=True)
    if job.status in FINAL_STATES:
        raise HTTPException(409, f"job {job_id} has already {job.status}")
    job.cancel_requested = True
    if job.status == "queued":  # nothing runs it yet; the worker skips a cancelled job
        job.status, job.finished_at, job.error = "cancelled", datetime.now(timezone.utc), "cancelled by request"
    db.commit()
    job_views.drop(job_id)
    leaderboard.boards.clear()  # what others may see has changed
    return job_out(job, _candidate_counts(db, [job.id]).get(job.id, 0))


class JobUpdate(BaseModel):
    public: bool


@router.patch("/jobs/{job_id}", response_model=JobOut, summary="Make a job public (or private again)")
def update_job(job_id: str, body: JobUpdate, who: Caller = Depends(caller), db: Session = Depends(deps.db)) -> JobOut:
    job = get_job_or_404(db, job_id, who, write=True)
    job.public = body.public
    db.commit()
    job_views.drop(job_id)
    leaderboard.boards.clear()  # what others may see has changed
    return job_out(job, _candidate_counts(db, [job.id]).get(job.id, 0))
