"""Cost model (docs/methods.md#cost-model). Every figure is defined here, once:

avg_wbits     sum(params_l * wb_l) / sum(params_l) over quantizable layers
weight_bytes  sum over layers of ceil(params_l * wb_l / 8)          packed codes
              + 4 * C_out                                          fp32 per-channel scales
              + 4 * 2^wb_l for codebook schemes (pot, apot)        fp32 codebook
              + 4 * C_out when the layer has a bias                fp32 bias
              + 4 * numel of every other float tensor the graph uses (norms, embeddings)
bitops        sum(MACs_l * wb_l * ab_l) per sample; float activations count as 16 bits
act_bytes     the largest quantized-layer input, ceil(numel * ab_l / 8) bytes per sample
              (float activations: 4 bytes per element), as in Sony MCT's activation memory
latency_us    sum over layers of a measured table lat[layer][(wb, ab)] in microseconds
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .quant.activation import FLOAT_ACT_BITS

METRICS = ("avg_wbits", "weight_bytes", "bitops", "act_bytes", "latency_us")


LIMIT_SLACK = 1e-9  # relative: a cost equal to its limit up to float rounding meets it


def over_limit(value: float, limit: float) -> bool:
    return value > limit * (1 + LIMIT_SLACK)


def within(cost: Cost, limits: dict[str, float]) -> bool:
    """Every limit met; `limits` may be other than a Budget's (a search's swept limits)."""
    return all(getattr(cost, m) is not None and not over_limit(getattr(cost, m), v) for m, v in limits.items())


class BudgetError(ValueError):
    """A malformed or infeasible budget."""


@dataclass(frozen=True)
class Cost:
    avg_wbits: float
    weight_bytes: int
    bitops: int
    act_bytes: int
    latency_us: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class LatencyTable:
    """Microseconds per layer for each (w_bits, a_bits), measured on one machine.

    File format (JSON): {"machine": "...", "layers": {"<layer>": {"<wb>x<ab>": us, ...}, ...}}
    """

    def __init__(self, layers: dict[str, dict[str, float]], machine: str = "unknown"):
        self.layers = layers
        self.machine = machine

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        raw = json.loads(Path(path).read_text())
        return cls(raw["layers"], raw.get("machine", "unknown"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"machine": self.machine, "layers": self.layers}, indent=2))

    def lookup(self, layer: str, w_bits: int, a_bits: int) -> float:
        try:
            return float(self.layers[layer][f"{w_bits}x{a_bits}"])
        except KeyError as e:
            raise BudgetError(f"latency table has no entry for layer {layer!r} at W{w_bits}A{a_bits}") from e


def _act_bits_for_cost(a_bits: int) -> int:
    return FLOAT_ACT_BITS if a_bits >= FLOAT_ACT_BITS else a_bits


def layer_weight_bytes(layer, w_bits: int, scheme: str = "uniform") -> int:
    codebook = 4 * (1 << w_bits) if scheme != "uniform" else 0
    return (
        math.ceil(layer.params * w_bits / 8) + 4 * layer.c_out + codebook + (4 * layer.c_out if layer.has_bias else 0)
    )


def unquantized_bytes(model) -> int:
    """fp32 bytes of every tensor the graph uses that is not a layer weight or bias. Costing reads the figure a
    model caches (`LoadedModel.unquantized_bytes`), or that a stored analysis of it carries."""
    layer_tensors = set()
    for node in model.layer_nodes.values():
        layer_tensors.add(node.args[1].target)
        if len(node.args) > 2 and getattr(node.args[2], "op", None) == "get_attr":
            layer_tensors.add(node.args[2].target)
    return sum(
        4 * t.numel() for k, t in model.used_tensors().items() if k not in layer_tensors and t.is_floating_point()
    )


def layer_costs(
    model, layer, w_bits: int, a_bits: int, scheme: str = "uniform", latency: LatencyTable | None = None
) -> dict[str, float]:
    """One layer's additive share of each metric (act_bytes is a max, not a sum)."""
    total_params = sum(l.params for l in model.layers)
    act_elem_bits = a_bits if a_bits < FLOAT_ACT_BITS else 32
    return {
        "avg_wbits": layer.params * w_bits / total_params,
        "weight_bytes": layer_weight_bytes(layer, w_bits, scheme),
        "bitops": layer.macs * w_bits * _act_bits_for_cost(a_bits),
        "act_bytes": math.ceil(layer.in_features * act_elem_bits / 8),
        "latency_us": latency.lookup(layer.name, w_bits, a_bits) if latency is not None else 0.0,
    }


def cost_of(
    model,
    w_bits: dict[str, int],
    a_bits: dict[str, int],
    schemes: dict[str, str] | None = None,
    latency: LatencyTable | None = None,
) -> Cost:
    per_layer = [
        layer_costs(model, l, w_bits[l.name], a_bits[l.name], (schemes or {}).get(l.name, "uniform"), latency)
        for l in model.layers
    ]
    total = {m: sum(c[m] for c in per_layer) for m in ("weight_bytes", "bitops", "latency_us")}
    # The average from integer bit counts, so a uniform config reads exactly its width.
    avg = sum(l.params * w_bits[l.name] for l in model.layers) / sum(l.params for l in model.layers)
    return Cost(
        avg,
        int(total["weight_bytes"]) + model.unquantized_bytes,
        int(total["bitops"]),
        max(c["act_bytes"] for c in per_layer),
        total["latency_us"] if latency is not None else None,
    )


def config_cost(model, config, latency: LatencyTable | None = None) -> Cost:
    return cost_of(model, config.w_bits(), config.a_bits(), {k: v.scheme for k, v in config.layers.items()}, latency)


class Budget(BaseModel):
    """Upper limits; any combination. A candidate fits when it meets every limit that is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    avg_wbits: float | None = Field(default=None, gt=0, le=32, description="average weight bits")
    weight_bytes: int | None = Field(default=None, gt=0, description="weight memory in bytes")
    bitops: int | None = Field(default=None, gt=0, description="bit operations per sample")
    act_bytes: int | None = Field(default=None, gt=0, description="largest activation tensor in bytes")
    latency_us: float | None = Field(default=None, gt=0, description="summed per-layer latency, microseconds")

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def violations(self, cost: Cost) -> list[str]:
        out = []
        for metric, limit in self.limits().items():
            value = getattr(cost, metric)
            if value is None:
                raise BudgetError(f"budget limits {metric} but no {metric} figure is available (latency needs a table)")
            if over_limit(value, limit):
                out.append(f"{metric} {value:g} > {limit:g}")
        return out

    def fits(self, cost: Cost) -> bool:
        return not self.violations(cost)

    @classmethod
    def parse(cls, items: list[str]) -> Budget:
        """From CLI items like 'avg_wbits=3' or 'weight_bytes=60000'."""
        values: dict[str, float] = {}
        for item in items:
            m = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*", item)
            if not m:
                raise BudgetError(f"malformed budget {item!r}; expected NAME=VALUE with NAME in {METRICS}")
            if m.group(1) not in METRICS:
                raise BudgetError(f"unknown budget metric {m.group(1)!r}; expected one of {METRICS}")
            try:
                values[m.group(1)] = float(m.group(2))
            except ValueError as e:
                raise BudgetError(f"budget value {m.group(2)!r} is not a number") from e
        if not values:
            raise BudgetError("the budget sets no limit")
        for k in ("weight_bytes", "bitops", "act_bytes"):
            if k in values:
                values[k] = int(values[k])
        try:
            return cls(**values)
        except ValueError as e:
            raise BudgetError(f"invalid budget: {e}") from e


def check_feasible(
    model,
    budget: Budget,
    w_choices: list[int],
    a_choices: list[int],
    latency: LatencyTable | None = None,
    scheme: str = "uniform",
) -> None:
    """Raise BudgetError, naming the smallest feasible value, when even the cheapest config breaks a limit.

    Every metric is monotone in the bits, so the all-minimum config is the cheapest for each of them.
    """
    wmin = {l.name: min(w_choices) for l in model.layers}
    amin = {l.name: min(a_choices) for l in model.layers}
    cheapest = cost_of(
        model, wmin, amin, {l.name: scheme for l in model.layers}, latency if budget.latency_us is not None else None
    )
    problems = []
    for metric, limit in budget.limits().items():
        value = getattr(cheapest, metric)
        if value is not None and over_limit(value, limit):
            problems.append(
                f"{metric} <= {limit:g} is infeasible; the smallest feasible value is {value:g} "
                f"(every layer at W{min(w_choices)}A{min(a_choices)})"
            )
    if problems:
        raise BudgetError("; ".join(problems))
