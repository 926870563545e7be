"""Turning database rows into response bodies (shared by the routes and the leaderboard)."""

from __future__ import annotations

from api.schemas import CandidateOut, JobOut, Progress, ValidationOut
from store.models import CandidateRecord, Job


def public_error(status: str, error: str | None) -> str | None:
    """What a viewer who is not the owner learns of an error: a worker's error text can quote internals (exception
    types, messages, paths), so only the owner sees it."""
    if error is None:
        return None
    return "cancelled" if status == "cancelled" else "failed"


def job_notes(job: Job) -> list[str]:
    analysis = (job.model.analysis if job.model is not None else None) or {}
    exported, static = analysis.get("exported_batch"), analysis.get("static_batch")
    notes = []
    if static:
        notes.append(
            f"the model was exported at batch {static} and runs {static} sample(s) per call, which is slow: "
            f"{analysis.get('batch_note') or 'it could not be rewritten to run batched'}; "
            "export it with a dynamic batch to run faster"
        )
    elif exported:
        notes.append(f"the model was exported at batch {exported}; bitsearch rewrote it to run at any batch size")
    if job.memory_estimate:
        notes.append(f"expected peak memory: {job.memory_estimate['text']}")
    return notes


def job_out(job: Job, candidates: int, owner_view: bool = True) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        method=job.method,
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        budget=job.budget,
        options=job.options,
        validate_top_k=job.validate_top_k,
        progress=Progress(step=job.step, total=job.total, phase=job.phase, best_val_top1=job.best_val_top1),
        error=job.error if owner_view else public_error(job.status, job.error),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        search_seconds=job.search_seconds,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        public=job.public,
        candidates=candidates,
        notes=job_notes(job),
        expected_memory_mb=(job.memory_estimate or {}).get("mb"),
        links={
            "self": f"/jobs/{job.id}",
            "candidates": f"/jobs/{job.id}/candidates",
            "cancel": f"/jobs/{job.id}/cancel",
            "page": f"/leaderboard/jobs/{job.id}",
        },
    )


def candidate_out(c: CandidateRecord, with_layers: bool = False, owner_view: bool = True) -> CandidateOut:
    layers = c.config.get("layers", {}) if with_layers else None
    return CandidateOut(
        id=c.id,
        job_id=c.job_id,
        seq=c.seq,
        avg_wbits=c.avg_wbits,
        weight_bytes=c.weight_bytes,
        bitops=c.bitops,
        act_bytes=c.act_bytes,
        latency_us=c.latency_us,
        score=c.score,
        val_top1=c.val_top1,
        val_sqnr_db=c.val_sqnr_db,
        pareto=c.pareto,
        recommended=c.recommended,
        validation=None if c.validation is None else _validation_out(c, owner_view),
        w_bits=None if layers is None else {k: v["w_bits"] for k, v in layers.items()},
        a_bits=None if layers is None else {k: v["a_bits"] for k, v in layers.items()},
    )


def _validation_out(c: CandidateRecord, owner_view: bool) -> ValidationOut:
    v = ValidationOut.model_validate(c.validation)
    return v if owner_view else v.model_copy(update={"error": public_error(v.status, v.error)})
