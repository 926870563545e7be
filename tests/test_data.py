"""User data files and the built-in Fashion-MNIST splits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from search.data import (
    DatasetError,
    LabelledSet,
    fashion_mnist_splits,
    load_dataset_file,
    load_splits,
    save_dataset_file,
)


def test_fashion_mnist_splits_are_deterministic_and_disjoint():
    a, b = fashion_mnist_splits(512, seed=3), fashion_mnist_splits(512, seed=3)
    assert torch.equal(a.calib.inputs, b.calib.inputs) and torch.equal(a.val.labels, b.val.labels)
    assert a.calib.inputs.shape == (512, 1, 28, 28) and len(a.val) == 5000 and len(a.test) == 10000
    assert len(a.train) == 55000
    other = fashion_mnist_splits(512, seed=4)
    assert not torch.equal(a.calib.inputs, other.calib.inputs)
    # Held-out validation images never appear in the training part the reference models saw.
    train_keys = {hash(x.numpy().tobytes()) for x in a.train.inputs[:, 0, 14]}
    overlap = sum(hash(x.numpy().tobytes()) in train_keys for x in a.val.inputs[:500, 0, 14])
    assert overlap < 25  # rows of identical pixels happen; whole-image reuse would give ~500
    assert abs(float(a.test.inputs.mean())) < 0.05  # normalised


def test_user_file_round_trip_and_splits(tmp_path):
    data = LabelledSet(torch.randn(300, 3, 8, 8), torch.randint(0, 5, (300,)))
    save_dataset_file(data, tmp_path / "d.safetensors")
    splits = load_splits(str(tmp_path / "d.safetensors"), calib_size=100, seed=1)
    assert len(splits.calib) == 100 and len(splits.val) == 200 and splits.test is None
    assert splits.sample_shape == (3, 8, 8)
    assert torch.equal(load_splits(str(tmp_path / "d.safetensors"), 100, 1).calib.inputs, splits.calib.inputs)


@pytest.mark.parametrize(
    "tensors,message",
    [
        ({"x": torch.zeros(4, 2)}, "no `inputs` tensor"),
        ({"inputs": torch.zeros(4, 2, dtype=torch.float64)}, "must be float32"),
        ({"inputs": torch.zeros(4, 2), "labels": torch.zeros(3, dtype=torch.int64)}, r"must have shape \[4\]"),
        ({"inputs": torch.zeros(4, 2), "labels": torch.zeros(4, dtype=torch.int32)}, "must be int64"),
        ({"inputs": torch.zeros(4, 2), "labels": torch.tensor([0, 1, -1, 2])}, "negative class"),
        ({"inputs": torch.tensor([[0.0, float("nan")]] * 4)}, "NaN or Inf"),
        ({"inputs": torch.zeros(4, 2), "extra": torch.zeros(1)}, "unexpected tensors"),
    ],
)
def test_malformed_data_files_are_refused(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DatasetError, match=message):
        load_dataset_file(tmp_path / "bad.safetensors")


def test_non_safetensors_file_is_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="not a readable safetensors"):
        load_dataset_file(tmp_path / "bad.safetensors")


def test_oversized_data_file_is_refused(tmp_path):
    save_dataset_file(LabelledSet(torch.zeros(100, 10)), tmp_path / "d.safetensors")
    with pytest.raises(DatasetError, match="over the limit"):
        load_dataset_file(tmp_path / "d.safetensors", max_bytes=100)


def test_unknown_source_is_refused():
    with pytest.raises(DatasetError, match="unknown data set 'cifar-100'"):
        load_splits("cifar-100")
