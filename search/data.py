"""Data sets: the user file format, the built-in Fashion-MNIST, deterministic splits.

User data is a safetensors file (data only, no code) holding either
  inputs  float32 [N, ...]     one sample per row, already preprocessed for the model
or
  images  uint8   [N, H, W, C] pixels, 4x smaller than float32
  mean    float32 [C]          the model's inputs are ((images / 255) - mean) / std,
  std     float32 [C]          as float32 [N, C, H, W]
and in both
  labels  int64   [N]          optional; class indices in [0, num_classes)
Calibration and validation splits come from one seeded permutation, so a
(dataset, seed, calib_size) triple always yields the same images. A file's
samples are read and decoded only when a split is used (FileSet), so a large
file costs memory for the images a search scores on, not for all of it.

The built-in `fashion-mnist` reads the idx files that Debian's
`dataset-fashion-mnist` package installs; its 60k training images are split
into 55k for training the reference models and 5k held out for validation, and
the official 10k test set is kept for reporting.
"""

from __future__ import annotations

import gzip
import json
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
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

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
        return self.calib.sample_shape


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


# -- user data set files ---------------------------------------------------------------------------------------

# safetensors dtype names: (numpy dtype, the name messages use). Only these may appear in a header; the others
# the format knows (bf16, fp8) are refused as unreadable, as no field of ours takes them.
_DTYPES = {
    "F64": ("<f8", "float64"),
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "I64": ("<i8", "int64"),
    "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"),
    "I8": ("i1", "int8"),
    "U64": ("<u8", "uint64"),
    "U32": ("<u4", "uint32"),
    "U16": ("<u2", "uint16"),
    "U8": ("u1", "uint8"),
    "BOOL": ("?", "bool"),
}
_MAX_HEADER = 16 * 2**20  # a data set's header names at most four tensors; this only bounds a hostile one
_CHUNK_BYTES = 32 * 2**20  # read (or decode into float32) at most this much at once
_FORMATS = {"inputs": {"inputs", "labels"}, "images": {"images", "mean", "std", "labels"}}


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def type_name(self) -> str:
        return _DTYPES[self.dtype][1]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(_DTYPES[self.dtype][0]).itemsize


def _unreadable(why: str) -> DatasetError:
    return DatasetError(f"data set is not a readable safetensors file: {why}")


def _read_header(f, size: int) -> dict[str, _Entry]:
    """The tensors a safetensors file declares, checked as the format requires: known dtypes, sizes that match
    the shapes, data that tiles the rest of the file exactly."""
    if size < 8:
        raise _unreadable(f"{size} bytes, shorter than a header")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(_MAX_HEADER, size - 8):
        raise _unreadable(f"its header claims {n} bytes")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a name appears twice")
        return dict(pairs)

    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError) as e:
        raise _unreadable(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _unreadable("its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        ok = (
            isinstance(info, dict)
            and set(info) == {"dtype", "shape", "data_offsets"}
            and info["dtype"] in _DTYPES
            and isinstance(info["shape"], list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info["data_offsets"], list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int and o >= 0 for o in info["data_offsets"])
        )
        if not ok:
            raise _unreadable(f"tensor {name!r} has a malformed entry (dtype, shape, data_offsets)")
        begin, stop = info["data_offsets"]
        nbytes = int(np.prod(info["shape"], dtype=object)) * np.dtype(_DTYPES[info["dtype"]][0]).itemsize
        if stop - begin != nbytes:
            raise _unreadable(f"tensor {name!r} holds {stop - begin} bytes but its shape needs {nbytes}")
        entries.append(_Entry(name, info["dtype"], tuple(info["shape"]), 8 + n + begin, 8 + n + stop))
    position = 8 + n
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != position:
            raise _unreadable(f"tensor {e.name!r} overlaps another or leaves a gap")
        position = e.end
    if position != size:
        raise _unreadable(f"its tensors end at byte {position} but the file has {size}")
    return {e.name: e for e in entries}


def _read(f, entry: _Entry, first: int = 0, count: int | None = None) -> np.ndarray:
    """Rows [first, first + count) of a tensor, read from the file (a copy, not a map of it)."""
    count = entry.shape[0] - first if count is None else count
    out = np.empty((count, *entry.shape[1:]), dtype=_DTYPES[entry.dtype][0])
    f.seek(entry.start + first * entry.row_bytes)
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise DatasetError("data set file ended early: it changed while it was being read")
        done += got
    return out


def _finite_scan(f, entry: _Entry) -> bool:
    rows = max(1, _CHUNK_BYTES // max(1, entry.row_bytes))
    for first in range(0, entry.shape[0], rows):
        if not np.isfinite(_read(f, entry, first, min(rows, entry.shape[0] - first))).all():
            return False
    return True


class DataFile:
    """A checked data set file: its layout, labels and normalisation; samples are decoded on demand.

    Two layouts (README.md, "What goes in"): float32 `inputs` [N, ...], already preprocessed, or uint8 `images`
    [N, H, W, C] with float32 `mean` and `std` [C], meaning inputs = ((images / 255) - mean) / std as
    [N, C, H, W]; either with optional int64 `labels` [N]."""

    def __init__(self, path: Path, size: int):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._open(f, size)
        except OSError as e:
            raise _unreadable(e.strerror or str(e)) from e

    def _open(self, f, size: int) -> None:
        entries = _read_header(f, size)
        names = set(entries)
        if "inputs" in names and "images" in names:
            raise DatasetError("data set has both `inputs` and `images`; a file holds one or the other")
        if "inputs" not in names and "images" not in names:
            raise DatasetError(
                f"data set has no `inputs` tensor (float32) nor `images` (uint8) (found: {sorted(names)})"
            )
        self.layout = "inputs" if "inputs" in names else "images"
        unknown = names - _FORMATS[self.layout]
        if unknown:
            expected = (
                "`inputs` and optional `labels`"
                if self.layout == "inputs"
                else "`images`, `mean`, `std` and optional `labels`"
            )
            raise DatasetError(f"data set has unexpected tensors {sorted(unknown)}; expected {expected}")
        x = self.samples = entries[self.layout]
        if self.layout == "inputs":
            if x.dtype != "F32":
                raise DatasetError(f"`inputs` must be float32, got {x.type_name}")
            if len(x.shape) < 2 or min(x.shape) == 0:
                raise DatasetError(f"`inputs` must be [N, ...] with N >= 1, got shape {list(x.shape)}")
            self.sample_shape = x.shape[1:]
            self.mean = self.std = None
        else:
            if x.dtype != "U8":
                raise DatasetError(f"`images` must be uint8, got {x.type_name}")
            if len(x.shape) != 4 or min(x.shape) == 0:
                raise DatasetError(f"`images` must be [N, H, W, C] with N >= 1, got shape {list(x.shape)}")
            channels = x.shape[3]
            self.sample_shape = (channels, x.shape[1], x.shape[2])
            self.mean, self.std = (self._norm(f, entries, which, channels) for which in ("mean", "std"))
            if not bool((self.std > 0).all()):
                raise DatasetError(f"`std` must be > 0 in every channel, got {self.std.tolist()}")
        self.num_samples = x.shape[0]
        self.labels = None
        if "labels" in entries:
            y = entries["labels"]
            if y.dtype != "I64":
                raise DatasetError(f"`labels` must be int64, got {y.type_name}")
            if y.shape != (self.num_samples,):
                raise DatasetError(f"`labels` must have shape [{self.num_samples}], got {list(y.shape)}")
            self.labels = torch.from_numpy(_read(f, y))
            if self.labels.min() < 0:
                raise DatasetError(f"`labels` holds a negative class index ({int(self.labels.min())})")
        if self.layout == "inputs" and not _finite_scan(f, x):
            raise DatasetError("`inputs` holds NaN or Inf values")

    @staticmethod
    def _norm(f, entries: dict[str, _Entry], which: str, channels: int) -> torch.Tensor:
        e = entries.get(which)
        if e is None:
            raise DatasetError(f"data set of uint8 `images` has no `{which}`: it needs `mean` and `std`, float32 [C]")
        if e.dtype != "F32":
            raise DatasetError(f"`{which}` must be float32, got {e.type_name}")
        if e.shape != (channels,):
            raise DatasetError(
                f"`{which}` must have shape [{channels}] (one value per channel of `images`), got {list(e.shape)}"
            )
        values = torch.from_numpy(_read(f, e))
        if not bool(torch.isfinite(values).all()):
            raise DatasetError(f"`{which}` holds NaN or Inf values")
        return values

    def _convert(self, raw: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(raw)
        if self.layout == "inputs":
            return x
        # In place, one float32 temporary per chunk; the same operations in the same order as the documented
        # ((images / 255) - mean) / std, so the values are bit for bit those of a float32 file made by it.
        return x.float().div_(255).sub_(self.mean).div_(self.std).permute(0, 3, 1, 2)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """The model inputs of these samples (float32 [len(rows), *sample_shape]), read in file order, a run of
        consecutive rows at a time."""
        rows = rows.numpy().astype(np.int64, copy=False)
        out = torch.empty((len(rows), *self.sample_shape), dtype=torch.float32)
        if len(rows) == 0:
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        limit = max(1, _CHUNK_BYTES // (4 * int(np.prod(self.sample_shape))))
        starts = [0, *(np.flatnonzero(np.diff(ordered) != 1) + 1).tolist(), len(rows)]
        with open(self.path, "rb") as f:
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                for i in range(a, b, limit):
                    j = min(b, i + limit)
                    out[torch.from_numpy(order[i:j])] = self._convert(_read(f, self.samples, int(ordered[i]), j - i))
        return out


class FileSet(LabelledSet):
    """Samples of a data set file, decoded at the first use of `inputs` (and kept): a split of a large file
    holds only its row numbers until a search reads it."""

    def __init__(self, source: DataFile, rows: torch.Tensor, labels: torch.Tensor | None):
        self.source, self.rows, self.labels = source, rows, labels
        self._inputs: torch.Tensor | None = None

    @property
    def inputs(self) -> torch.Tensor:
        if self._inputs is None:
            self._inputs = self.source.decode(self.rows)
        return self._inputs

    @inputs.setter
    def inputs(self, value: torch.Tensor) -> None:
        self._inputs = value

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"FileSet({self.source.path.name!r}, {len(self)} samples of {list(self.sample_shape)})"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.source.sample_shape)

    def subset(self, index: torch.Tensor | slice) -> LabelledSet:
        if self._inputs is not None:
            return LabelledSet(self._inputs[index], None if self.labels is None else self.labels[index])
        rows = self.rows[index]
        labels = None if self.source.labels is None else self.source.labels[rows]
        return FileSet(self.source, rows, labels)


def load_dataset_file(path: str | os.PathLike, max_bytes: int | None = None) -> LabelledSet:
    """Open and check a user data set; every problem is a DatasetError naming it.

    Only the header, the labels and the normalisation are read now (for float32 `inputs` also a chunked pass
    checking that every value is finite); samples are read and decoded when a split's `inputs` is first used,
    so a large file costs memory only for the samples a search uses."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _unreadable(e.strerror or str(e)) from e
    if max_bytes is not None and size > max_bytes:
        raise DatasetError(f"data set file is {size} bytes, over the limit of {max_bytes}")
    source = DataFile(path, size)
    return FileSet(source, torch.arange(source.num_samples), source.labels)


def save_dataset_file(data: LabelledSet, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {"inputs": data.inputs.contiguous().float()}
    if data.labels is not None:
        tensors["labels"] = data.labels.contiguous().long()
    save_file(tensors, str(path))


def save_image_file(
    images: torch.Tensor,
    mean: torch.Tensor | list[float],
    std: torch.Tensor | list[float],
    path: str | os.PathLike,
    labels: torch.Tensor | None = None,
) -> None:
    """A uint8 data set: images [N, H, W, C] with the per-channel normalisation the model expects."""
    from safetensors.torch import save_file

    tensors = {
        "images": images.contiguous().to(torch.uint8),
        "mean": torch.as_tensor(mean, dtype=torch.float32).contiguous(),
        "std": torch.as_tensor(std, dtype=torch.float32).contiguous(),
    }
    if labels is not None:
        tensors["labels"] = labels.contiguous().long()
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
