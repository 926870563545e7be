"""The committed reference models: layer tables and the accuracy of uniform configs on the full test set."""

from __future__ import annotations

import json

import pytest
from conftest import MODELS, reference_model

from search.config import QuantConfig
from search.model import load_model
from search.simulate import Simulator

MANIFEST = json.loads((MODELS / "manifest.json").read_text())
NAMES = ["resnet20-fmnist", "mobilenetv2-fmnist", "mixer-fmnist"]
MIN_FP32 = {"resnet20-fmnist": 0.91, "mobilenetv2-fmnist": 0.89, "mixer-fmnist": 0.85}


@pytest.fixture(scope="module")
def loaded():
    return {}


def _sim(name, loaded, fmnist):
    if name not in loaded:
        model = load_model(reference_model(name))
        loaded[name] = (model, Simulator(model, fmnist.calib.inputs))
    return loaded[name]


def test_resnet20_has_22_layers_with_the_projection_shortcuts():
    model = load_model(reference_model("resnet20-fmnist"))
    ops = [l.op for l in model.layers]
    assert len(ops) == 22 and ops.count("conv2d") == 21 and ops.count("linear") == 1
    shortcuts = [l for l in model.layers if "shortcut" in l.name]
    assert [l.kernel for l in shortcuts] == [(1, 1), (1, 1)] and all(l.stride == (2, 2) for l in shortcuts)
    total = sum(l.params for l in model.layers)
    assert abs(total - MANIFEST["resnet20-fmnist"]["params"]) / MANIFEST["resnet20-fmnist"]["params"] < 0.01
    assert sum(l.macs for l in model.layers) == pytest.approx(31.0e6, rel=0.01)


def test_reference_models_are_small_and_recorded():
    for name in NAMES:
        path = reference_model(name)
        assert path.stat().st_size < 5 * 1024 * 1024
        assert load_model(path).sha256 == MANIFEST[name]["sha256"]


def test_mobilenet_has_depthwise_and_mixer_is_mostly_linear():
    mobilenet = load_model(reference_model("mobilenetv2-fmnist"))
    assert sum(l.is_depthwise for l in mobilenet.layers) >= 7
    mixer = load_model(reference_model("mixer-fmnist"))
    linear = sum(l.params for l in mixer.layers if l.op == "linear")
    assert linear / sum(l.params for l in mixer.layers) > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_w8a8_matches_fp32_and_w2a8_is_visibly_worse(name, loaded, fmnist):
    model, sim = _sim(name, loaded, fmnist)
    fp = sim.evaluate(None, fmnist.test).top1
    assert fp >= MIN_FP32[name]
    assert abs(fp * 100 - MANIFEST[name]["fp32_test_top1"]) < 0.02
    w8 = sim.evaluate(QuantConfig.uniform(model, 8, 8), fmnist.test).top1
    assert abs(w8 - fp) <= 0.003, (w8, fp)
    w2 = sim.evaluate(QuantConfig.uniform(model, 2, 8), fmnist.test).top1
    assert w2 < fp - 0.01, (w2, fp)


@pytest.mark.slow
def test_accuracy_is_monotone_in_weight_bits(loaded, fmnist):
    model, sim = _sim("resnet20-fmnist", loaded, fmnist)
    # 1-bit weights everywhere leave this network at chance level without fine-tuning, like 2 bits;
    # from 2 bits up every extra bit must help (0.1 points of slack at the top, where rounding noise rules).
    acc = {b: sim.evaluate(QuantConfig.uniform(model, b, 8), fmnist.test).top1 for b in range(2, 9)}
    for b in range(2, 8):
        assert acc[b + 1] >= acc[b] - 0.001, acc
    assert acc[2] < acc[3] < acc[4] < acc[6]


def test_weight_sqnr_of_real_layers_grows_5_to_6_5_db_per_bit():
    from search.quant.weight import weight_sqnr_db

    model = load_model(reference_model("resnet20-fmnist"))
    for name in ("layers.6.conv2", "layers.7.conv1", "layers.8.conv2"):  # 36,864 weights each, bell-shaped
        db = [weight_sqnr_db(model.weight(name), b) for b in range(3, 9)]
        slope = (db[-1] - db[0]) / 5
        assert 5.0 <= slope <= 6.5, (name, db)
