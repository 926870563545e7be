"""/health: can the API reach the database and the broker, and which workers are alive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, Response
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from api import deps
from api.schemas import Health
from store.models import WorkerRecord
from store.settings import Settings

router = APIRouter(tags=["health"])


def _broker_ok() -> str:
    from worker.celery_app import app

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as e:
        return f"unreachable: {type(e).__name__}: {e}"[:300]


@router.get("/health", response_model=Health, summary="Database, broker and worker status")
def health(response: Response, db: Session = Depends(deps.db), settings: Settings = Depends(deps.settings)) -> Health:
    workers: list[str] = []
    try:
        db.execute(text("SELECT 1"))
        database = "ok"
        cutoff = datetime.now(UTC) - timedelta(seconds=settings.stale_after_s)
        workers = list(db.scalars(select(WorkerRecord.name).where(WorkerRecord.last_seen >= cutoff)))
    except Exception as e:
        database = f"unreachable: {type(e).__name__}"
    broker = _broker_ok()
    ok = database == "ok" and broker == "ok"
    if not ok:
        response.status_code = 503
    return Health(
        status="ok" if ok and workers else ("degraded" if ok else "down"),
        database=database,
        broker=broker,
        workers=workers,
    )
