"""Simulated quantization on a real (tiny) trained model."""

from __future__ import annotations

import math

import pytest
import torch

from search.config import QuantConfig
from search.quant.weight import quantize_weight


def test_float_config_reproduces_the_model(tiny_sim, tiny_model, fmnist):
    res = tiny_sim.evaluate(None, fmnist.val)
    logits = tiny_model.forward(fmnist.val.inputs)
    assert res.sqnr_db == math.inf and res.kl == 0.0
    assert res.top1 == float((logits.argmax(1) == fmnist.val.labels).float().mean())


def test_w8a8_is_close_to_float_and_w2a8_is_worse(tiny_sim, tiny_model, fmnist):
    fp = tiny_sim.evaluate(None, fmnist.val).top1
    w8 = tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 8, 8), fmnist.val)
    w2 = tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 2, 8), fmnist.val)
    assert abs(w8.top1 - fp) <= 0.005 and w8.sqnr_db > 30 and w8.kl < 1e-3
    assert w2.top1 < fp - 0.01 and w2.sqnr_db < w8.sqnr_db - 20 and w2.kl > 10 * w8.kl


def test_output_sqnr_rises_with_weight_bits(tiny_sim, tiny_model, fmnist):
    db = [tiny_sim.evaluate(QuantConfig.uniform(tiny_model, b, 16), fmnist.val).sqnr_db for b in range(1, 9)]
    assert all(b > a for a, b in zip(db, db[1:])), db


def test_weights_are_fake_quantized_per_channel(tiny_sim, tiny_model):
    tiny_sim.apply(QuantConfig.uniform(tiny_model, 3, 16, clip="max"))
    w = tiny_sim.gm.fc1.weight
    expected = quantize_weight(tiny_sim._float_weights["fc1"], 3, "uniform", "max").dequantize()
    assert torch.equal(w, expected)
    assert all(len(row.unique()) <= 7 for row in w)  # 3-bit symmetric: at most 7 levels per channel
    tiny_sim.set_float()
    assert torch.equal(tiny_sim.gm.fc1.weight, tiny_model.weight("fc1"))  # the loaded model is never touched


def test_activations_of_a_layer_take_at_most_2_pow_b_values(tiny_sim, tiny_model, fmnist):
    config = QuantConfig.from_bits(
        tiny_model,
        {l.name: 8 for l in tiny_model.layers},
        {l.name: (3 if l.name == "fc1" else 16) for l in tiny_model.layers},
    )
    tiny_sim.apply(config)
    seen = []
    hook = tiny_sim.gm.bitsearch_act_4.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        tiny_sim.forward(fmnist.val.inputs[:200])
    finally:
        hook.remove()
    assert len(torch.cat(seen).unique()) <= 8


def test_mixed_config_lies_between_its_uniform_bounds(tiny_sim, tiny_model, fmnist):
    lo = tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 2, 8), fmnist.val).sqnr_db
    hi = tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 6, 8), fmnist.val).sqnr_db
    mixed = QuantConfig.from_bits(tiny_model, {l.name: (2 if l.index % 2 else 6) for l in tiny_model.layers}, 8)
    assert lo < tiny_sim.evaluate(mixed, fmnist.val).sqnr_db < hi


def test_per_layer_sqnr_helpers(tiny_sim):
    w = [tiny_sim.weight_sqnr_db("fc1", b) for b in (2, 4, 8)]
    a = [tiny_sim.activation_sqnr_db("fc1", b) for b in (2, 4, 8)]
    assert w[0] < w[1] < w[2] and a[0] < a[1] < a[2]
    assert 35 < w[2] < 55


def test_unlabelled_data_gives_fidelity_only(tiny_sim, tiny_model, fmnist):
    from search.data import LabelledSet

    res = tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 4, 8), LabelledSet(fmnist.val.inputs[:300]))
    assert res.top1 is None and res.samples == 300 and 0 < res.sqnr_db < math.inf


def test_bias_correction_restores_a_linear_layers_mean_output(tiny_sim, fmnist):
    runner = tiny_sim.incremental(fmnist.calib.inputs)
    tiny_sim.set_float()
    runner.run()
    float_mean = runner.layer_output("fc1").mean(0).clone()
    shifts = {}
    for bc in (False, True):
        # only fc1's weights at 2 bits, its input float: only the weight error moves the mean
        tiny_sim.set_float()
        tiny_sim.set_layer("fc1", 2, None, bias_correction=bc)
        runner.run(["fc1"])
        shifts[bc] = (runner.layer_output("fc1").mean(0) - float_mean).abs().mean()
    tiny_sim.set_float()
    assert shifts[True] < 1e-4 < shifts[False]


def test_data_that_does_not_fit_the_model_is_refused_by_name(tiny_model):
    from search.data import DatasetError
    from search.simulate import Simulator

    with pytest.raises(DatasetError, match=r"inputs are \[3, 8, 8\] per sample but the model takes \[1, 28, 28\]"):
        Simulator(tiny_model, torch.randn(4, 3, 8, 8))
