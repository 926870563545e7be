"""Dependencies shared by the routes: settings, a database session per request, the task queue."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.settings import Settings, get_settings


def settings() -> Settings:
    return get_settings()


def db() -> Iterator[Session]:
    with session_scope(get_settings().resolved_database_url()) as session:
        yield session


def artifacts() -> ArtifactStore:
    return ArtifactStore(get_settings().resolved_artifact_dir())


def send_task(name: str, args: list) -> None:
    """Queue a task by name: the API never imports the task code (nor torch through it)."""
    from worker.celery_app import app

    app.send_task(name, args=args, queue=get_settings().queue)
