"""The leaderboard: every job's Pareto candidates per model and data set, side by side (JSON and HTML); a swept
job's candidates say which of its budgets found them, and the page draws the job's front over all of them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from api.cache import TTLCache
from api.schemas import DatasetOut, Leaderboard, LeaderboardGroup, LeaderboardRow, ModelOut
from api.security import Caller, optional_caller
from store.db import session_scope
from store.models import CandidateRecord, DatasetRecord, Job, ModelRecord
from store.settings import get_settings

router = APIRouter(tags=["leaderboard"])
PAGES = Path(__file__).resolve().parent.parent / "pages"


def _row(c: CandidateRecord, job: Job, status: str) -> LeaderboardRow:
    v = c.validation
    measured = v is not None and v.status == "succeeded"
    latency = (v.latency_us or {}) if measured else {}
    spread = (v.latency_iqr_us or {}) if measured else {}
    conditions = (v.latency_conditions or {}) if measured else {}
    return LeaderboardRow(
        candidate_id=c.id,
        job_id=job.id,
        method=job.method,
        accuracy=v.top1 if measured else c.val_top1,
        validated=measured,
        validation_status=status,
        sim_val_top1=c.val_top1,
        agreement=v.agreement if measured else None,
        weight_bytes=c.weight_bytes,
        packed_bytes=v.packed_bytes if measured else None,
        avg_wbits=c.avg_wbits,
        bitops=c.bitops,
        latency_us_batch1=latency.get("1"),
        latency_us_batch64=latency.get("64"),
        latency_iqr_us_batch1=spread.get("1"),
        latency_iqr_us_batch64=spread.get("64"),
        latency_under_load=conditions.get("under_load"),
        search_seconds=job.search_seconds,
        front=False,
        **_budget_fields(c, job),
    )


def _budget_fields(c: CandidateRecord, job: Job) -> dict:
    """Which of the job's budgets (main, then its sweep: search/sweep.py) found the candidate and which it is
    recommended for. A job without a sweep has one budget, and its recommended candidate is that budget's."""
    budgets = [job.budget, *(job.options or {}).get("sweep", [])]
    meta = c.meta or {}
    index = meta.get("budget")
    found_under = index if len(budgets) > 1 and isinstance(index, int) and 0 <= index < len(budgets) else None
    recommended_for = [i for i in meta.get("recommended_for") or [] if isinstance(i, int)]
    if c.recommended and 0 not in recommended_for:
        recommended_for.insert(0, 0)
    return {
        "job_budgets": len(budgets),
        "budget_index": found_under,
        "budget": None if found_under is None else budgets[found_under],
        "recommended_for": recommended_for,
    }


# How long after its search a job's chosen candidates may still be waiting for their validation rows (the
# worker builds the kernels on first use before it writes them); after that, none is coming.
QUEUEING_GRACE_S = 900.0


def _validation_states(job: Job, front: list[CandidateRecord], now: datetime) -> dict[int, str]:
    """Each of a finished job's Pareto candidates' validation state: its record's status, or why it has none.

    The worker queues a job's validations together, once its search has succeeded, for its `validate_top_k`
    best Pareto candidates (worker.jobs.queue_validations ranks them by simulated accuracy). So once any of
    the job's candidates has a record, one without was not selected; before that, one outside the top k will
    not be ("not selected"), one inside may still be ("pending"), and once the grace period is over it will
    not be ("not validated": the workers could not validate).
    """

    def score(c: CandidateRecord) -> float:
        return c.val_top1 if c.val_top1 is not None else (c.val_sqnr_db or -1e9)

    queued = any(c.validation is not None for c in front)
    finished = job.finished_at
    if finished is not None and finished.tzinfo is None:  # SQLite drops the zone; the values are UTC
        finished = finished.replace(tzinfo=UTC)
    waiting = finished is not None and (now - finished).total_seconds() < QUEUEING_GRACE_S
    states = {}
    for c in front:
        if c.validation is not None:
            states[c.id] = c.validation.status
        elif queued or sum(score(o) > score(c) for o in front) >= job.validate_top_k:
            states[c.id] = "not selected"
        else:
            states[c.id] = "pending" if waiting else "not validated"
    return states


def _mark_front(rows: list[LeaderboardRow]) -> None:
    from search.pareto import pareto_front

    for r in pareto_front(rows, lambda r: r.weight_bytes, lambda r: r.accuracy):
        r.front = True


@router.get("/api/leaderboard", response_model=Leaderboard, summary="Validated candidates per model and data set")
async def leaderboard(
    model_id: str | None = None, dataset_id: str | None = None, who: Caller = Depends(optional_caller)
) -> Response:
    """What the caller may see: their own jobs and every public job (anonymous callers: public only)."""
    key = (who.owner, model_id, dataset_id)
    body = boards.get(key)
    if body is TTLCache.MISSING:
        body = await run_in_threadpool(_board_json, who, model_id, dataset_id)
        boards.put(key, body)
    return Response(body, media_type="application/json")


boards = TTLCache(ttl_s=2.0)


def _board_json(who: Caller, model_id: str | None, dataset_id: str | None) -> bytes:
    with session_scope(get_settings().resolved_database_url()) as db:
        return _board(db, who, model_id, dataset_id).model_dump_json().encode()


def _board(db: Session, who: Caller, model_id: str | None, dataset_id: str | None) -> Leaderboard:
    q = (
        select(CandidateRecord, Job)
        .join(Job, CandidateRecord.job_id == Job.id)
        .where(Job.status == "succeeded", CandidateRecord.pareto.is_(True))
        .options(selectinload(CandidateRecord.validation))
    )
    q = q.where(or_(Job.public.is_(True), Job.owner == who.owner) if who.owner else Job.public.is_(True))
    if model_id is not None:
        q = q.where(Job.model_id == model_id)
    if dataset_id is not None:
        q = q.where(Job.dataset_id == dataset_id)
    found = db.execute(q.order_by(Job.created_at, CandidateRecord.seq)).all()
    fronts: dict[str, tuple[Job, list[CandidateRecord]]] = {}
    for cand, job in found:
        fronts.setdefault(job.id, (job, []))[1].append(cand)
    now = datetime.now(UTC)
    states: dict[int, str] = {}
    for job, front in fronts.values():
        states.update(_validation_states(job, front, now))
    groups: dict[tuple[str, str], list[LeaderboardRow]] = {}
    for cand, job in found:
        groups.setdefault((job.model_id, job.dataset_id), []).append(_row(cand, job, states[cand.id]))
    out = []
    for (mid, did), rows in groups.items():
        _mark_front(rows)
        out.append(
            LeaderboardGroup(
                model=ModelOut.model_validate(db.get(ModelRecord, mid)),
                dataset=DatasetOut.model_validate(db.get(DatasetRecord, did)),
                rows=rows,
            )
        )
    return Leaderboard(groups=out)


@router.get("/leaderboard", response_class=HTMLResponse, summary="The leaderboard page")
def leaderboard_page() -> HTMLResponse:
    return HTMLResponse((PAGES / "leaderboard.html").read_text())


@router.get("/leaderboard/jobs/{job_id}", response_class=HTMLResponse, summary="A job's page: progress and bits")
def job_page(job_id: str) -> HTMLResponse:
    # The page is a shell; its data comes from /jobs/{id} with the caller's key, which enforces access.
    return HTMLResponse((PAGES / "job.html").read_text())


@router.get("/static/common.js", include_in_schema=False)
def common_js() -> Response:
    return Response((PAGES / "common.js").read_text(), media_type="text/javascript")
