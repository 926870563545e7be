"""Checking and storing uploads.

An upload is staged (hashed into a temporary file inside the artifact store), analysed in a child process
(api/analysis.py: the API process never loads a stranger's file), and recorded in the database; only once that
transaction has committed is the staged file moved to its final, content-addressed name. A request refused after
staging (a 4xx, a lost race, a crash) therefore leaves neither a row nor a file, and a final file is never
removed: another committed row may refer to it.

Rows are inserted with ON CONFLICT DO NOTHING and read back, so concurrent uploads of the same file end with one
row per sha256 whatever the interleaving; the same holds for ownerships and the built-in data sets' rows.
"""

from __future__ import annotations

import errno
import hashlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from api.analysis import AnalysisFailed, DatasetAnalysis, ModelAnalysis, analyse
from api.services.errors import CannotRun, Conflict, InvalidRequest, NotFound, ServiceError, StorageFull, TooLarge
from store.artifacts import ArtifactStore, StagedFile
from store.artifacts import TooLarge as OverLimit
from store.db import session_scope
from store.models import DatasetRecord, ModelRecord, Ownership
from store.settings import Settings

BUILTIN = {"fashion-mnist": {"sample_shape": [1, 28, 28], "num_classes": 10, "num_samples": 70000}}

# pg_advisory_xact_lock's two-key form: this namespace, then a hash of the owner (its own key space, apart from
# the one-key lock the migrations take).
_OWNER_LOCK_NAMESPACE = 0x6273  # "bs"


# -- the summary feasibility checks read -------------------------------------------------------------------------


class ModelSummary:
    """The part of a LoadedModel that search.cost.check_feasible reads, rebuilt from a stored analysis: the layers,
    and the bytes of every float tensor that is not a layer's weight or bias (LoadedModel.unquantized_bytes)."""

    def __init__(self, analysis: dict, total_params: int):
        from search.model import Layer

        self.layers = [
            Layer(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) for d in analysis["layers"]
        ]
        self.total_params = total_params
        self.unquantized_bytes = int(analysis["unquantized_bytes"])
        self.static_batch = analysis.get("static_batch")  # analyses stored before rebatching lack the notes
        self.batch_note = analysis.get("batch_note")


def check_feasible(summary: ModelSummary, budget, opts) -> None:
    from search.cost import BudgetError
    from search.cost import check_feasible as feasible

    if budget.latency_us is not None:  # checked once the worker has measured the latency table
        return
    try:
        feasible(summary, budget, opts.w_bits, opts.a_bits, None, opts.scheme)
    except BudgetError as e:
        raise CannotRun(f"infeasible budget: {e}") from e


# -- staging and analysis (before any transaction) ----------------------------------------------------------------


@dataclass
class Prepared:
    """A staged upload and what its analysis found (None: a row for this sha256 exists and needs nothing)."""

    kind: str  # "model" | "dataset"
    staged: StagedFile
    filename: str
    analysis: ModelAnalysis | DatasetAnalysis | None

    @property
    def sha256(self) -> str:
        return self.staged.sha256

    def place(self) -> None:
        """Move the file to its final name; only after the rows naming it have committed."""
        self.staged.commit()

    def discard(self) -> None:
        self.staged.discard()


def _stage(store: ArtifactStore, kind: str, src: BinaryIO, max_bytes: int) -> StagedFile:
    """Stage an upload; over the limit: TooLarge; disk full: StorageFull. Either way nothing is left behind."""
    try:
        return store.stage(kind, src, max_bytes)
    except OverLimit as e:
        raise TooLarge(str(e)) from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull("the artifact store is full; the upload was not stored") from e
        raise


_inflight: dict[tuple[str, str], Future] = {}
_inflight_lock = threading.Lock()


def _analyse_once(kind: str, sha: str, path: Path, settings: Settings):
    """Concurrent uploads of the same file share one analysis (and one child)."""
    with _inflight_lock:
        future = _inflight.get((kind, sha))
        mine = future is None
        if mine:
            future = _inflight[(kind, sha)] = Future()
    if not mine:
        return future.result()
    try:
        result = analyse(kind, path, settings)
        future.set_result(result)
        return result
    except BaseException as e:
        future.set_exception(e)
        raise
    finally:
        with _inflight_lock:
            _inflight.pop((kind, sha), None)


def _refused(e: AnalysisFailed, what: str, filename: str) -> ServiceError:
    return e.kind(f"{what} {filename!r}: {e.message}" if e.about_file else e.message)


def _prepare(settings: Settings, store: ArtifactStore, kind: str, src: BinaryIO, filename: str) -> Prepared:
    """Stage an upload and analyse it, unless a row for its sha256 already holds what the analysis would find."""
    is_model = kind == "model"
    staged = _stage(store, f"{kind}s", src, settings.max_model_bytes if is_model else settings.max_dataset_bytes)
    try:
        with session_scope(settings.resolved_database_url()) as db:
            if is_model:  # a row from before analyses were kept needs one too
                known = db.scalar(select(ModelRecord.analysis).where(ModelRecord.id == staged.sha256)) is not None
            else:
                known = db.get(DatasetRecord, staged.sha256) is not None
        analysis = None
        if not known:
            try:
                analysis = _analyse_once(kind, staged.sha256, staged.tmp, settings)
            except AnalysisFailed as e:
                raise _refused(e, "model" if is_model else "data set", filename) from None
        return Prepared(kind, staged, filename, analysis)
    except BaseException:
        staged.discard()
        raise


def prepare_model(settings: Settings, store: ArtifactStore, src: BinaryIO, filename: str) -> Prepared:
    return _prepare(settings, store, "model", src, filename)


def prepare_dataset(settings: Settings, store: ArtifactStore, src: BinaryIO, filename: str) -> Prepared:
    return _prepare(settings, store, "dataset", src, filename)


def backfill_model_analysis(settings: Settings, store: ArtifactStore, model_id: str, owner: str) -> None:
    """A model stored before analyses were kept gets one now, from its stored file, before it is reused by id."""
    url = settings.resolved_database_url()
    with session_scope(url) as db:
        row = db.execute(select(ModelRecord.analysis, ModelRecord.filename).where(ModelRecord.id == model_id)).first()
        if row is None or row[0] is not None or not owns(db, owner, "model", model_id):
            return  # nothing to do; a missing or foreign model gets its 404 later
    path = store.path("models", model_id)
    if not path.exists():
        raise NotFound(f"the file of model {model_id!r} is missing from the artifact store; upload it again")
    try:
        result = _analyse_once("model", model_id, path, settings)
    except AnalysisFailed as e:
        raise _refused(e, "model", row[1]) from None
    with session_scope(url) as db:
        db.execute(
            update(ModelRecord)
            .where(ModelRecord.id == model_id, ModelRecord.analysis.is_(None))
            .values(analysis=result.stored())
        )


# -- the transaction --------------------------------------------------------------------------------------------


def lock_owner(db: Session, owner: str) -> None:
    """Serialize this owner's job submissions until the transaction ends, so that counting their active jobs and
    inserting one is atomic. Must be the transaction's first statement.

    PostgreSQL: a transaction-scoped advisory lock on the owner (other owners are not held up). SQLite: BEGIN
    IMMEDIATE takes the database's write lock now instead of at the first write; SQLite has one writer at a time
    anyway, and a deferred transaction could count, lose the race for the write lock, and insert on a stale count.
    """
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big", signed=True)
        db.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": _OWNER_LOCK_NAMESPACE, "key": key})
    elif dialect == "sqlite":
        db.connection().exec_driver_sql("BEGIN IMMEDIATE")
    else:
        raise RuntimeError(f"no owner lock for database {dialect!r}")


def _insert_ignore(db: Session, table, values: dict) -> None:
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    db.execute(insert(table).values(**values).on_conflict_do_nothing())


def own(db: Session, owner: str, kind: str, object_id: str) -> None:
    _insert_ignore(db, Ownership.__table__, {"owner": owner, "kind": kind, "object_id": object_id})


def owns(db: Session, owner: str, kind: str, object_id: str) -> bool:
    return (
        db.scalar(
            select(Ownership.id).where(
                Ownership.owner == owner, Ownership.kind == kind, Ownership.object_id == object_id
            )
        )
        is not None
    )


def _fresh(db: Session, cls, key: str):
    return db.get(cls, key, populate_existing=True)


def record_model(db: Session, prepared: Prepared, owner: str) -> tuple[ModelRecord, ModelSummary]:
    a = prepared.analysis
    if a is not None:
        _insert_ignore(
            db,
            ModelRecord.__table__,
            dict(
                id=prepared.sha256,
                filename=prepared.filename[:255],
                size_bytes=prepared.staged.size,
                num_layers=len(a.layers),
                total_params=a.total_params,
                input_shape=a.input_shape,
                num_outputs=a.num_outputs,
                analysis=a.stored(),
            ),
        )
        # A row from before analyses were kept gets this one.
        db.execute(
            update(ModelRecord)
            .where(ModelRecord.id == prepared.sha256, ModelRecord.analysis.is_(None))
            .values(analysis=a.stored())
        )
    rec = _fresh(db, ModelRecord, prepared.sha256)
    if rec is None or rec.analysis is None:  # models are never deleted; this cannot happen short of manual edits
        raise Conflict("the model changed while it was being stored; send it again")
    own(db, owner, "model", rec.id)
    return rec, ModelSummary(rec.analysis, rec.total_params)


def model_by_id(db: Session, model_id: str, owner: str) -> tuple[ModelRecord, ModelSummary]:
    rec = db.get(ModelRecord, model_id)
    if rec is None or not owns(db, owner, "model", model_id):
        raise NotFound(f"no model with id {model_id!r}")
    if rec.analysis is None:
        raise Conflict(f"model {model_id!r} is being analysed again; retry in a few seconds")
    return rec, ModelSummary(rec.analysis, rec.total_params)


def record_dataset(db: Session, prepared: Prepared, owner: str) -> DatasetRecord:
    a = prepared.analysis
    if a is not None:
        _insert_ignore(
            db,
            DatasetRecord.__table__,
            dict(
                id=prepared.sha256,
                name=prepared.filename.rsplit(".", 1)[0][:255] or "dataset",
                builtin=False,
                size_bytes=prepared.staged.size,
                num_samples=a.num_samples,
                sample_shape=a.sample_shape,
                num_classes=a.num_classes,
            ),
        )
    rec = _fresh(db, DatasetRecord, prepared.sha256)
    if rec is None:
        raise Conflict("the data set changed while it was being stored; send it again")
    own(db, owner, "dataset", rec.id)
    return rec


def builtin_dataset(db: Session, name: str) -> DatasetRecord:
    if name not in BUILTIN:
        raise InvalidRequest(f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN)}")
    rec = db.get(DatasetRecord, name)
    if rec is None:
        _insert_ignore(db, DatasetRecord.__table__, dict(id=name, name=name, builtin=True, **BUILTIN[name]))
        rec = _fresh(db, DatasetRecord, name)
    return rec


def dataset_by_id(db: Session, dataset_id: str, owner: str) -> DatasetRecord:
    if dataset_id in BUILTIN:
        return builtin_dataset(db, dataset_id)
    rec = db.get(DatasetRecord, dataset_id)
    if rec is None or not owns(db, owner, "dataset", dataset_id):
        raise NotFound(f"no data set with id {dataset_id!r}")
    return rec


def check_compatible(model: ModelRecord, dataset: DatasetRecord) -> None:
    if list(dataset.sample_shape) != list(model.input_shape):
        raise CannotRun(
            f"the data set's inputs are {list(dataset.sample_shape)} per sample but the model "
            f"takes {list(model.input_shape)}"
        )
    if dataset.num_classes is not None and dataset.num_classes > model.num_outputs:
        raise CannotRun(
            f"the data set has labels up to {dataset.num_classes - 1} but the model has {model.num_outputs} outputs"
        )


def check_finetune(spec, builtin_data: bool, settings: Settings) -> None:
    """Fine-tuning a job could not honour here is refused before anything is stored, not when the worker starts
    the job: an uploaded data set has no training split, and one fine-tune may not exceed this server's limit."""
    from search.data import FASHION_MNIST_TRAIN

    ft = spec.finetune
    if not ft.enabled:
        return
    if not builtin_data:
        raise CannotRun(
            "invalid options: fine-tuning needs a labelled training set; only the built-in data sets "
            "have one (an uploaded data set is calibration, validation and test only)"
        )
    train_images = FASHION_MNIST_TRAIN if ft.samples is None else min(ft.samples, FASHION_MNIST_TRAIN)
    images = ft.steps * ft.batch_size if ft.steps else ft.epochs * train_images
    if images > settings.max_finetune_images:
        raise CannotRun(
            f"invalid options: one fine-tune would run {images} training images, over this server's "
            f"limit of {settings.max_finetune_images}; lower finetune epochs, steps or samples"
        )
