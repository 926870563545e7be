"""Celery tasks (thin: the work is in worker/jobs.py) and the orphan reaper that runs beside each worker."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from store.db import migrate
from store.settings import get_settings
from worker import jobs
from worker.celery_app import MEASURE_TASK, SEARCH_TASK, VALIDATE_TASK, app

log = logging.getLogger("bitsearch.worker")
settings = get_settings()


# The job enforces task_time_limit_s itself at every step (worker/jobs.py); Celery's limits are the backstop
# for code that never returns to a step.
@app.task(
    name=SEARCH_TASK, time_limit=settings.task_time_limit_s + 120, soft_time_limit=settings.task_time_limit_s + 30
)
def run_search(job_id: str) -> str:
    return jobs.run_job(get_settings(), job_id)


@app.task(
    name=VALIDATE_TASK, time_limit=settings.validate_time_limit_s + 60, soft_time_limit=settings.validate_time_limit_s
)
def validate_candidate(candidate_id: int) -> str:
    return jobs.run_validation(get_settings(), candidate_id)


# A chunk of a search's measurement, offered to every worker on the search queue (worker/measurements.py).
# `index` is the chunk the offer was made for; the task computes whichever chunks are still unclaimed.
@app.task(name=MEASURE_TASK, time_limit=settings.task_time_limit_s + 120, soft_time_limit=settings.task_time_limit_s)
def measure_chunk(key: str, index: int) -> int:
    return jobs.run_measure_chunks(get_settings(), key)


@worker_process_init.connect
def _limit_memory(**_):
    """Cap each task process's address space, so a runaway search fails with MemoryError, not the machine."""
    import resource

    limit = get_settings().worker_max_memory_mb * 1024 * 1024
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


_stop_reaper = threading.Event()


@worker_ready.connect
def _start_reaper(sender=None, **_):
    s = get_settings()
    migrate(s.resolved_database_url())

    name = f"{sender.hostname if sender is not None else jobs.worker_name()}"

    def loop():
        while True:
            try:
                jobs.announce_worker(s, name)
                requeued = jobs.reap_orphans(s)
                if requeued:
                    log.warning("requeued orphaned jobs: %s", requeued)
            except Exception as e:  # database or broker down: try again next round
                log.warning("orphan check failed: %s", e)
            if _stop_reaper.wait(max(1.0, s.stale_after_s / 3)):
                return

    threading.Thread(target=loop, name="bitsearch-reaper", daemon=True).start()


@worker_shutdown.connect
def _stop(**_):
    _stop_reaper.set()
