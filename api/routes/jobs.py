"""/jobs: submit, list, inspect and cancel searches, and read a job's sensitivity report. Thin: the work is in
api/services/jobs.py and api/services/sensitivity.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import deps
from api.cache import TTLCache
from api.routes import leaderboard
from api.schemas import CandidateOut, JobCreated, JobOut, JobPage
from api.security import Caller, caller, optional_caller
from api.services import jobs as service
from api.services.errors import NotFound
from api.services.sensitivity import sensitivity_download
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import JobStatus
from store.settings import Settings, get_settings
from worker.celery_app import SEARCH_TASK

router = APIRouter(tags=["jobs"])


@router.post(
    "/jobs", status_code=202, response_model=JobCreated, summary="Submit a search: a model, data, a method and a budget"
)
def create_job(
    response: Response,
    method: Annotated[str, Form(description="imprinting | sqnr | haq | uniform | random")],
    budget: Annotated[str, Form(description='JSON limits, e.g. {"avg_wbits": 3} or {"weight_bytes": 60000}')],
    options: Annotated[
        str,
        Form(
            description="JSON: the job spec's options (w_bits, a_bits, seed, scheme, clip, "
            "act_calibration, calib_size, val_samples, params, finetune, sweep: a list of more budgets) and "
            "validate_top_k"
        ),
    ] = "{}",
    model: Annotated[UploadFile | None, File(description="a torch.export .pt2 archive")] = None,
    model_id: Annotated[str | None, Form(description="the id (sha256) of a model uploaded before")] = None,
    data: Annotated[
        UploadFile | None,
        File(
            description="a safetensors data set: float32 inputs, or uint8 images [N, H, W, C] with mean and "
            "std [C]; optional labels (README.md, What goes in)"
        ),
    ] = None,
    data_name: Annotated[str | None, Form(description="a built-in data set: fashion-mnist")] = None,
    dataset_id: Annotated[str | None, Form(description="the id of a data set uploaded before")] = None,
    public: Annotated[bool, Form(description="list the job's candidates on everyone's leaderboard")] = False,
    who: Caller = Depends(caller),
    settings: Settings = Depends(deps.settings),
    store: ArtifactStore = Depends(deps.artifacts),
) -> JobCreated:
    spec, top_k = service.build_spec(method, budget, options, settings.validate_top_k)
    request = service.JobRequest(
        spec,
        top_k,
        model=service.Upload(model.file, model.filename) if model is not None else None,
        model_id=model_id,
        data=service.Upload(data.file, data.filename) if data is not None else None,
        data_name=data_name,
        dataset_id=dataset_id,
        public=public,
    )
    created = service.create_job(
        settings, store, who.owner, request, lambda job_id: deps.send_task(SEARCH_TASK, [job_id])
    )
    response.headers["Location"] = created.location
    return created


@router.get("/jobs", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    status: Annotated[str | None, Query(description=" | ".join(JobStatus))] = None,
    method: str | None = None,
    model_id: str | None = None,
    dataset_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    who: Caller = Depends(caller),
    db: Session = Depends(deps.db),
) -> JobPage:
    """The caller's own jobs."""
    return service.list_jobs(db, who.owner, status, method, model_id, dataset_id, limit, offset)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Status, progress and timings of a job")
async def get_job(job_id: str, who: Caller = Depends(optional_caller)) -> Response:
    # The polling path: served from a short-lived cache of the serialized job, access checked on every hit.
    view = job_views.get(job_id)
    if view is TTLCache.MISSING:
        view = await run_in_threadpool(_job_view, job_id)
        job_views.put(job_id, view)
    if view is None or not (view[0] == who.owner or view[1]):
        raise NotFound(f"no job with id {job_id!r}")
    return Response(view[2] if view[0] == who.owner else view[3], media_type="application/json")


job_views = TTLCache(ttl_s=0.5)


def _job_view(job_id: str):
    with session_scope(get_settings().resolved_database_url()) as db:
        return service.job_bodies(db, job_id)


@router.get("/jobs/{job_id}/candidates", response_model=list[CandidateOut], summary="A job's candidate configs")
def job_candidates(
    job_id: str,
    sort: Annotated[
        str, Query(description="a field, '-' prefix for descending: " + ", ".join(sorted(service.CANDIDATE_SORTS)))
    ] = "seq",
    pareto: Annotated[bool | None, Query(description="only the Pareto front (true) or only the rest (false)")] = None,
    who: Caller = Depends(optional_caller),
    db: Session = Depends(deps.db),
) -> list[CandidateOut]:
    return service.job_candidates(db, job_id, who.owner, sort, pareto)


@router.get(
    "/jobs/{job_id}/sensitivity",
    summary="Per-layer sensitivity report: each layer's damage at every width and the widths chosen (sqnr jobs)",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}, "text/csv": {}}},
        409: {"description": "the job has no report: its method measures none, or it has not succeeded"},
    },
)
def job_sensitivity(
    job_id: str,
    format: Annotated[str, Query(description="json (default) | csv")] = "json",
    who: Caller = Depends(optional_caller),
    db: Session = Depends(deps.db),
) -> Response:
    d = sensitivity_download(db, job_id, who.owner, format)
    # JSON is shown inline (the job page reads it); CSV is a file to save.
    disposition = "attachment" if format == "csv" else "inline"
    return Response(
        d.body, media_type=d.media_type, headers={"Content-Disposition": f'{disposition}; filename="{d.filename}"'}
    )


def _changed(job_id: str) -> None:
    job_views.drop(job_id)
    leaderboard.boards.clear()  # what others may see has changed


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: str, who: Caller = Depends(caller), db: Session = Depends(deps.db)) -> JobOut:
    out = service.cancel_job(db, job_id, who.owner)
    _changed(job_id)
    return out


class JobUpdate(BaseModel):
    public: bool


@router.patch("/jobs/{job_id}", response_model=JobOut, summary="Make a job public (or private again)")
def update_job(job_id: str, body: JobUpdate, who: Caller = Depends(caller), db: Session = Depends(deps.db)) -> JobOut:
    out = service.set_public(db, job_id, who.owner, body.public)
    _changed(job_id)
    return out
