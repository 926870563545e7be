"""Configs (validation against the model) and the cost model (docs/methods.md#cost-model)."""

from __future__ import annotations

import json
import math

import pytest

from search.config import ConfigError, QuantConfig
from search.cost import Budget, BudgetError, check_feasible, config_cost, cost_of, unquantized_bytes


def test_config_round_trips_through_json(tiny_model):
    config = QuantConfig.from_bits(tiny_model, {l.name: 2 + l.index for l in tiny_model.layers}, 8, scheme="apot")
    again = QuantConfig.from_json(config.to_json(), tiny_model)
    assert again == config and again.layers["fc1"].w_bits == 6 and again.layers["fc1"].scheme == "apot"


def test_config_for_another_model_is_refused(tiny_model):
    raw = json.loads(QuantConfig.uniform(tiny_model, 4, 8).to_json())
    raw["model_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="config is for model sha256 000000000000"):
        QuantConfig.from_json(json.dumps(raw), tiny_model)


def test_unknown_and_missing_layers_are_named(tiny_model):
    raw = json.loads(QuantConfig.uniform(tiny_model, 4, 8).to_json())
    raw["layers"]["conv9"] = raw["layers"].pop("dw")
    with pytest.raises(ConfigError, match=r"unknown layer\(s\) \['conv9'\]"):
        QuantConfig.from_json(json.dumps(raw), tiny_model)
    del raw["layers"]["conv9"]
    with pytest.raises(ConfigError, match=r"lacks layer\(s\) \['dw'\]"):
        QuantConfig.from_json(json.dumps(raw), tiny_model)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("w_bits", 9, "layers.fc1.w_bits"),
        ("w_bits", 0, "layers.fc1.w_bits"),
        ("a_bits", 1, "a_bits must be in 2..8 or 16"),
        ("a_bits", 12, "a_bits must be in 2..8 or 16"),
        ("scheme", "kmeans", "layers.fc1.scheme"),
    ],
)
def test_bits_out_of_range_are_refused_naming_the_layer(tiny_model, field, value, message):
    raw = json.loads(QuantConfig.uniform(tiny_model, 4, 8).to_json())
    raw["layers"]["fc1"][field] = value
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_json(json.dumps(raw), tiny_model)


def test_one_bit_codebook_scheme_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="needs w_bits >= 2"):
        QuantConfig.uniform(tiny_model, 1, 8, scheme="pot")


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a bitsearch config"),
        ('{"format": "bitsearch.config", "version": 7}', "version 7 is not supported"),
    ],
)
def test_malformed_documents_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_json(text)


def test_cost_figures_follow_their_definitions(tiny_model):
    w = {l.name: 2 + l.index for l in tiny_model.layers}
    a = {l.name: 8 for l in tiny_model.layers}
    a["fc2"] = 16
    cost = cost_of(tiny_model, w, a)
    layers = tiny_model.layers
    assert cost.avg_wbits == pytest.approx(sum(l.params * w[l.name] for l in layers) / sum(l.params for l in layers))
    packed = sum(math.ceil(l.params * w[l.name] / 8) + 4 * l.c_out + (4 * l.c_out if l.has_bias else 0) for l in layers)
    assert cost.weight_bytes == packed + unquantized_bytes(tiny_model)
    assert cost.bitops == sum(l.macs * w[l.name] * a[l.name] for l in layers)
    assert cost.act_bytes == max(max(l.in_features for l in layers[:-1]), layers[-1].in_features * 4)


def test_codebooks_are_counted_in_weight_bytes(tiny_model):
    uniform = config_cost(tiny_model, QuantConfig.uniform(tiny_model, 4, 8))
    apot = config_cost(tiny_model, QuantConfig.uniform(tiny_model, 4, 8, scheme="apot"))
    assert apot.weight_bytes - uniform.weight_bytes == len(tiny_model.layers) * 4 * 16


def test_every_used_float_tensor_is_counted(tiny_model):
    # The tiny net has no norms left after folding: all bytes are the layers' own.
    assert unquantized_bytes(tiny_model) == 0
    fp32 = sum(4 * t.numel() for t in tiny_model.used_tensors().values())
    w32 = config_cost(tiny_model, QuantConfig.uniform(tiny_model, 8, 8)).weight_bytes
    assert w32 < fp32 / 3.5


def test_budget_parsing_and_fit(tiny_model):
    budget = Budget.parse(["avg_wbits=4", "weight_bytes=20000"])
    assert budget.limits() == {"avg_wbits": 4.0, "weight_bytes": 20000}
    assert budget.fits(config_cost(tiny_model, QuantConfig.uniform(tiny_model, 4, 8)))
    violations = budget.violations(config_cost(tiny_model, QuantConfig.uniform(tiny_model, 6, 8)))
    assert any(v.startswith("avg_wbits 6") for v in violations) and any("weight_bytes" in v for v in violations)


@pytest.mark.parametrize(
    "items,message",
    [
        (["avg_wbits"], "malformed budget"),
        (["speed=3"], "unknown budget metric 'speed'"),
        (["avg_wbits=-1"], "invalid budget"),
        ([], "sets no limit"),
    ],
)
def test_malformed_budgets_are_refused(items, message):
    with pytest.raises(BudgetError, match=message):
        Budget.parse(items)


def test_infeasible_budget_names_the_smallest_feasible_value(tiny_model):
    cheapest = cost_of(tiny_model, {l.name: 2 for l in tiny_model.layers}, {l.name: 8 for l in tiny_model.layers})
    with pytest.raises(BudgetError, match=f"smallest feasible value is {cheapest.weight_bytes}"):
        check_feasible(tiny_model, Budget(weight_bytes=cheapest.weight_bytes - 1), [2, 3, 4], [8])
    check_feasible(tiny_model, Budget(weight_bytes=cheapest.weight_bytes), [2, 3, 4], [8])
    with pytest.raises(BudgetError, match="avg_wbits <= 1.5 is infeasible; the smallest feasible value is 2"):
        check_feasible(tiny_model, Budget(avg_wbits=1.5), [2, 8], [8])
