"""ONNX QDQ export: the exported model, run by onnxruntime, computes what the simulation computes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import MODELS, TinyNet, export_model

from search.config import QuantConfig
from search.model import load_model
from search.simulate import Simulator

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from kernels.onnx_export import (  # noqa: E402
    ExportError,
    check_exportable,
    export_onnx,
    onnx_session,
    run_onnx,
    weight_grid,
)

SAMPLES = 2000


def mixed_config(model, seed: int, w_choices=(1, 2, 3, 4, 5, 6, 8), scheme: str = "uniform") -> QuantConfig:
    rng = random.Random(seed)
    w = {l.name: rng.choice(w_choices) for l in model.layers}
    a = {l.name: rng.choice([2, 3, 4, 6, 8, 8, 16]) for l in model.layers}
    return QuantConfig.from_bits(model, w, a, scheme=scheme)


def initializers(mp) -> dict:
    return {i.name: i for i in mp.graph.initializer}


def dequantized_weight(mp, layer: str, transposed: bool) -> torch.Tensor:
    inits = initializers(mp)
    codes = numpy_helper.to_array(inits[f"bitsearch.{layer}.weight_q"]).astype(np.float64)
    scale = numpy_helper.to_array(inits[f"bitsearch.{layer}.weight_scale"]).astype(np.float64)
    w = codes * (scale[None, :] if transposed else scale.reshape(-1, *([1] * (codes.ndim - 1))))
    return torch.from_numpy(w.T if transposed else w).float()


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "mixer"])
def test_onnxruntime_matches_simulation_on_reference_models(name, fmnist):
    model = load_model(MODELS / f"{name}-fmnist.pt2")
    sim = Simulator(model, fmnist.calib.inputs)
    config = mixed_config(model, seed=0)
    mp = export_onnx(model, config, simulator=sim)  # onnx.checker (full check) runs inside
    onnx.checker.check_model(mp.SerializeToString(), full_check=True)

    test = fmnist.test.subset(slice(0, SAMPLES))
    sim.apply(config)
    sim_logits = sim.forward(test.inputs)
    onnx_logits = run_onnx(onnx_session(mp), test.inputs)
    sim_top1 = 100 * float((sim_logits.argmax(1) == test.labels).float().mean())
    onnx_top1 = 100 * float((onnx_logits.argmax(1) == test.labels).float().mean())
    agreement = float((sim_logits.argmax(1) == onnx_logits.argmax(1)).float().mean())
    assert abs(onnx_top1 - sim_top1) <= 0.1, (sim_top1, onnx_top1)
    assert agreement >= 0.995, agreement

    meta = {p.key: p.value for p in mp.metadata_props}
    layers = json.loads(meta["bitsearch.layers"])
    assert QuantConfig.model_validate_json(meta["bitsearch.config"]) == config
    inits = initializers(mp)
    for layer, lq in config.layers.items():
        m = layers[layer]
        assert (m["w_bits"], m["a_bits"]) == (lq.w_bits, lq.a_bits)
        q = inits[f"bitsearch.{layer}.weight_q"]
        assert q.data_type == (TensorProto.INT4 if lq.w_bits == 4 else TensorProto.INT8)
        codes = numpy_helper.to_array(q).astype(np.int64)
        qmax = 1 if lq.w_bits == 1 else (1 << (lq.w_bits - 1)) - 1
        assert m["weight_codes"] == [-qmax, qmax]
        assert codes.min() >= -qmax and codes.max() <= qmax
        # Exactly the simulation's weights, and its bias (corrected) where the layer has one.
        w = dequantized_weight(mp, layer, transposed=m["weight_axis"] == 1)
        torch.testing.assert_close(w, sim.quantized_weight(layer, lq.w_bits), rtol=1e-6, atol=0)
        bias = sim.layer_bias(layer, lq.w_bits)
        if bias is not None:
            got = numpy_helper.to_array(inits[f"bitsearch.{layer}.bias"]).reshape(-1)
            torch.testing.assert_close(torch.from_numpy(got), bias.float(), rtol=0, atol=0)
        if lq.a_bits == 16:
            assert m["input_container"] is None and f"bitsearch.{layer}.input_scale" not in inits
        else:
            r = sim.act_range(layer, lq.a_bits, config.act_calibration)
            assert m["input_codes"] == [0, (1 << lq.a_bits) - 1]
            assert numpy_helper.to_array(inits[f"bitsearch.{layer}.input_scale"]) == np.float32(r.scale)
            assert int(numpy_helper.to_array(inits[f"bitsearch.{layer}.input_zero_point"])) == r.zero_point
            assert (f"bitsearch.{layer}.input_lo" in inits) == (lq.a_bits < 8)


@pytest.mark.parametrize("scheme", ["pot", "apot"])
def test_pot_and_apot_weights_are_exact_integer_grids(scheme, tiny_model, tiny_sim, fmnist):
    config = mixed_config(tiny_model, seed=1, w_choices=(2, 3, 4, 5), scheme=scheme)
    mp = export_onnx(tiny_model, config, simulator=tiny_sim)
    layers = json.loads({p.key: p.value for p in mp.metadata_props}["bitsearch.layers"])
    for layer, lq in config.layers.items():
        m = layers[layer]
        assert m["weight_container"] == weight_grid(lq.w_bits, scheme).dtype
        w = dequantized_weight(mp, layer, transposed=m["weight_axis"] == 1)
        # The simulation multiplies a normalised float level, the export an integer: equal up to float32 rounding.
        torch.testing.assert_close(w, tiny_sim.quantized_weight(layer, lq.w_bits, scheme), rtol=1e-6, atol=1e-9)
    test = fmnist.test.subset(slice(0, 500))
    tiny_sim.apply(config)
    sim_pred = tiny_sim.forward(test.inputs).argmax(1)
    assert float((sim_pred == run_onnx(onnx_session(mp), test.inputs).argmax(1)).float().mean()) >= 0.995


def test_widths_without_an_exact_integer_form_are_refused_by_layer(tiny_model):
    assert weight_grid(4, "pot").dtype == "int8"  # levels 2^-6 .. 1: codes up to 64
    assert weight_grid(5, "pot").dtype == "int16"
    names = [l.name for l in tiny_model.layers]
    w = {n: 4 for n in names} | {names[1]: 8}
    config = QuantConfig.from_bits(tiny_model, w, 8, scheme="pot")
    with pytest.raises(ExportError, match=rf"{names[1]}: pot 8-bit weights have no exact integer form"):
        check_exportable(config)
    with pytest.raises(ExportError, match=names[1]):
        export_onnx(tiny_model, config, calib_inputs=torch.zeros(4, 1, 28, 28))


def test_batch1_export_runs_at_any_batch_in_onnxruntime(tmp_path, fmnist):
    torch.manual_seed(0)
    path = export_model(TinyNet(), tmp_path / "b1.pt2", example=(torch.randn(1, 1, 28, 28),), dynamic=False)
    model = load_model(path)
    assert model.exported_batch == 1 and model.static_batch is None
    sim = Simulator(model, fmnist.calib.inputs)
    config = QuantConfig.uniform(model, 4, 8)
    mp = export_onnx(model, config, simulator=sim)
    session = onnx_session(mp)
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # a symbolic batch
    x = fmnist.test.inputs[:64]
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    sim.apply(config)
    assert out.shape == (64, 10)
    assert (torch.from_numpy(out).argmax(1) == sim.forward(x).argmax(1)).sum() >= 63
