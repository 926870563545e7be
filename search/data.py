"""Data sets: the user file format, the built-in Fashion-MNIST, deterministic splits.

User data is a safetensors file (data only, no code) holding
  inputs  float32 [N, ...]  one sample per row, already preprocessed for the model
  labels  int64   [N]       optional; class indices in [0, num_classes)
Calibration and validation splits come from one seeded permutation, so a
(dataset, seed, calib_size) triple always yields the same images.

The built-in `fashion-mnist` reads the idx files that Debian's
`dataset-fashion-mnist` package installs; its 60k training images are split
into 55k for training the reference models and 5k held out for validation, and
the official 10k test set is kept for reporting.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("BITSEARCH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_HELDOUT = 5000
FASHION_MNIST_TRAIN = 60000 - FASHION_MNIST_HELDOUT  # the training split fine-tuning draws from
BUILTIN_DATASETS = ("fashion-mnist",)
DEFAULT_CALIB_SIZE = 1024
DEFAULT_SPLIT_SEED = 0


class DatasetError(ValueError):
    """A data set that cannot be used: missing, malformed, or not matching the model."""


@dataclass
class LabelledSet:
    inputs: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor | slice) -> LabelledSet:
        return LabelledSet(self.inputs[index], None if self.labels is None else self.labels[index])

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1


@dataclass
class DataSplits:
    """calib: ranges and search scores; val: held-out scoring; test: final reporting (may be None)."""

    name: str
    calib: LabelledSet
    val: LabelledSet
    test: LabelledSet | None = None
    train: LabelledSet | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.calib.inputs.shape[1:])


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DatasetError(
            f"Fashion-MNIST file {path} is missing: install Debian's package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)"
        ) from e
    (magic,) = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _normalise_images(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


_FMNIST_CACHE: dict[str, LabelledSet] = {}


def fashion_mnist(part: str) -> LabelledSet:
    """part: 'train' (60k) or 'test' (10k); inputs normalised, shape [N, 1, 28, 28]."""
    if part not in _FMNIST_CACHE:
        prefix = {"train": "train", "test": "t10k"}[part]
        images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        _FMNIST_CACHE[part] = LabelledSet(_normalise_images(images), torch.from_numpy(labels.astype(np.int64)))
    return _FMNIST_CACHE[part]


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def fashion_mnist_splits(calib_size: int = DEFAULT_CALIB_SIZE, seed: int = DEFAULT_SPLIT_SEED) -> DataSplits:
    full = fashion_mnist("train")
    # The train/held-out cut is fixed (seed 0) so the reference models never saw the held-out images,
    # whatever seed a search uses for its calibration subset.
    order = _permutation(len(full), 0)
    heldout, train_idx = order[:FASHION_MNIST_HELDOUT], order[FASHION_MNIST_HELDOUT:]
    train = full.subset(train_idx)
    calib_idx = train_idx[_permutation(len(train_idx), seed)[:calib_size]]
    return DataSplits(
        "fashion-mnist", calib=full.subset(calib_idx), val=full.subset(heldout), test=fashion_mnist("test"), train=train
    )


def load_dataset_file(path: str | os.PathLike, max_bytes: int | None = None) -> LabelledSet:
    """Read a user data set; every problem is a DatasetError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise DatasetError(f"data set file is {path.stat().st_size} bytes, over the limit of {max_bytes}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DatasetError(f"data set is not a readable safetensors file: {e}") from e
    if "inputs" not in tensors:
        raise DatasetError(f"data set has no `inputs` tensor (found: {sorted(tensors)})")
    unknown = set(tensors) - {"inputs", "labels"}
    if unknown:
        raise DatasetError(
            f"data set has unexpected tensors {sorted(unknown)}; expected `inputs` and optional `labels`"
        )
    inputs = tensors["inputs"]
    if inputs.dtype != torch.float32:
        raise DatasetError(f"`inputs` must be float32, got {inputs.dtype}")
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise DatasetError(f"`inputs` must be [N, ...] with N >= 1, got shape {list(inputs.shape)}")
    if not torch.isfinite(inputs).all():
        raise DatasetError("`inputs` holds NaN or Inf values")
    labels = tensors.get("labels")
    if labels is not None:
        if labels.dtype != torch.int64:
            raise DatasetError(f"`labels` must be int64, got {labels.dtype}")
        if labels.shape != (inputs.shape[0],):
            raise DatasetError(f"`labels` must have shape [{inputs.shape[0]}], got {list(labels.shape)}")
        if labels.min() < 0:
            raise DatasetError(f"`labels` holds a negative class index ({int(labels.min())})")
    return LabelledSet(inputs, labels)


def save_dataset_file(data: LabelledSet, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {"inputs": data.inputs.contiguous().float()}
    if data.labels is not None:
        tensors["labels"] = data.labels.contiguous().long()
    save_file(tensors, str(path))


def splits_from_set(
    name: str, data: LabelledSet, calib_size: int = DEFAULT_CALIB_SIZE, seed: int = DEFAULT_SPLIT_SEED
) -> DataSplits:
    """Calibration is the first calib_size of a seeded permutation, validation the rest
    (or, for very small sets, the calibration images again)."""
    if len(data) < 2:
        raise DatasetError(f"data set has {len(data)} sample(s); at least 2 are needed")
    order = _permutation(len(data), seed)
    n_calib = min(calib_size, len(data) // 2) if len(data) <= calib_size else calib_size
    return DataSplits(name, calib=data.subset(order[:n_calib]), val=data.subset(order[n_calib:]))


def load_splits(
    source: str, calib_size: int = DEFAULT_CALIB_SIZE, seed: int = DEFAULT_SPLIT_SEED, max_bytes: int | None = None
) -> DataSplits:
    """`source` is a built-in name or the path of a safetensors data set."""
    if source == "fashion-mnist":
        return fashion_mnist_splits(calib_size, seed)
    if not Path(source).exists():
        raise DatasetError(f"unknown data set {source!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}) nor a file")
    return splits_from_set(Path(source).stem, load_dataset_file(source, max_bytes), calib_size, seed)
