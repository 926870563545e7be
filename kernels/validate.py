"""Validation: run a config on the compiled kernels and measure accuracy, agreement with the simulation,
packed size and latency."""

from __future__ import annotations

import os
import resource
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
    latency_iqr_us: dict[int, float] = field(default_factory=dict)  # batch size -> interquartile range
    # How the machine was while the latencies were timed: the share of the other cores' time other processes
    # used, whether that counts as under load, and how many times the timing was repeated to find a quiet moment.
    latency_conditions: dict = field(default_factory=dict)
    threads: int = 1
    isa: str = "scalar"
    kernel_layers: int = 0
    layers: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency_us"] = {str(k): v for k, v in self.latency_us.items()}
        d["latency_iqr_us"] = {str(k): v for k, v in self.latency_iqr_us.items()}
        return d


def timed_us(fn, repeats: int, warmup: int = 3, budget_s: float | None = None, min_repeats: int = 5) -> list[float]:
    """`repeats` timings of fn() after `warmup` calls; with `budget_s`, fewer (down to min_repeats) where the
    calls would take longer than that: an ImageNet CNN at batch 64 takes seconds a call."""
    for _ in range(warmup):
        fn()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        if budget_s is not None and i + 1 >= min_repeats and sum(times) / 1e6 * (i + 2) / (i + 1) > budget_s:
            break
    return times


def median_us(fn, repeats: int, warmup: int = 3) -> float:
    return statistics.median(timed_us(fn, repeats, warmup))


def iqr(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q3 - q1


# Other processes using more than this share of the machine's CPU time while we time is "under load": a figure
# taken then says more about the neighbours than about the kernels.
BUSY_SHARE = 0.15
# Seconds the timed calls of one batch size may take before fewer repeats are timed (at least 5): 20 repeats of a
# 224-px ResNet-18 at batch 64 would take minutes; a small model's 20 take well under this.
TIMING_BUDGET_S = 10.0


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None where there is no such file."""
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def others_share(fn) -> tuple[object, float | None]:
    """Run fn(); also return the share of the machine's CPU time that other processes used meanwhile."""
    before, own_before = _cpu_ticks(), resource.getrusage(resource.RUSAGE_SELF)
    result = fn()
    after, own_after = _cpu_ticks(), resource.getrusage(resource.RUSAGE_SELF)
    if before is None or after is None or after[1] <= before[1]:
        return result, None
    hz = os.sysconf("SC_CLK_TCK")
    own = (own_after.ru_utime + own_after.ru_stime - own_before.ru_utime - own_before.ru_stime) * hz
    others = max(0.0, (after[0] - before[0]) - own)
    return result, others / (after[1] - before[1])


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
    quiet_retries: int = 2,
    quiet_wait_s: float = 5.0,
) -> ValidationReport:
    if threads:
        torch.set_num_threads(threads)
    sim = simulator or Simulator(model, calib_inputs)
    sim.apply(config)
    sim_logits = sim.forward(inputs)
    packed = lower(model, config, simulator=sim)
    logits = packed.forward(inputs, sim.batch_size)  # batches sized by memory, as the simulation's
    top1 = sim_top1 = None
    if labels is not None:
        top1 = float((logits.argmax(1) == labels).float().mean())
        sim_top1 = float((sim_logits.argmax(1) == labels).float().mean())

    def time_all() -> dict[int, list[float]]:
        out = {}
        for bs in batch_sizes:
            x = inputs[:bs]
            if len(x) < bs:
                x = x.repeat((bs + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:bs]
            out[bs] = timed_us(lambda x=x: packed.module(x), repeats, budget_s=TIMING_BUDGET_S)
        return out

    # Timed again after a pause while other processes keep the machine busy, up to quiet_retries times; a
    # figure still taken under load is marked so.
    for attempt in range(quiet_retries + 1):
        times, share = others_share(time_all)
        if share is None or share <= BUSY_SHARE or attempt == quiet_retries:
            break
        time.sleep(quiet_wait_s)
    conditions = {
        "others_cpu_share": None if share is None else round(share, 3),
        "under_load": share is not None and share > BUSY_SHARE,
        "timings": attempt + 1,
        "repeats": min((len(t) for t in times.values()), default=0),  # fewer than asked where TIMING_BUDGET_S ran out
    }
    report = ValidationReport(
        top1=top1,
        sim_top1=sim_top1,
        agreement=float((logits.argmax(1) == sim_logits.argmax(1)).float().mean()),
        max_logit_diff=float((logits - sim_logits).abs().max()),
        samples=len(inputs),
        packed_bytes=packed.nbytes,
        buffer_bytes=packed.buffer_bytes,
        latency_us={bs: statistics.median(t) for bs, t in times.items()},
        latency_iqr_us={bs: iqr(t) for bs, t in times.items()},
        latency_conditions=conditions,
        threads=torch.get_num_threads(),
        isa=isa(),
        kernel_layers=len(packed.kernel_layers),
        layers=len(model.layers),
    )
    report.packed = packed  # not a field: to_dict() leaves it out; callers may save it
    return report
