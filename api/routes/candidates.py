"""/candidates: one candidate, its bit-width config as a download, its packed model once validated."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api import deps
from api.routes.jobs import get_job_or_404
from api.schemas import CandidateOut
from api.security import Caller, optional_caller
from api.views import candidate_out
from store.artifacts import ArtifactStore
from store.models import CandidateRecord

router = APIRouter(tags=["candidates"])
# Ids are 32-bit in the database; a larger number cannot name a candidate (and must not reach the query).
CandidateId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


def get_candidate_or_404(db: Session, candidate_id: int, who: Caller) -> CandidateRecord:
    cand = db.get(CandidateRecord, candidate_id)
    if cand is None:
        raise HTTPException(404, f"no candidate with id {candidate_id}")
    try:
        get_job_or_404(db, cand.job_id, who)
    except HTTPException:
        raise HTTPException(404, f"no candidate with id {candidate_id}") from None
    return cand


@router.get("/candidates/{candidate_id}", response_model=CandidateOut, summary="A candidate with per-layer bits")
def get_candidate(candidate_id: CandidateId, who: Caller = Depends(optional_caller),
                  db: Session = Depends(deps.db)) -> CandidateOut:
    cand = get_candidate_or_404(db, candidate_id, who)
    return candidate_out(cand, with_layers=True, owner_view=cand.job.owner == who.owner)


@router.get("/candidates/{candidate_id}/config", summary="The bit-width config (bitsearch.config JSON)",
            response_class=Response, responses={200: {"content": {"application/json": {}}}})
def get_config(candidate_id: CandidateId, who: Caller = Depends(optional_caller), db: Session = Depends(deps.db)) -> Response:
    cand = get_candidate_or_404(db, candidate_id, who)
    body = json.dumps(cand.config, indent=2)
    return Response(body, media_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="bitsearch-candidate-{candidate_id}.json"'})


@router.get("/candidates/{candidate_id}/packed", summary="The packed low-bit model (zip) of a validated candidate",
            response_class=StreamingResponse, responses={200: {"content": {"application/zip": {}}}})
def get_packed(candidate_id: CandidateId, who: Caller = Depends(optional_caller), db: Session = Depends(deps.db),
               store: ArtifactStore = Depends(deps.artifacts)) -> StreamingResponse:
    cand = get_candidate_or_404(db, candidate_id, who)
    v = cand.validation
    if v is None or v.status != "succeeded" or not v.packed_path:
        state = "not validated yet" if v is None else f"validation {v.status}"
        raise HTTPException(404, f"candidate {candidate_id} has no packed model ({state})")
    directory = Path(v.packed_path)
    if not directory.is_dir() or store.root not in directory.resolve().parents:
        raise HTTPException(404, f"the packed model of candidate {candidate_id} is missing from the artifact store")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(directory.iterdir()):
            zf.write(f, f.name)
    buf.seek(0)
    return StreamingResponse(buf, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="bitsearch-candidate-{candidate_id}-packed.zip"'})
