"""A job's per-layer sensitivity report (search/sensitivity.py) as JSON or CSV: the data operation behind
GET /jobs/{id}/sensitivity, with no HTTP in it."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from api.services.errors import Conflict, InvalidRequest
from api.services.exports import Download
from api.services.jobs import job_for
from search.sensitivity import (
    SENSITIVITY_METHODS,
    SensitivityError,
    SensitivityTables,
    no_sensitivity_reason,
    report_csv,
    report_json,
)
from store.models import JobStatus

__all__ = ["SENSITIVITY_FORMATS", "job_sensitivity", "sensitivity_download"]

SENSITIVITY_FORMATS = ("json", "csv")


def job_sensitivity(db: Session, job_id: str, owner: str | None) -> SensitivityTables:
    """The job's stored tables, if the caller may read the job (else NotFound) and it has them (else Conflict,
    saying why: a method that measures none, a job not succeeded yet, or one finished before reports were kept)."""
    job = job_for(db, job_id, owner)
    if job.method not in SENSITIVITY_METHODS:
        raise Conflict(no_sensitivity_reason(job.method))
    if job.status != JobStatus.SUCCEEDED:
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise Conflict(f"job {job_id} is {job.status}; its sensitivity report is written when it succeeds")
        raise Conflict(f"job {job_id} {job.status}; only a succeeded job has a sensitivity report")
    if job.sensitivity is None:
        raise Conflict(f"job {job_id} finished before sensitivity reports were stored; run it again to get one")
    try:
        return SensitivityTables.parse(job.sensitivity, job.method)
    except SensitivityError as e:  # a stored row this code cannot read is our fault, not the caller's
        raise RuntimeError(f"job {job_id}: {e}") from e


def sensitivity_download(db: Session, job_id: str, owner: str | None, fmt: str) -> Download:
    if fmt not in SENSITIVITY_FORMATS:
        raise InvalidRequest(f"no sensitivity report format {fmt!r}; formats are {', '.join(SENSITIVITY_FORMATS)}")
    tables = job_sensitivity(db, job_id, owner)
    stem = f"bitsearch-job-{job_id}-sensitivity"
    if fmt == "csv":
        return Download(report_csv(tables).encode(), "text/csv; charset=utf-8", f"{stem}.csv")
    return Download(json.dumps(report_json(tables)).encode(), "application/json", f"{stem}.json")
