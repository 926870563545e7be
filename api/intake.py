"""Checking and storing uploads: models and data sets are parsed as data only (search/archive.py never
unpickles), checked against each other, and stored once under their sha256."""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from typing import BinaryIO

from fastapi import HTTPException
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore, TooLarge
from sqlalchemy import select

from store.models import DatasetRecord, ModelRecord, Ownership
from store.settings import Settings

BUILTIN = {"fashion-mnist": {"sample_shape": [1, 28, 28], "num_classes": 10, "num_samples": 70000}}

_models: OrderedDict[str, object] = OrderedDict()  # sha256 -> LoadedModel, a few kept for feasibility checks
_models_lock = threading.Lock()


def _cache(sha: str, model) -> None:
    with _models_lock:
        _models[sha] = model
        _models.move_to_end(sha)
        while len(_models) > 4:
            _models.popitem(last=False)


def loaded_model(settings: Settings, store: ArtifactStore, sha: str):
    from search.model import load_model

    with _models_lock:
        if sha in _models:
            return _models[sha]
    model = load_model(store.path("models", sha), max_bytes=settings.max_model_bytes, max_layers=settings.max_layers)
    _cache(sha, model)
    return model


def _num_outputs(model) -> int:
    import torch

    x = torch.zeros((1, *model.input_shape))
    out = model.forward(x)
    if out.ndim != 2:
        raise HTTPException(422, f"the model's output has shape {list(out.shape)}; bitsearch needs [batch, classes] "
                                 "logits")
    return int(out.shape[1])


def _stage(store: ArtifactStore, kind: str, src: BinaryIO, max_bytes: int):
    """Stage an upload; over the limit: 413; disk full: 507. Either way nothing is left behind."""
    try:
        return store.stage(kind, src, max_bytes)
    except TooLarge as e:
        raise HTTPException(413, str(e)) from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HTTPException(507, "the artifact store is full; the upload was not stored") from e
        raise


def _own(db: Session, owner: str, kind: str, object_id: str) -> None:
    if not owns(db, owner, kind, object_id):
        db.add(Ownership(owner=owner, kind=kind, object_id=object_id))
        db.flush()


def owns(db: Session, owner: str, kind: str, object_id: str) -> bool:
    return db.scalar(select(Ownership.id).where(Ownership.owner == owner, Ownership.kind == kind,
                                                Ownership.object_id == object_id)) is not None


def register_model(db: Session, settings: Settings, store: ArtifactStore, src: BinaryIO, filename: str, owner: str):
    """Store an uploaded .pt2 after checking it; returns (record, LoadedModel). Bad archives: 400."""
    from search.archive import ArchiveError
    from search.model import load_model

    staged = _stage(store, "models", src, settings.max_model_bytes)
    try:
        existing = db.get(ModelRecord, staged.sha256)
        if existing is not None:
            staged.discard()
            _own(db, owner, "model", existing.id)
            return existing, loaded_model(settings, store, existing.id)
        try:
            model = load_model(staged.tmp, max_bytes=settings.max_model_bytes, max_layers=settings.max_layers)
        except ArchiveError as e:
            raise HTTPException(400, f"model {filename!r}: {e}") from e
        num_outputs = _num_outputs(model)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    rec = ModelRecord(id=staged.sha256, filename=filename[:255], size_bytes=staged.size,
                      num_layers=len(model.layers), total_params=int(model.total_params),
                      input_shape=list(model.input_shape), num_outputs=num_outputs)
    db.add(rec)
    db.flush()
    _own(db, owner, "model", rec.id)
    _cache(rec.id, model)
    return rec, model


def model_by_id(db: Session, settings: Settings, store: ArtifactStore, model_id: str, owner: str):
    rec = db.get(ModelRecord, model_id)
    if rec is None or not owns(db, owner, "model", model_id):
        raise HTTPException(404, f"no model with id {model_id!r}")
    return rec, loaded_model(settings, store, rec.id)


def builtin_dataset(db: Session, name: str) -> DatasetRecord:
    if name not in BUILTIN:
        raise HTTPException(400, f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN)}")
    rec = db.get(DatasetRecord, name)
    if rec is None:
        rec = DatasetRecord(id=name, name=name, builtin=True, **BUILTIN[name])
        db.add(rec)
        db.flush()
    return rec


def register_dataset(db: Session, settings: Settings, store: ArtifactStore, src: BinaryIO, filename: str,
                     owner: str):
    from search.data import DatasetError, load_dataset_file

    staged = _stage(store, "datasets", src, settings.max_dataset_bytes)
    try:
        existing = db.get(DatasetRecord, staged.sha256)
        if existing is not None:
            staged.discard()
            _own(db, owner, "dataset", existing.id)
            return existing
        try:
            data = load_dataset_file(staged.tmp, max_bytes=settings.max_dataset_bytes)
        except DatasetError as e:
            raise HTTPException(400, f"data set {filename!r}: {e}") from e
        if len(data) < 2:
            raise HTTPException(400, f"data set {filename!r} has {len(data)} sample(s); at least 2 are needed")
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    rec = DatasetRecord(id=staged.sha256, name=filename.rsplit(".", 1)[0][:255] or "dataset", builtin=False,
                        size_bytes=staged.size, num_samples=len(data), sample_shape=list(data.inputs.shape[1:]),
                        num_classes=data.num_classes)
    db.add(rec)
    db.flush()
    _own(db, owner, "dataset", rec.id)
    return rec


def dataset_by_id(db: Session, dataset_id: str, owner: str) -> DatasetRecord:
    if dataset_id in BUILTIN:
        return builtin_dataset(db, dataset_id)
    rec = db.get(DatasetRecord, dataset_id)
    if rec is None or not owns(db, owner, "dataset", dataset_id):
        raise HTTPException(404, f"no data set with id {dataset_id!r}")
    return rec


def check_compatible(model: ModelRecord, dataset: DatasetRecord) -> None:
    if list(dataset.sample_shape) != list(model.input_shape):
        raise HTTPException(422, f"the data set's inputs are {list(dataset.sample_shape)} per sample but the model "
                                 f"takes {list(model.input_shape)}")
    if dataset.num_classes is not None and dataset.num_classes > model.num_outputs:
        raise HTTPException(422, f"the data set has labels up to {dataset.num_classes - 1} but the model has "
                                 f"{model.num_outputs} outputs")


def check_finetune(method: str, options, builtin_data: bool, settings: Settings) -> None:
    """Fine-tuning options the job could not honour are refused before anything is stored, not when the
    worker starts the job."""
    from search.data import FASHION_MNIST_TRAIN
    from search.searches import SearchError, check_method_options

    try:
        check_method_options(method, options)
    except SearchError as e:
        raise HTTPException(422, f"invalid options: {e}") from e
    ft = options.finetune
    if not ft.enabled:
        return
    if not builtin_data:
        raise HTTPException(422, "invalid options: fine-tuning needs a labelled training set; only the built-in "
                                 "data sets have one (an uploaded data set is calibration, validation and test only)")
    train_images = FASHION_MNIST_TRAIN if ft.samples is None else min(ft.samples, FASHION_MNIST_TRAIN)
    images = ft.steps * ft.batch_size if ft.steps else ft.epochs * train_images
    if images > settings.max_finetune_images:
        raise HTTPException(422, f"invalid options: one fine-tune would run {images} training images, over this "
                                 f"server's limit of {settings.max_finetune_images}; lower finetune epochs, steps "
                                 "or samples")
