"""/candidates: one candidate, its bit-width config as a download, its packed and ONNX models once validated."""

from __future__ import annotations

import io
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api import deps
from api.schemas import CandidateOut
from api.security import Caller, optional_caller
from api.services.exports import candidate_export, packed_zip
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
    return StreamingResponse(
        io.BytesIO(packed_zip(directory)),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="bitsearch-candidate-{candidate_id}-packed.zip"'},
    )


@router.get(
    "/candidates/{candidate_id}/export",
    summary="The candidate as a download: ONNX QDQ model (once validated), config JSON, or packed model zip",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}, "application/json": {}, "application/zip": {}}},
        422: {"description": "the config has no ONNX form (the reason names the layer)"},
    },
)
def get_export(
    candidate_id: CandidateId,
    format: Annotated[Literal["onnx", "config", "packed"], Query(description="onnx | config | packed")] = "onnx",
    who: Caller = Depends(optional_caller),
    db: Session = Depends(deps.db),
    store: ArtifactStore = Depends(deps.artifacts),
) -> StreamingResponse:
    d = candidate_export(db, store, candidate_id, who.owner, format)
    body = iter([d.body]) if isinstance(d.body, bytes) else d.body
    return StreamingResponse(
        body, media_type=d.media_type, headers={"Content-Disposition": f'attachment; filename="{d.filename}"'}
    )
