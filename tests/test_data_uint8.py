"""uint8 image data sets (images [N, H, W, C] with mean and std per channel) and large uploads: decoded exactly
as documented, refused by name when malformed, searchable, and uploaded through the API without the API
process holding the file."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from search.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DatasetError,
    LabelledSet,
    _read_idx,
    load_dataset_file,
    load_splits,
    save_dataset_file,
    save_image_file,
)
from tests.stack import ROOT, Stack

RESNET = ROOT / "models" / "resnet20-fmnist.pt2"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _images(n: int = 300, h: int = 9, w: int = 7, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _documented(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """README.md's definition: inputs = ((images / 255) - mean) / std, as [N, C, H, W] float32."""
    return (((images.float() / 255) - mean) / std).permute(0, 3, 1, 2).contiguous()


def _fmnist_uint8(path: Path, n: int) -> Path:
    """The first n Fashion-MNIST test images as a uint8 data set with one channel."""
    images = torch.from_numpy(_read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:n].copy())
    labels = torch.from_numpy(_read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:n].astype(np.int64))
    save_image_file(images.unsqueeze(-1), [FASHION_MNIST_MEAN], [FASHION_MNIST_STD], path, labels)
    return path


def write_safetensors(path: Path, header: dict, chunks) -> Path:
    """A safetensors file written from a header and an iterable of byte chunks, never whole in memory."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for chunk in chunks:
            f.write(chunk)
    return path


# -- decoding --------------------------------------------------------------------------------------------------


def test_uint8_file_decodes_to_the_float32_file_of_the_same_images(tmp_path):
    images, labels = _images()
    save_image_file(images, MEAN, STD, tmp_path / "u8.safetensors", labels)
    save_dataset_file(LabelledSet(_documented(images, MEAN, STD), labels), tmp_path / "f32.safetensors")
    assert (tmp_path / "u8.safetensors").stat().st_size * 3.5 < (tmp_path / "f32.safetensors").stat().st_size

    whole = load_dataset_file(tmp_path / "u8.safetensors")
    assert whole.sample_shape == (3, 9, 7) and len(whole) == 300 and whole.num_classes == int(labels.max()) + 1
    assert torch.equal(whole.inputs, _documented(images, MEAN, STD))
    # Splits pick the same samples from either file, by the same seeded permutation.
    a = load_splits(str(tmp_path / "u8.safetensors"), calib_size=100, seed=3)
    b = load_splits(str(tmp_path / "f32.safetensors"), calib_size=100, seed=3)
    assert (len(a.calib), len(a.val), a.sample_shape) == (100, 200, (3, 9, 7))
    for x, y in ((a.calib, b.calib), (a.val, b.val), (a.val.subset(slice(20, 70)), b.val.subset(slice(20, 70)))):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)


def test_a_split_decodes_only_the_samples_it_uses(tmp_path):
    images, labels = _images(n=2000, h=16, w=16)
    save_image_file(images, MEAN, STD, tmp_path / "u8.safetensors", labels)
    splits = load_splits(str(tmp_path / "u8.safetensors"), calib_size=64, seed=1)
    scored = splits.val.subset(slice(0, 100))  # what a search scores candidates on (val_samples)
    assert scored.inputs.shape == (100, 3, 16, 16)
    # The rest of the validation split is still row numbers: 1,836 images never became floats.
    assert splits.val._inputs is None and len(splits.val) == 2000 - 64
    rows = splits.val.rows[:100]
    assert torch.equal(scored.inputs, _documented(images[rows], MEAN, STD))
    assert torch.equal(scored.labels, labels[rows])


# -- refusals: one test per field and rule ---------------------------------------------------------------------


def _u8(**change):
    images, labels = _images(n=8)
    tensors = {"images": images, "mean": MEAN, "std": STD, "labels": labels}
    tensors.update(change)
    return {k: v for k, v in tensors.items() if v is not None}


REFUSED = {
    "images not uint8": (_u8(images=torch.zeros(8, 9, 7, 3)), r"`images` must be uint8, got float32"),
    "images not NHWC": (_u8(images=torch.zeros(8, 9, 7, dtype=torch.uint8)), r"`images` must be \[N, H, W, C\]"),
    "no images": (_u8(images=torch.zeros(0, 9, 7, 3, dtype=torch.uint8), labels=None), r"with N >= 1"),
    "mean missing": (_u8(mean=None), r"has no `mean`"),
    "std missing": (_u8(std=None), r"has no `std`"),
    "mean not float32": (_u8(mean=MEAN.double()), r"`mean` must be float32, got float64"),
    "std of other channels": (_u8(std=torch.ones(1)), r"`std` must have shape \[3\] \(one value per channel"),
    "std zero": (_u8(std=torch.tensor([0.2, 0.0, 0.2])), r"`std` must be > 0"),
    "std negative": (_u8(std=torch.tensor([0.2, -0.1, 0.2])), r"`std` must be > 0"),
    "mean not finite": (_u8(mean=torch.tensor([0.5, float("nan"), 0.5])), r"`mean` holds NaN or Inf"),
    "std not finite": (_u8(std=torch.tensor([0.5, float("inf"), 0.5])), r"`std` holds NaN or Inf"),
    "labels not int64": (_u8(labels=torch.zeros(8, dtype=torch.int32)), r"`labels` must be int64"),
    "labels of other length": (_u8(labels=torch.zeros(7, dtype=torch.int64)), r"`labels` must have shape \[8\]"),
    "labels negative": (_u8(labels=torch.tensor([0, 1, 2, -3, 0, 0, 0, 0])), r"negative class index \(-3\)"),
    "both layouts": (_u8(inputs=torch.zeros(8, 3, 9, 7)), r"both `inputs` and `images`"),
    "unknown tensor": (_u8(crop=torch.zeros(2)), r"unexpected tensors \['crop'\]; expected `images`, `mean`"),
    "normalisation beside float inputs": (
        {"inputs": torch.zeros(8, 3), "mean": MEAN},
        r"unexpected tensors \['mean'\]; expected `inputs`",
    ),
    "neither layout": ({"pixels": torch.zeros(8, 3)}, r"no `inputs` tensor \(float32\) nor `images` \(uint8\)"),
    "float inputs not finite": ({"inputs": torch.tensor([[0.0, float("inf")]] * 8)}, r"`inputs` holds NaN or Inf"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_malformed_data_set_is_refused_by_name(tmp_path, case):
    tensors, message = REFUSED[case]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DatasetError, match=message):
        load_dataset_file(tmp_path / "bad.safetensors")


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


UNREADABLE = {
    "shorter than its header": (lambda p: p.write_bytes(b"\x10\x00"), r"shorter than a header"),
    "header past the end": (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"), r"header claims 1000000"),
    "header not JSON": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), r"header is not JSON"),
    "size not the shape's": (
        lambda p: write_safetensors(p, {"inputs": _entry("F32", [2, 2], 0, 12)}, [b"\0" * 12]),
        r"holds 12 bytes but its shape needs 16",
    ),
    "overlapping tensors": (
        lambda p: write_safetensors(
            p, {"inputs": _entry("F32", [2, 2], 0, 16), "labels": _entry("I64", [2], 0, 16)}, [b"\0" * 16]
        ),
        r"overlaps another or leaves a gap",
    ),
    "truncated data": (
        lambda p: write_safetensors(p, {"inputs": _entry("F32", [4, 4], 0, 64)}, [b"\0" * 40]),
        r"end at byte .* but the file has",
    ),
    "unknown dtype": (
        lambda p: write_safetensors(p, {"images": _entry("BF16", [2, 2, 2, 1], 0, 16)}, [b"\0" * 16]),
        r"'images' has a malformed entry",
    ),
    "a name twice": (
        lambda p: p.write_bytes(struct.pack("<Q", 100) + (b'{"a": 1, "a": 2}' + b" " * 84)),
        r"header is not JSON \(a name appears twice\)",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_a_file_that_is_not_safetensors_is_refused_by_name(tmp_path, case):
    make, message = UNREADABLE[case]
    make(tmp_path / "bad.safetensors")
    with pytest.raises(DatasetError, match="not a readable safetensors file: .*" + message):
        load_dataset_file(tmp_path / "bad.safetensors")


# -- a search on a uint8 file ----------------------------------------------------------------------------------


def test_a_search_runs_on_a_uint8_file(tmp_path):
    from search.model import load_model
    from search.spec import load_job_data, make_spec, run_job

    u8 = _fmnist_uint8(tmp_path / "fmnist-u8.safetensors", 600)
    # uniform at one width: a search's whole path (calibration, a candidate scored on validation) in seconds.
    spec = make_spec(
        method="uniform", budget={"avg_wbits": 4}, calib_size=64, val_samples=200, w_bits=[4], act_calibration="minmax"
    )
    splits = load_job_data(spec, u8)
    assert (len(splits.calib), len(splits.val), splits.sample_shape) == (64, 536, (1, 28, 28))
    result = run_job(spec, load_model(RESNET), splits).to_dict()
    best = result["candidates"][result["recommended"]]
    assert best["fits"] and best["w_bits"] == {name: 4 for name in best["w_bits"]}
    # The images are Fashion-MNIST's, normalised as the model was trained: it classifies them.
    assert best["val_top1"] > 0.8


# -- through the API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_stack(tmp_path_factory):
    # No worker: an accepted job only waits in the queue; the upload path is what is tested.
    s = Stack(tmp_path_factory.mktemp("uploads-u8"), backend="postgres")
    s.start(workers=0)
    yield s
    s.stop()


def _submit(client, data_path: Path):
    with open(data_path, "rb") as f:  # streamed from the file by httpx
        return client.post(
            "/jobs",
            data={"method": "sqnr", "budget": json.dumps({"avg_wbits": 4})},
            files={
                "model": (RESNET.name, RESNET.read_bytes(), "application/zip"),
                "data": (data_path.name, f, "application/octet-stream"),
            },
        )


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_the_api_accepts_a_uint8_upload_and_refuses_a_bad_one_by_name(api_stack, tmp_path):
    with api_stack.client() as c:
        r = _submit(c, _fmnist_uint8(tmp_path / "shirts.safetensors", 500))
        assert r.status_code == 202, r.text
        dataset = c.get(f"/jobs/{r.json()['id']}").json()["dataset_id"]
        images, labels = _images(n=8, h=28, w=28, c=1)
        save_image_file(images, [0.5], [0.0], tmp_path / "flat.safetensors", labels)
        bad = _submit(c, tmp_path / "flat.safetensors")
    assert bad.status_code == 400 and "'flat.safetensors'" in bad.json()["detail"], bad.text
    assert "`std` must be > 0" in bad.json()["detail"]
    from sqlalchemy import create_engine, text

    engine = create_engine(api_stack.database_url)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT num_samples, sample_shape, num_classes FROM datasets WHERE id = :id"), {"id": dataset}
        ).one()
    engine.dispose()
    assert tuple(row) == (500, [1, 28, 28], 10)


def test_a_large_upload_streams_to_disk_without_growing_the_api(api_stack, tmp_path):
    # 256 MiB of 28x28 uint8 images: the API must neither hold the body nor load the file to check it.
    n = 256 * 2**20 // 784
    header = {
        "images": _entry("U8", [n, 28, 28, 1], 0, n * 784),
        "mean": _entry("F32", [1], n * 784, n * 784 + 4),
        "std": _entry("F32", [1], n * 784 + 4, n * 784 + 8),
        "labels": _entry("I64", [n], n * 784 + 8, n * 792 + 8),
    }
    block = np.random.default_rng(0).integers(0, 256, 784 * 4096, dtype=np.uint8).tobytes()

    def chunks():
        for first in range(0, n, 4096):
            yield block[: 784 * min(4096, n - first)]
        yield struct.pack("<ff", FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        for first in range(0, n, 4096):
            yield (np.arange(first, min(n, first + 4096), dtype=np.int64) % 10).tobytes()

    big = write_safetensors(tmp_path / "big.safetensors", header, chunks())
    size = big.stat().st_size
    assert size > 256 * 2**20
    pid = api_stack.api.pid
    with api_stack.client() as c:
        # One upload first: what any submission loads in the API (the spec code, torch) is not the upload's.
        assert _submit(c, _fmnist_uint8(tmp_path / "warm.safetensors", 100)).status_code == 202
        before = _hwm_kib(pid)
        r = _submit(c, big)
        after = _hwm_kib(pid)
    assert r.status_code == 202, r.text
    assert (after - before) * 1024 < size / 16, (before, after, size)
    digest = hashlib.sha256()
    with open(big, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    stored = api_stack.var_dir / "artifacts" / "datasets" / digest.hexdigest()
    assert stored.stat().st_size == size
