"""A candidate as a download in each format: its config, its packed model, its ONNX QDQ model.

The ONNX model is written by the validation worker beside the packed model (kernels/onnx_export.py,
write_onnx_artifact), not built here on request: an export calibrates the model and runs torch's ONNX exporter,
seconds of CPU and a model's worth of memory per call, which the API process must not spend while it serves
other requests. So a candidate has an ONNX model once it is validated, like its packed model, and a request for
one is a file read.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore

from .errors import CannotRun, NotFound
from .jobs import candidate_for, packed_directory

EXPORT_FORMATS = ("onnx", "config", "packed")
# The names kernels.lower and kernels.onnx_export write; spelled here so the API does not import torch.
PACKED_FILES = ("model.pt2", "config.json")
ONNX_FILE, ONNX_ERROR_FILE = "model.onnx", "onnx-error.txt"
CHUNK = 1 << 20


@dataclass
class Download:
    body: bytes | Iterator[bytes]
    media_type: str
    filename: str


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def packed_zip(directory: Path) -> bytes:
    """The packed model's files (not the ONNX model stored beside them) as one zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in PACKED_FILES:
            zf.write(directory / name, name)
    return buf.getvalue()


def candidate_export(db: Session, store: ArtifactStore, candidate_id: int, owner: str | None, fmt: str) -> Download:
    stem = f"bitsearch-candidate-{candidate_id}"
    if fmt == "config":
        cand = candidate_for(db, candidate_id, owner)
        return Download(json.dumps(cand.config, indent=2).encode(), "application/json", f"{stem}.json")
    if fmt == "packed":
        return Download(
            packed_zip(packed_directory(db, store, candidate_id, owner)), "application/zip", f"{stem}-packed.zip"
        )
    if fmt != "onnx":
        raise NotFound(f"no export format {fmt!r}; formats are {', '.join(EXPORT_FORMATS)}")
    try:
        directory = packed_directory(db, store, candidate_id, owner)
    except NotFound as e:
        raise NotFound(
            e.message.replace(
                "has no packed model", "has no ONNX model yet: it is written when the candidate is validated"
            )
        ) from e
    path = directory / ONNX_FILE
    if path.is_file():
        return Download(_chunks(path), "application/octet-stream", f"{stem}.onnx")
    reason = directory / ONNX_ERROR_FILE
    if reason.is_file():
        raise CannotRun(f"candidate {candidate_id} has no ONNX model: {reason.read_text()[:2000]}")
    raise NotFound(f"candidate {candidate_id} was validated before ONNX export existed; it has no ONNX model")
