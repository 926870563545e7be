"""torchao hand-over: a config's per-layer weight widths applied to the float model with torchao's per-module
configuration, its accuracy against the simulation's, and what torchao cannot take said per layer."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import MODELS

from search.config import QuantConfig
from search.model import load_model
from search.simulate import Simulator

pytest.importorskip("torchao")

from kernels.torchao_handover import hand_over


@pytest.fixture(scope="module")
def mixer():
    """The reference MLP-Mixer as the user has it (an nn.Module) and as bitsearch loads its .pt2."""
    sys.path.insert(0, str(MODELS))
    from architectures import ARCHITECTURES

    net = ARCHITECTURES["mixer-fmnist"]()
    net.load_state_dict(torch.export.load(str(MODELS / "mixer-fmnist.pt2")).state_dict)
    return net.eval(), load_model(MODELS / "mixer-fmnist.pt2")


def test_torchao_accuracy_follows_the_simulation_at_the_same_weight_widths(mixer, fmnist):
    net, model = mixer
    config = QuantConfig.uniform(model, 4, 16)  # torchao takes weights only: inputs stay float in both
    h = hand_over(net, config)
    assert set(h.applied) == {l.name for l in model.layers} - {"patch_embed"}
    assert set(h.applied.values()) == {4}
    # torchao 0.18's per-channel scale fails on a conv with one input channel; that layer stays float, said so.
    assert "torchao refused it" in h.skipped["patch_embed"]
    test = fmnist.test.subset(slice(0, 2000))
    with torch.no_grad():
        torchao_top1 = float((h.module(test.inputs).argmax(1) == test.labels).float().mean())
    sim_top1 = Simulator(model, fmnist.calib.inputs).evaluate(config, test).top1
    assert abs(torchao_top1 - sim_top1) <= 0.01, (torchao_top1, sim_top1)
    assert float((net(test.inputs[:100]) - h.module(test.inputs[:100])).abs().max()) > 0  # it did quantize


def test_widths_torchao_lacks_stay_float_with_the_reason(mixer):
    net, model = mixer
    names = [l.name for l in model.layers]
    w = {n: 6 for n in names} | {names[1]: 1}
    config = QuantConfig.from_bits(model, w, 8)
    h = hand_over(net, config)
    assert h.applied[names[2]] == 6 and "no binary" in h.skipped[names[1]]
    pot = hand_over(net, QuantConfig.from_bits(model, {n: 4 for n in names}, 8, scheme="pot"))
    assert not pot.applied and all("power-of-two" in r for r in pot.skipped.values())
