"""Budget sweeps: one job, several budgets, one Pareto front.

    result = run_sweep("sqnr", model, splits, [Budget(avg_wbits=3), Budget(avg_wbits=2.5), Budget(avg_wbits=4)])

The method runs once per budget, the main budget (index 0) first and then the others in order, all on one
Simulator and one Measurements: what a run measures (sqnr's damage passes, search/measurement.py) is measured
once and reused by the runs after it, so an extra budget costs its solving and scoring only. The runs merge
into one SweepResult:

- a config is one candidate, stored once (the first run that finds it; `meta["budget"]` is that run's index),
  and `on_candidate` sees each config once, in the order found;
- the Pareto front is marked over every candidate, on the main budget's first metric (every budget of a sweep
  limits the same metrics, search/spec.py);
- each budget's recommendation is the one its own run makes, the same as a job with that budget alone;
  `recommended` is the main budget's, `recommended_per_budget[i]` budget i's, and a recommended candidate
  lists the budgets it is recommended for in `meta["recommended_for"]`;
- `fits` says whether a candidate meets the main budget;
- progress runs over the whole job (never backwards), seconds per phase are summed over the runs, the
  measurement records of all runs are listed once each (with the index of the run that asked for them), and
  the sensitivity is the first run's that has one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .cost import Budget, LatencyTable
from .data import DataSplits
from .measurement import Measurements
from .model import LoadedModel
from .searches import SearchOptions, SearchResult, run_search
from .searches.base import Candidate, CandidateCallback, Progress, ProgressCallback, mark_pareto
from .simulate import Simulator

__all__ = ["SweepResult", "budget_label", "config_key", "run_sweep"]


def config_key(c: Candidate) -> str:
    """What makes two candidates the same: their whole config (widths, schemes, calibration, the model)."""
    return c.config.model_dump_json()


def budget_label(budget: Budget) -> str:
    """'avg_wbits <= 3, act_bytes <= 4096': a budget in words, for tables and progress."""
    return ", ".join(f"{metric} <= {limit:g}" for metric, limit in budget.limits().items())


@dataclass
class SweepResult(SearchResult):
    """A SearchResult over several budgets (`budget` is the main one, `budgets[0]`)."""

    budgets: list[Budget] = field(default_factory=list)
    recommended_per_budget: list[Candidate | None] = field(default_factory=list)

    def _index(self, c: Candidate | None) -> int | None:
        return None if c is None else next(i for i, o in enumerate(self.candidates) if o is c)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["budgets"] = [b.limits() for b in self.budgets]
        out["recommended_per_budget"] = [self._index(c) for c in self.recommended_per_budget]
        return out


class _JobProgress:
    """One job's progress over its runs: finished runs' steps, plus the current run's; the runs still to come are
    counted as long as the current one (their own totals are known only once they start)."""

    def __init__(self, budgets: list[Budget], on_progress: ProgressCallback):
        self.budgets = budgets
        self.on_progress = on_progress
        self.done = 0  # steps of the finished runs
        self.step = 0
        self.run_total = 0
        self.main_best: Candidate | None = None

    def callback(self, index: int) -> ProgressCallback:
        n = len(self.budgets)
        self.run_total = 0

        def report(p: Progress) -> None:
            self.run_total = p.total
            total = self.done + p.total * (n - index)
            self.step = max(self.step, self.done + p.step)  # a later run's estimate never moves the bar back
            # The main budget's best is what the job recommends; the other runs' bests are shown in the result.
            best = p.best if index == 0 else self.main_best
            phase = f"budget {index + 1}/{n}: {p.phase}"
            self.on_progress(Progress(self.step, max(total, self.step), phase, best))

        return report

    def finished(self) -> None:
        self.done += self.run_total
        self.step = max(self.step, self.done)


def run_sweep(
    method: str,
    model: LoadedModel,
    splits: DataSplits,
    budgets: list[Budget],
    options: SearchOptions | None = None,
    on_progress: ProgressCallback | None = None,
    on_candidate: CandidateCallback | None = None,
    latency: LatencyTable | None = None,
    simulator: Simulator | None = None,
    measurements: Measurements | None = None,
) -> SweepResult:
    """Run `method` at every budget (the main one first) on one simulator and one Measurements; one result."""
    if not budgets:
        raise ValueError("a sweep needs at least one budget")
    started = time.perf_counter()
    sim = simulator or Simulator(model, splits.calib.inputs)
    setup = time.perf_counter() - started
    measurements = measurements if measurements is not None else Measurements()
    progress = _JobProgress(budgets, on_progress) if on_progress is not None else None

    kept: dict[str, Candidate] = {}
    candidates: list[Candidate] = []
    runs: list[SearchResult] = []
    measurement: list[dict] = []
    for index, budget in enumerate(budgets):

        def keep(c: Candidate, index: int = index) -> None:
            key = config_key(c)
            if key in kept:  # found under an earlier budget: stored then
                return
            c.meta["budget"] = index
            kept[key] = c
            candidates.append(c)
            if on_candidate is not None:
                on_candidate(c)

        run = run_search(
            method,
            model,
            splits,
            budget,
            options,
            None if progress is None else progress.callback(index),
            latency,
            sim,
            keep,
            measurements,
        )
        runs.append(run)
        measurement += [{**record, "budget": index} for record in run.measurement]  # the passes this run asked for
        if progress is not None:
            progress.finished()
            if index == 0 and run.recommended is not None:
                progress.main_best = kept.get(config_key(run.recommended))

    recommended_per_budget = [None if r.recommended is None else kept[config_key(r.recommended)] for r in runs]
    for index, c in enumerate(recommended_per_budget):
        if c is not None:
            c.meta.setdefault("recommended_for", []).append(index)
    main = budgets[0]
    for c in candidates:
        c.fits = main.fits(c.cost)
    metric = runs[0].pareto_metric
    mark_pareto(candidates, metric)

    phases: dict[str, float] = {"setup": setup}
    for run in runs:
        for name, seconds in run.phase_seconds.items():
            phases[name] = phases.get(name, 0.0) + seconds
    return SweepResult(
        method,
        main,
        candidates,
        metric,
        time.perf_counter() - started,
        recommended_per_budget[0],
        phase_seconds={name: round(seconds, 3) for name, seconds in phases.items()},
        measurement=measurement,
        sensitivity=next((r.sensitivity for r in runs if r.sensitivity is not None), None),
        budgets=list(budgets),
        recommended_per_budget=recommended_per_budget,
    )
