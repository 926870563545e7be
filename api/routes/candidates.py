"""/candidates: one candidate, its bit-width config as a download, its packed model once validated."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api import deps
from api.schemas import CandidateOut
from api.security import Caller, optional_caller
from api.services.jobs import candidate_for, packed_directory
from api.views import candidate_out
from store.artifacts import ArtifactStore

router = APIRouter(tags=["candidates"])
# Ids are 32-bit in the database; a larger number cannot name a candidate (and must not reach the query).
CandidateId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


@router.get("/candidates/{candidate_id}", response_model=CandidateOut, summary="A candidate with per-layer bits")
def get_candidate(
    candidate_id: CandidateId, who: Caller = Depends(optional_caller), db: Session = Depends(deps.db)
) -> CandidateOut:
    cand = candidate_for(db, candidate_id, who.owner)
    return candidate_out(cand, with_layers=True, owner_view=cand.job.owner == who.owner)


@router.get(
    "/candidates/{candidate_id}/config",
    summary="The bit-width config (bitsearch.config JSON)",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}},
)
def get_config(
    candidate_id: CandidateId, who: Caller = Depends(optional_caller), db: Session = Depends(deps.db)
) -> Response:
    cand = candidate_for(db, candidate_id, who.owner)
    body = json.dumps(cand.config, indent=2)
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="bitsearch-candidate-{candidate_id}.json"'},
    )


@router.get(
    "/candidates/{candidate_id}/packed",
    summary="The packed low-bit model (zip) of a validated candidate",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def get_packed(
    candidate_id: CandidateId,
    who: Caller = Depends(optional_caller),
    db: Session = Depends(deps.db),
    store: ArtifactStore = Depends(deps.artifacts),
) -> StreamingResponse:
    directory = packed_directory(db, store, candidate_id, who.owner)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(directory.iterdir()):
            zf.write(f, f.name)
    buf.seek(0)
    return StreamingResponse(
        buf,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="bitsearch-candidate-{candidate_id}-packed.zip"'},
    )
