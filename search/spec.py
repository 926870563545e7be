"""One job, typed: the spec the CLI, the API and the worker all build, and the functions they all call with it.

    spec = JobSpec(method="sqnr", budget={"avg_wbits": 3}, seed=1, params={"sweep_points": 3})
    splits = load_job_data(spec, "fashion-mnist")          # calibration/validation chosen by (seed, calib_size)
    result = run_job(spec, load_model("model.pt2"), splits)

A spec may carry a budget sweep (`sweep=[{"avg_wbits": 2.5}, {"avg_wbits": 4}]`): the method then runs once per
budget, main budget first, on one simulator and one set of measurements, and the runs merge into one result
with one Pareto front (search/sweep.py).

A spec is checked when it is made: bit choices, scheme, every per-method param against the method's typed
params (an unknown key is refused with its name), fine-tuning only for the methods that fine-tune. Nothing
else rebuilds "options -> data -> search", so the service and the CLI cannot calibrate on different images.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, field_serializer, field_validator, model_validator

from .cost import METRICS, Budget, BudgetError, LatencyTable
from .data import DEFAULT_CALIB_SIZE, DataSplits, load_splits
from .measurement import DamagePass, Measurements, ScorePass
from .model import LoadedModel
from .searches import CandidateCallback, ProgressCallback, SearchOptions, SearchResult, check_method_options, run_search
from .simulate import Simulator

__all__ = ["MAX_SWEEP", "JobSpec", "SpecError", "load_job_data", "make_spec", "parse_budget", "pass_runner", "run_job"]

MAX_SEED = 2**31 - 1
MAX_SWEEP = 16  # extra budgets one job may carry: each is a full run of the method (measurements aside)


class SpecError(ValueError):
    """A job spec that cannot run; the message names every bad field in one line."""


def parse_budget(raw) -> Budget:
    """The one budget parser: a Budget, a dict of limits ({"avg_wbits": 3}), or CLI items ["avg_wbits=3"].
    Raises BudgetError naming the problem."""
    if isinstance(raw, Budget):
        return raw
    if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        return Budget.parse(list(raw))
    if not isinstance(raw, dict) or not raw:
        raise BudgetError(
            f'a budget is a non-empty object of limits, e.g. {{"avg_wbits": 3}}; metrics: {", ".join(METRICS)}'
        )
    unknown = sorted(set(raw) - set(METRICS))
    if unknown:
        raise BudgetError(f"unknown metric(s) {unknown}; expected {', '.join(METRICS)}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw.values()):
        raise BudgetError("every budget limit must be a number")
    try:
        return Budget(**raw)
    except ValueError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in getattr(e, "errors", list)())
        raise BudgetError(f"invalid budget: {problems or e}") from e


class JobSpec(SearchOptions):
    """A search job: the method and its budget, with every SearchOptions field, the calibration size and the
    split seed. The service stores `job_options()` and rebuilds the same spec in the worker."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="imprinting | sqnr | haq | uniform | random")
    budget: Budget = Field(description='upper limits, e.g. {"avg_wbits": 3}')
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="the search's RNG and the calibration subset")
    calib_size: int = Field(default=DEFAULT_CALIB_SIZE, ge=16, le=65536, description="calibration samples")
    val_samples: int = Field(
        default=2000, ge=100, le=100000, description="validation samples each candidate is scored on"
    )

    sweep: list[Budget] = Field(
        default_factory=list,
        description=f"up to {MAX_SWEEP} more budgets, each limiting the same metrics as `budget` (other values): "
        "the method runs once per budget and the job keeps one Pareto front over all of them",
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v):
        return parse_budget(v)

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweep(cls, v):
        if not isinstance(v, (list, tuple)):
            raise ValueError('a sweep is a list of budgets, e.g. [{"avg_wbits": 2.5}, {"avg_wbits": 4}]')
        if len(v) > MAX_SWEEP:
            raise ValueError(f"a sweep holds at most {MAX_SWEEP} budgets, got {len(v)}")
        budgets = []
        for i, raw in enumerate(v):
            try:
                budgets.append(parse_budget(raw))
            except BudgetError as e:
                raise ValueError(f"sweep[{i}]: {e}") from e
        return budgets

    @field_serializer("sweep")
    def _sweep_limits(self, sweep: list[Budget]) -> list[dict[str, float]]:
        # Only the limits that are set: what parse_budget reads back when the worker rebuilds the spec.
        return [b.limits() for b in sweep]

    @model_validator(mode="after")
    def _method_takes_these_options(self) -> JobSpec:
        check_method_options(self.method, self)
        return self

    @model_validator(mode="after")
    def _sweep_like_the_budget(self) -> JobSpec:
        # One Pareto front needs one cost axis, and every candidate's cost must carry every figure each budget
        # limits (latency only exists where a budget asks for it), so a sweep changes values, not metrics.
        metrics = list(self.budget.limits())
        seen = {tuple(sorted(self.budget.limits().items())): "budget"}
        for i, b in enumerate(self.sweep):
            if list(b.limits()) != metrics:
                raise ValueError(
                    f"sweep[{i}] limits {', '.join(b.limits())}; every sweep budget limits the same metrics as "
                    f"the budget ({', '.join(metrics)}), with other values"
                )
            key = tuple(sorted(b.limits().items()))
            if key in seen:
                limits = ", ".join(f"{k}={v:g}" for k, v in b.limits().items())
                raise ValueError(f"sweep[{i}] repeats {seen[key]} ({limits})")
            seen[key] = f"sweep[{i}]"
        return self

    def budgets(self) -> list[Budget]:
        """Every budget the job runs at: the main one (index 0), then the sweep's in order (1, 2, ...)."""
        return [self.budget, *self.sweep]

    @classmethod
    def from_job(cls, method: str, budget: dict, options: dict) -> JobSpec:
        """The spec of a stored job (its method, budget limits and job_options())."""
        return cls(method=method, budget=budget, **options)

    def search_options(self) -> SearchOptions:
        return SearchOptions(**self.model_dump(include=set(SearchOptions.model_fields)))

    def job_options(self) -> dict:
        """Everything but the method and the budget, as JSON: what a job row stores."""
        return self.model_dump(mode="json", exclude={"method", "budget"})


def make_spec(**fields) -> JobSpec:
    """JobSpec(**fields), with pydantic's report turned into one SpecError line naming each bad field."""
    from pydantic import ValidationError

    try:
        return JobSpec(**fields)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(map(str, err["loc"]))
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown option {where!r}"
                where = ""
            # a message that names its place itself ("sweep[2]: ...") needs no prefix
            problems.append(f"{where}: {message}" if where and not message.startswith(f"{where}[") else message)
        raise SpecError("; ".join(problems)) from e


def load_job_data(
    spec: JobSpec, source: str | Path, name: str | None = None, max_bytes: int | None = None
) -> DataSplits:
    """The calibration and validation (and test, training) splits a job runs on: a built-in data set's name or
    a safetensors file, split by the spec's seed and calibration size."""
    splits = load_splits(str(source), calib_size=spec.calib_size, seed=spec.seed, max_bytes=max_bytes)
    if name is not None:
        splits.name = name
    return splits


def run_job(
    spec: JobSpec,
    model: LoadedModel,
    splits: DataSplits,
    on_progress: ProgressCallback | None = None,
    on_candidate: CandidateCallback | None = None,
    latency: LatencyTable | None = None,
    simulator: Simulator | None = None,
    measurements: Measurements | None = None,
) -> SearchResult:
    """Run the spec's method at its budget; with a sweep, at every budget (search/sweep.py), as one result."""
    if spec.sweep:
        from .sweep import run_sweep

        return run_sweep(
            spec.method,
            model,
            splits,
            spec.budgets(),
            spec.search_options(),
            on_progress,
            on_candidate,
            latency,
            simulator,
            measurements,
        )
    return run_search(
        spec.method,
        model,
        splits,
        spec.budget,
        spec.search_options(),
        on_progress,
        latency,
        simulator,
        on_candidate,
        measurements,
    )


def pass_runner(spec: JobSpec, model: LoadedModel, splits: DataSplits, sim: Simulator, p: DamagePass | ScorePass):
    """What computes the chunks of pass `p` of a job, on another process than the job's own (the service's
    measure_chunk tasks): rebuilt from the job's spec, model and data. Refuses (SpecError) where these no
    longer give the pass's identity, so a chunk is never computed on other inputs than its pass's key says."""
    from .searches import haq
    from .searches.base import SearchContext

    # Scoring and measuring do not depend on the budget; a loose one avoids needing a latency table here.
    ctx = SearchContext(spec.method, model, splits, Budget(avg_wbits=8), spec.search_options(), simulator=sim)
    if p.kind == "damage":
        identity, runner = ctx.measurement_identity(), ctx.damage_meter()
    else:
        data = haq.reward_data(ctx)
        identity, runner = haq.score_identity(ctx, data), haq.EpisodeScorer(ctx, data)
    if identity != p.identity:
        raise SpecError("this job's model and data no longer give the measurement's identity")
    return runner
