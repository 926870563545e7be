"""Loading .pt2 archives: layer discovery, BatchNorm folding, and refusal of hostile or broken files."""

from __future__ import annotations

import math
import zipfile

import pytest
import torch
from conftest import TinyNet, export_model
from hostile import with_guard_code, with_pickled_sample_inputs, with_pickled_weight
from torch import nn

from search.archive import ArchiveError
from search.model import ModelError, load_model


def test_discovers_every_layer_in_execution_order(tiny_model):
    names = [l.name for l in tiny_model.layers]
    assert names == ["conv1", "dw", "grouped", "pw", "fc1", "fc2"]
    by_name = {l.name: l for l in tiny_model.layers}
    assert by_name["dw"].is_depthwise and by_name["dw"].groups == 8
    assert by_name["grouped"].groups == 2 and not by_name["grouped"].is_depthwise
    assert by_name["fc1"].op == "linear" and by_name["conv1"].op == "conv2d"
    assert by_name["dw"].stride == (2, 2) and by_name["conv1"].kernel == (3, 3)


def test_params_and_macs_match_the_layer_shapes(tiny_model):
    expected = {  # (params, MACs per sample) from Cout*Cin/groups*k*k (*Hout*Wout)
        "conv1": (8 * 1 * 9, 8 * 1 * 9 * 28 * 28),
        "dw": (8 * 1 * 9, 8 * 1 * 9 * 14 * 14),
        "grouped": (16 * 4 * 9, 16 * 4 * 9 * 7 * 7),
        "pw": (16 * 16, 16 * 16 * 7 * 7),
        "fc1": (32 * 784, 32 * 784),
        "fc2": (320, 320),
    }
    for layer in tiny_model.layers:
        assert (layer.params, layer.macs) == expected[layer.name], layer.name
    assert tiny_model.layer("fc1").in_shape == (784,) and tiny_model.layer("pw").out_shape == (16, 7, 7)


def test_batch_norm_folding_preserves_the_output(tmp_path, fmnist):
    torch.manual_seed(1)
    model = TinyNet()
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    loaded = load_model(export_model(model, tmp_path / "m.pt2"))
    assert not any("batch_norm" in str(n.target) for n in loaded.gm.graph.nodes)
    assert loaded.bias("conv1") is not None  # folding created the bias the conv lacked
    x = fmnist.val.inputs[:64]
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), loaded.forward(x), atol=1e-4, rtol=1e-4)


def test_static_batch_export_runs_any_batch_size(tmp_path):
    model = TinyNet().eval()
    loaded = load_model(export_model(model, tmp_path / "static.pt2", dynamic=False))
    assert loaded.exported_batch == 2 and loaded.static_batch is None  # rewritten to run at any batch size
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.forward(x), atol=1e-4)


def test_pickled_payload_is_refused_and_never_runs(tmp_path, tiny_model_path):
    marker = tmp_path / "pwned"
    hostile = with_pickled_weight(tiny_model_path, tmp_path / "hostile.pt2", marker)
    # The crafted file is a real attack: torch's own loader executes it (and may fail afterwards).
    try:
        torch.export.load(str(hostile))
    except Exception:
        pass
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ArchiveError, match="pickled"):
        load_model(hostile)
    assert not marker.exists()


def test_pickled_sample_inputs_are_never_read(tmp_path, tiny_model_path):
    marker = tmp_path / "pwned"
    hostile = with_pickled_sample_inputs(tiny_model_path, tmp_path / "hostile.pt2", marker)
    try:
        torch.export.load(str(hostile))
    except Exception:
        pass
    assert marker.exists()  # torch unpickles the sample inputs when its weights-only load fails
    marker.unlink()
    # bitsearch never needs the sample inputs: the model loads and runs, and the record's code never does.
    load_model(hostile).forward(torch.randn(3, 1, 28, 28))
    assert not marker.exists()


def test_guard_code_in_the_archive_never_runs(tmp_path, tiny_model_path):
    marker = tmp_path / "pwned"
    hostile = with_guard_code(tiny_model_path, tmp_path / "hostile.pt2", marker)
    torch.export.load(str(hostile)).module()(torch.randn(2, 1, 28, 28))
    assert marker.exists()  # torch execs the archive's guard strings
    marker.unlink()
    loaded = load_model(hostile)
    loaded.forward(torch.randn(3, 1, 28, 28))
    assert not marker.exists()


def test_truncated_archive_is_refused(tmp_path, tiny_model_path):
    data = tiny_model_path.read_bytes()
    cut = tmp_path / "truncated.pt2"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="not a torch.export .pt2 archive"):
        load_model(cut)


def test_non_archive_file_is_refused(tmp_path):
    f = tmp_path / "model.pt2"
    f.write_bytes(b"this is not a model\n" * 100)
    with pytest.raises(ArchiveError, match="not a readable zip"):
        load_model(f)


def test_plain_zip_without_a_program_is_refused(tmp_path):
    f = tmp_path / "other.pt2"
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    with pytest.raises(ArchiveError, match="no archive_format"):
        load_model(f)


def test_path_traversal_names_are_refused(tmp_path):
    f = tmp_path / "evil.pt2"
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("archive/archive_format", "pt2")
        zf.writestr("archive/../../etc/passwd", "x")
    with pytest.raises(ArchiveError, match="not a plain relative path"):
        load_model(f)


def test_zip_bomb_is_refused(tmp_path):
    f = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/archive_format", "pt2")
        zf.writestr("archive/data/weights/weight_0", b"\0" * (64 << 20))
    with pytest.raises(ArchiveError, match="zip bomb"):
        load_model(f, max_bytes=1 << 20)


def test_oversized_archive_is_refused(tiny_model_path):
    with pytest.raises(ArchiveError, match="over the limit"):
        load_model(tiny_model_path, max_bytes=1000)


def test_model_without_conv_or_linear_is_refused(tmp_path):
    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.relu(x).mean((2, 3))

    with pytest.raises(ModelError, match="no quantizable layer"):
        load_model(export_model(NoLayers(), tmp_path / "none.pt2"))


def test_unsupported_op_is_named(tmp_path):
    class Upsampler(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(1, 4, 2, stride=2)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.up(x).mean((2, 3)))

    with pytest.raises(ModelError, match=r"node 'conv_transpose2d'.*conv_transpose2d"):
        load_model(export_model(Upsampler(), tmp_path / "up.pt2"))


def test_nan_weights_are_refused(tmp_path):
    model = TinyNet()
    with torch.no_grad():
        model.fc1.weight[0, 0] = math.nan
    with pytest.raises(ModelError, match="fc1.weight.*NaN"):
        load_model(export_model(model, tmp_path / "nan.pt2"))


def test_sha256_identifies_the_file(tiny_model, tiny_model_path):
    import hashlib

    assert tiny_model.sha256 == hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
