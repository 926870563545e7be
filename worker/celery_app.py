"""The Celery application. The parent process never imports torch: tasks import the library lazily, so
forked children start clean (OpenMP does not survive a fork)."""

from __future__ import annotations

from celery import Celery

from store.settings import get_settings

SEARCH_TASK = "worker.tasks.run_search"
VALIDATE_TASK = "worker.tasks.validate_candidate"
MEASURE_TASK = "worker.tasks.measure_chunk"


def make_celery() -> Celery:
    settings = get_settings()
    broker = settings.resolved_broker_url()
    app = Celery("bitsearch", broker=broker, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue,
        task_ignore_result=True,  # state lives in the database, not in a result backend
        # A task is acknowledged only when it finishes, and a killed worker's task goes back to the queue:
        # with idempotent tasks, a crash costs a rerun, never a lost job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024,
        broker_connection_retry_on_startup=True,
        # Redis redelivers an unacknowledged task after visibility_timeout: longer than any task may run.
        # (kombu's SQL transport hands these options to create_engine, so only Redis gets them.)
        broker_transport_options=(
            {"visibility_timeout": settings.task_time_limit_s + 600} if broker.startswith(("redis", "rediss")) else {}
        ),
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery()
