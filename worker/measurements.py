"""Measurement passes kept in the database and spread over the workers (docs/measurement.md).

A search asks for a pass (search/measurement.py); its chunks are rows of `measurement_chunks` under the pass's
key. Finished chunks are reused by any later job with the same key and by a retried attempt of a job whose
worker died. The pending ones are offered to every worker on the search queue (one `measure_chunk` task each)
and computed by the search's own process as well: each chunk is claimed by one process at a time with a
conditional UPDATE, and a claim whose heartbeat went stale (its worker died) is taken over. The search
combines the chunks in order once all are done, so the tables do not depend on who computed what.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from search.measurement import DamagePass, Measurements, PassRunner, ScorePass, pass_from_json
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import ChunkStatus, MeasurementChunk, MeasurementRecord
from store.settings import Settings
from worker.jobs import _Beating, utcnow

log = logging.getLogger("bitsearch.worker")

__all__ = ["DatabaseMeasurements", "compute_offered_chunks"]


class _ChunkBeat(_Beating):
    """Keeps a claimed chunk's heartbeat fresh while it is computed, so a long chunk is not taken over."""

    def __init__(self, settings: Settings, chunk_id: int, worker: str):
        super().__init__(settings.heartbeat_s, f"chunk-{chunk_id}")
        self.url, self.chunk_id, self.worker = settings.resolved_database_url(), chunk_id, worker

    def _tick(self) -> bool:
        try:
            with session_scope(self.url) as s:
                s.execute(
                    update(MeasurementChunk)
                    .where(MeasurementChunk.id == self.chunk_id, MeasurementChunk.worker == self.worker)
                    .values(heartbeat_at=utcnow())
                )
        except Exception as e:  # a dropped connection: the next beat retries
            log.warning("chunk heartbeat failed: %s", e)
        return True


def _claimable(settings: Settings, key: str):
    """The chunks of pass `key` that nobody holds: pending, or running under a stale heartbeat (a dead worker's)."""
    stale = utcnow() - timedelta(seconds=settings.stale_after_s)
    return and_(
        MeasurementChunk.measurement_key == key,
        or_(
            MeasurementChunk.status == ChunkStatus.PENDING,
            and_(MeasurementChunk.status == ChunkStatus.RUNNING, MeasurementChunk.heartbeat_at < stale),
        ),
    )


def _claim(settings: Settings, key: str, worker: str) -> tuple[int, int] | None:
    """Claim a chunk of pass `key` that nobody holds: (chunk id, chunk index), or None when there is none."""
    url = settings.resolved_database_url()
    claimable = _claimable(settings, key)
    with session_scope(url) as s:
        rows = s.execute(
            select(MeasurementChunk.id, MeasurementChunk.index).where(claimable).order_by(MeasurementChunk.index)
        ).all()
    for chunk_id, index in rows:
        with session_scope(url) as s:
            won = s.execute(
                update(MeasurementChunk)
                .where(MeasurementChunk.id == chunk_id, claimable)
                .values(
                    status=ChunkStatus.RUNNING, worker=worker, runs=MeasurementChunk.runs + 1, heartbeat_at=utcnow()
                )
            ).rowcount
        if won == 1:
            return chunk_id, index
    return None


def _compute(
    settings: Settings, p: DamagePass | ScorePass, meter: PassRunner, chunk_id: int, index: int, worker: str
) -> None:
    started = time.perf_counter()
    with _ChunkBeat(settings, chunk_id, worker):
        result = meter.measure(p, index)
    with session_scope(settings.resolved_database_url()) as s:
        # Only the holder stores: a worker whose claim went stale and was taken over computed the same result.
        s.execute(
            update(MeasurementChunk)
            .where(
                MeasurementChunk.id == chunk_id,
                MeasurementChunk.worker == worker,
                MeasurementChunk.status == ChunkStatus.RUNNING,
            )
            .values(status=ChunkStatus.DONE, result=result, seconds=time.perf_counter() - started)
        )


def compute_offered_chunks(
    settings: Settings, key: str, worker: str, meter_for: Callable[[DamagePass | ScorePass], PassRunner]
) -> int:
    """What a `measure_chunk` task does: claim and compute chunks of pass `key` until none is left to claim.
    The simulator is built (`meter_for`) before the first claim, since a claim must keep its heartbeat while it
    is held, and only while something is left to claim (an offer that comes late costs a query).
    Returns the chunks computed."""
    url = settings.resolved_database_url()
    with session_scope(url) as s:
        if s.scalar(select(MeasurementChunk.id).where(_claimable(settings, key)).limit(1)) is None:
            return 0
        p = pass_from_json(s.get(MeasurementRecord, key).spec)
    meter = meter_for(p)
    done = 0
    try:
        while (claim := _claim(settings, key, worker)) is not None:
            _compute(settings, p, meter, *claim, worker)
            done += 1
    finally:
        meter.release()
    return done


class DatabaseMeasurements(Measurements):
    """Measurements of one job, kept in the database and spread over the workers on the search queue."""

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        worker: str,
        check: Callable[[], None],
        offer: Callable[[str, int], None] | None,
    ):
        super().__init__()
        self.settings = settings
        self.url = settings.resolved_database_url()
        self.job_id = job_id
        self.worker = worker
        self.check = check  # raises when the job was cancelled, lost or timed out
        self.offer = offer  # sends one measure_chunk task for (key, index); None: compute everything here
        self.store = ArtifactStore(settings.resolved_artifact_dir())

    def reference(self, key: str):
        from safetensors.torch import load_file

        path = self.store.path("references", key)
        if not path.exists():
            return None
        try:
            return load_file(str(path))["logits"]
        except Exception as e:  # a damaged file: compute it again (keep_reference replaces it)
            log.warning("stored reference %s unreadable (%s)", path.name, e)
            return None

    def keep_reference(self, key: str, logits) -> None:
        from safetensors.torch import save_file

        self.store.write("references", key, lambda tmp: save_file({"logits": logits.contiguous()}, str(tmp)))

    def _ensure_rows(self, p: DamagePass | ScorePass) -> None:
        try:
            with session_scope(self.url) as s:
                if s.get(MeasurementRecord, p.key) is None:
                    s.add(
                        MeasurementRecord(
                            key=p.key,
                            model_id=p.identity["model_sha256"],
                            spec=p.to_json(),
                            chunks=len(p.chunks),
                            job_id=self.job_id,
                        )
                    )
                    s.flush()
                    for i in range(len(p.chunks)):
                        s.add(MeasurementChunk(measurement_key=p.key, index=i, status=ChunkStatus.PENDING, runs=0))
        except IntegrityError:  # another job created the same pass at the same moment: use theirs
            pass

    def _status(self, key: str) -> dict[int, str]:
        """Each chunk's status, by index."""
        with session_scope(self.url) as s:
            rows = s.execute(
                select(MeasurementChunk.index, MeasurementChunk.status).where(MeasurementChunk.measurement_key == key)
            ).all()
        return dict(rows)

    def run(
        self, p: DamagePass | ScorePass, meter: PassRunner, on_chunk: Callable[[int, int], None] | None = None
    ) -> list[dict]:
        started = time.perf_counter()
        record = self.new_record(p)
        self._ensure_rows(p)
        status = self._status(p.key)
        record.reused = sum(1 for st in status.values() if st == ChunkStatus.DONE)
        if self.offer is not None and len(p.chunks) > 1:
            for i, st in sorted(status.items()):
                if st != ChunkStatus.DONE:
                    self.offer(p.key, i)
        n = len(p.chunks)
        try:
            while True:
                self.check()
                claim = _claim(self.settings, p.key, self.worker)
                if claim is not None:
                    _compute(self.settings, p, meter, *claim, self.worker)
                    record.computed += 1
                status = self._status(p.key)
                finished = sum(1 for st in status.values() if st == ChunkStatus.DONE)
                if on_chunk is not None and finished:
                    on_chunk(finished, n)
                if finished == n:
                    break
                if claim is None:
                    time.sleep(0.2)  # the rest is being computed elsewhere
        finally:
            meter.release()
        record.elsewhere = n - record.reused - record.computed
        with session_scope(self.url) as s:
            rows = s.execute(
                select(MeasurementChunk.index, MeasurementChunk.result)
                .where(MeasurementChunk.measurement_key == p.key)
                .order_by(MeasurementChunk.index)
            ).all()
        record.seconds = time.perf_counter() - started
        return [result for _, result in rows]
