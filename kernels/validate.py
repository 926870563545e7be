"""Validation: run a config on the compiled kernels and measure accuracy, agreement with the simulation,
packed size and latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from search.config import QuantConfig
from search.model import LoadedModel
from search.simulate import Simulator

from .lower import lower
from .ops import isa


@dataclass
class ValidationReport:
    top1: float | None  # measured with the kernels
    sim_top1: float | None  # the simulation on the same inputs
    agreement: float  # fraction of inputs where kernels and simulation predict the same class
    max_logit_diff: float
    samples: int
    packed_bytes: int  # the saved packed model on disk
    buffer_bytes: int  # the tensors it holds
    latency_us: dict[int, float] = field(default_factory=dict)  # batch size -> median microseconds
    threads: int = 1
    isa: str = "scalar"
    kernel_layers: int = 0
    layers: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency_us"] = {str(k): v for k, v in self.latency_us.items()}
        return d


def median_us(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


@torch.no_grad()
def validate(
    model: LoadedModel,
    config: QuantConfig,
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    calib_inputs: torch.Tensor,
    *,
    batch_sizes=(1, 64),
    repeats: int = 20,
    threads: int | None = None,
    simulator: Simulator | None = None,
) -> ValidationReport:
    if threads:
        torch.set_num_threads(threads)
    sim = simulator or Simulator(model, calib_inputs)
    sim.apply(config)
    sim_logits = sim.forward(inputs)
    packed = lower(model, config, simulator=sim)
    logits = packed.forward(inputs)
    top1 = sim_top1 = None
    if labels is not None:
        top1 = float((logits.argmax(1) == labels).float().mean())
        sim_top1 = float((sim_logits.argmax(1) == labels).float().mean())
    latency = {}
    for bs in batch_sizes:
        x = inputs[:bs]
        if len(x) < bs:
            x = x.repeat((bs + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:bs]
        latency[bs] = median_us(lambda: packed.module(x), repeats)
    report = ValidationReport(
        top1=top1,
        sim_top1=sim_top1,
        agreement=float((logits.argmax(1) == sim_logits.argmax(1)).float().mean()),
        max_logit_diff=float((logits - sim_logits).abs().max()),
        samples=len(inputs),
        packed_bytes=packed.nbytes,
        buffer_bytes=packed.buffer_bytes,
        latency_us=latency,
        threads=torch.get_num_threads(),
        isa=isa(),
        kernel_layers=len(packed.kernel_layers),
        layers=len(model.layers),
    )
    report.packed = packed  # not a field: to_dict() leaves it out; callers may save it
    return report
