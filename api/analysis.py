"""Uploads are analysed in a child process, never in the API process.

Loading a stranger's .pt2 or safetensors file can take memory and time out of all proportion to its size (a
declared input shape of 2^28, a stride-0 weight), and torch's deserializer is process-global state that two
concurrent uploads would share. So each analysis runs in a child forked from a fork server that has torch and
the loaders preloaded (a child starts in milliseconds): the child caps its own address space (RLIMIT_AS) and CPU
time, the parent kills it at the time limit, and the child's only output is one JSON message, read as bytes and
validated here. Nothing the child sends is unpickled: it has processed hostile data.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.services.errors import Busy, CannotRun, InvalidRequest, ServiceError, TooLarge
from store.settings import Settings

log = logging.getLogger("bitsearch.api")

MAX_RESULT_BYTES = 64 * 1024 * 1024
PRELOAD = ["api.analysis_child", "api.analysis"]

_context_lock = threading.Lock()
_context = None
_slots: threading.BoundedSemaphore | None = None


class AnalysisFailed(Exception):
    """An upload the child refused or could not finish: the kind of refusal (a ServiceError class) and a one-line
    `message` for the client, which the caller prefixes with the file's name when `about_file`."""

    def __init__(self, kind: type[ServiceError], message: str, about_file: bool = True):
        super().__init__(message)
        self.kind, self.message, self.about_file = kind, message, about_file


Dim = Annotated[int, Field(ge=0, le=2**40)]
Count = Annotated[int, Field(ge=0, le=2**62)]


class LayerInfo(BaseModel):
    """search.model.Layer as JSON (tuples as lists); bounded, since a compromised child could send anything."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1024)
    op: Literal["conv1d", "conv2d", "linear"]
    weight_shape: list[Dim] = Field(max_length=8)
    groups: Annotated[int, Field(ge=1, le=2**31)]
    stride: list[Dim] = Field(max_length=4)
    padding: list[Dim] = Field(max_length=4)
    dilation: list[Dim] = Field(max_length=4)
    kernel: list[Dim] = Field(max_length=4)
    has_bias: bool
    params: Count
    macs: Count
    in_shape: list[Dim] = Field(max_length=8)
    out_shape: list[Dim] = Field(max_length=8)
    index: Annotated[int, Field(ge=0, le=2**31)]


class ModelAnalysis(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_shape: list[Annotated[int, Field(ge=1, le=2**40)]] = Field(max_length=8)
    static_batch: Annotated[int, Field(ge=1)] | None  # set when the graph only runs at its exported batch size
    exported_batch: Annotated[int, Field(ge=1)] | None = None
    batch_note: Annotated[str, Field(max_length=1000)] | None = None  # why it could not be made to run batched
    activation_largest: Count | None = None  # elements per sample (search.memory.activation_profile)
    activation_peak_live: Count | None = None
    activation_total: Count | None = None
    num_outputs: Annotated[int, Field(ge=1, le=2**31)]
    total_params: Count
    unquantized_bytes: Count
    layers: list[LayerInfo] = Field(max_length=1 << 16)

    def stored(self) -> dict:
        """What the models table keeps (the analysis column) for feasibility checks of later jobs."""
        return {
            "layers": [l.model_dump() for l in self.layers],
            "unquantized_bytes": self.unquantized_bytes,
            "static_batch": self.static_batch,
            "exported_batch": self.exported_batch,
            "batch_note": self.batch_note,
            "activation_largest": self.activation_largest,
            "activation_peak_live": self.activation_peak_live,
            "activation_total": self.activation_total,
        }


class DatasetAnalysis(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: Annotated[int, Field(ge=2, le=2**40)]
    sample_shape: list[Annotated[int, Field(ge=0, le=2**40)]] = Field(max_length=8)
    num_classes: Annotated[int, Field(ge=1, le=2**40)] | None


RESULTS = {"model": ModelAnalysis, "dataset": DatasetAnalysis}


def _ctx():
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def warm() -> None:
    """Start the fork server now (it imports torch once), so the first upload does not wait for it."""
    from multiprocessing import forkserver

    _ctx()
    forkserver.ensure_running()


def _child_main(conn, kind: str, path: str, opts: dict) -> None:
    from api import analysis_child  # preloaded in the fork server: already imported

    analysis_child.run(conn, kind, path, opts)


def analyse(kind: str, path: Path, settings: Settings) -> ModelAnalysis | DatasetAnalysis:
    """Analyse an uploaded file in a child; AnalysisFailed (4xx) when the file is refused or over a limit."""
    global _slots
    ctx = _ctx()
    with _context_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(settings.upload_analysis_concurrency)
    limit_mb, limit_s = settings.upload_analysis_memory_mb, settings.upload_analysis_time_s
    opts = {
        "memory_bytes": limit_mb * 1024 * 1024,
        "time_s": limit_s,
        "max_bytes": settings.max_model_bytes if kind == "model" else settings.max_dataset_bytes,
        "max_layers": settings.max_layers,
    }
    # Waiting for a slot counts against the time limit too: a request should not hang behind a queue of bombs.
    if not _slots.acquire(timeout=limit_s):
        raise AnalysisFailed(Busy, "the server is busy analysing other uploads; retry in a few seconds", False)
    timed_out = threading.Event()
    try:
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child_main, args=(writer, kind, str(path), opts), daemon=True, name=f"bitsearch-analyse-{kind}"
        )
        started = time.monotonic()
        proc.start()
        writer.close()  # the child holds the only write end: its death reads as EOF

        def kill():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(limit_s, kill)
        timer.daemon = True
        timer.start()
        try:
            try:
                raw = reader.recv_bytes(MAX_RESULT_BYTES)
            except (EOFError, OSError):
                raw = None
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        finally:
            timer.cancel()
            reader.close()
        seconds = time.monotonic() - started
    finally:
        _slots.release()
    if raw is None:
        if timed_out.is_set():
            raise AnalysisFailed(
                CannotRun, f"its analysis did not finish within this server's time limit of {limit_s:g} s"
            )
        log.warning("a %s analysis ended without a result (exit code %s) after %.1f s", kind, proc.exitcode, seconds)
        raise AnalysisFailed(
            CannotRun, f"it could not be analysed within this server's limits ({limit_mb} MB of memory, {limit_s:g} s)"
        )
    return _parse(kind, raw, limit_mb)


def _parse(kind: str, raw: bytes, limit_mb: int):
    try:
        message = json.loads(raw)
        if not isinstance(message, dict):
            raise ValueError("not an object")
        if "ok" in message:
            return RESULTS[kind].model_validate(message["ok"])
        error, text = message.get("error"), str(message.get("message", ""))[:600]
    except (ValueError, ValidationError) as e:
        log.error("a %s analysis sent an unusable result: %s", kind, str(e)[:300])
        raise AnalysisFailed(CannotRun, "it could not be analysed") from None
    if error == "invalid":
        raise AnalysisFailed(InvalidRequest, text)
    if error == "unfit":
        raise AnalysisFailed(CannotRun, text, about_file=False)
    if error == "memory":
        raise AnalysisFailed(TooLarge, f"its analysis needs more memory than this server's limit of {limit_mb} MB")
    log.error("a %s analysis failed: %s", kind, text)
    raise AnalysisFailed(CannotRun, "it could not be analysed")
