"""What every search shares: options, candidates, the result, progress, and the context they run in."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import QuantConfig
from ..cost import Budget, Cost, LatencyTable, check_feasible, cost_of
from ..data import DataSplits, LabelledSet
from ..finetune import FineTuneError, FineTuneOptions, training_set
from ..measurement import DamageMeter, Measurements, pass_identity, reference_key
from ..model import LoadedModel
from ..pareto import pareto_front
from ..quant.activation import FLOAT_ACT_BITS
from ..simulate import EvalResult, Simulator


class SearchError(ValueError):
    """A search that cannot start: unknown method, bad options."""


class MethodParams(BaseModel):
    """A method's own options (`SearchOptions.params`), one typed model per method, registered beside it in
    search/searches/__init__.py. Unknown keys are refused with their names; values are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def parse_params(method: str, cls: type[MethodParams], raw: dict) -> MethodParams:
    from pydantic import ValidationError

    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        unknown = [".".join(map(str, err["loc"])) for err in e.errors() if err["type"] == "extra_forbidden"]
        if unknown:
            takes = ", ".join(cls.model_fields) or "none"
            raise SearchError(
                f"unknown {method} option(s) {', '.join(map(repr, unknown))}; {method} takes: {takes}"
            ) from e
        problems = "; ".join(f"{method} option {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SearchError(problems) from e


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    w_bits: list[int] = Field(default_factory=lambda: list(range(2, 9)), description="weight bit choices per layer")
    a_bits: list[int] = Field(default_factory=lambda: [8], description="activation bit choices (16 = float)")
    seed: int = 0
    scheme: str = Field(default="uniform", pattern="^(uniform|pot|apot)$")
    clip: str = Field(default="mse", pattern="^(max|mse)$")
    act_calibration: str = Field(default="mse", pattern="^(minmax|percentile|mse)$")
    val_samples: int = Field(default=2000, ge=100, description="validation images used to score each candidate")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="method-specific options, checked against "
        "the method's own typed params (search/searches/__init__.py)",
    )
    finetune: FineTuneOptions = Field(
        default_factory=FineTuneOptions,
        description="STE fine-tuning on the training split (imprinting: between "
        "steps; haq: per episode); off by default",
    )

    @field_validator("w_bits")
    @classmethod
    def _w(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= b <= 8 for b in v):
            raise ValueError("w_bits choices must be a non-empty list of values in 1..8")
        return sorted(set(v))

    @field_validator("a_bits")
    @classmethod
    def _a(cls, v: list[int]) -> list[int]:
        if not v or any(not (2 <= b <= 8 or b == FLOAT_ACT_BITS) for b in v):
            raise ValueError(f"a_bits choices must be a non-empty list of values in 2..8 or {FLOAT_ACT_BITS}")
        return sorted(set(v))


@dataclass
class Candidate:
    config: QuantConfig
    cost: Cost
    score: float  # the search's own figure of merit (higher is better)
    val_top1: float | None
    val_sqnr_db: float
    fits: bool
    meta: dict = field(default_factory=dict)
    pareto: bool = False

    @property
    def quality(self) -> float:
        """Accuracy when labels exist, else output SQNR: what "most accurate" means."""
        return self.val_top1 if self.val_top1 is not None else self.val_sqnr_db

    def to_dict(self) -> dict:
        return {
            "w_bits": self.config.w_bits(),
            "a_bits": self.config.a_bits(),
            "cost": self.cost.to_dict(),
            "score": self.score,
            "val_top1": self.val_top1,
            "val_sqnr_db": None if math.isinf(self.val_sqnr_db) else self.val_sqnr_db,
            "fits": self.fits,
            "pareto": self.pareto,
            "meta": self.meta,
        }


@dataclass
class Progress:
    step: int
    total: int
    phase: str
    best: Candidate | None


ProgressCallback = Callable[[Progress], None]
CandidateCallback = Callable[["Candidate"], None]


@dataclass
class SearchResult:
    method: str
    budget: Budget
    candidates: list[Candidate]
    pareto_metric: str
    seconds: float
    recommended: Candidate | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)  # where the seconds went (SearchContext.phase)
    measurement: list[dict] = field(default_factory=list)  # each measurement pass: computed or reused chunks
    sensitivity: dict | None = None  # per-layer damage at each width, where the method measures it

    @property
    def pareto(self) -> list[Candidate]:
        return [c for c in self.candidates if c.pareto]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget.limits(),
            "pareto_metric": self.pareto_metric,
            "seconds": self.seconds,
            "phase_seconds": self.phase_seconds,
            "measurement": self.measurement,
            "candidates": [c.to_dict() for c in self.candidates],
            "recommended": None if self.recommended is None else self.candidates.index(self.recommended),
            "recommended_config": None if self.recommended is None else self.recommended.config.model_dump(),
        }


def mark_pareto(candidates: list[Candidate], metric: str) -> None:
    """Sorted by cost, a candidate is on the front when it is more accurate than every cheaper one."""
    front = {id(c) for c in pareto_front(candidates, lambda c: getattr(c.cost, metric), lambda c: c.quality)}
    for c in candidates:
        c.pareto = id(c) in front


class SearchContext:
    """The model, data, budget and simulator a search works with; candidates are evaluated through it."""

    def __init__(
        self,
        method: str,
        model: LoadedModel,
        splits: DataSplits,
        budget: Budget,
        options: SearchOptions,
        on_progress: ProgressCallback | None = None,
        latency: LatencyTable | None = None,
        simulator: Simulator | None = None,
        on_candidate: CandidateCallback | None = None,
        measurements: Measurements | None = None,
    ):
        from . import method_params  # the registry imports this module

        started = time.perf_counter()

        self.method = method
        self.params = method_params(method, options.params)
        self.model = model
        self.splits = splits
        self.budget = budget
        self.options = options
        self.latency = latency
        if budget.latency_us is not None and latency is None:
            raise SearchError("a latency budget needs a latency table (bitsearch latency-table, or a table file)")
        check_feasible(model, budget, options.w_bits, options.a_bits, latency, options.scheme)
        self._finetune_set: LabelledSet | None = None
        if options.finetune.enabled:  # fail before anything runs
            try:
                self._finetune_set = training_set(splits.train, options.finetune, options.seed)
            except FineTuneError as e:
                raise SearchError(str(e)) from e
        self.sim = simulator or Simulator(model, splits.calib.inputs)
        self.val: LabelledSet = splits.val.subset(slice(0, options.val_samples))
        self.candidates: list[Candidate] = []
        self._seen: dict[tuple, Candidate] = {}
        self._on_progress = on_progress
        self._on_candidate = on_candidate
        self._last_step = -1
        self.started = started
        self.measurements = measurements if measurements is not None else Measurements()
        self._own_records = len(self.measurements.records)  # a shared Measurements holds earlier searches' too
        self._reference_ready = False
        self._meter: DamageMeter | None = None
        self._identity: dict | None = None
        # Seconds per phase: time goes to the innermost phase open (`phase()`); "setup" is the calibration.
        self.phase_seconds: dict[str, float] = {"setup": time.perf_counter() - started}
        self._phases: list[tuple[str, float]] = []
        # A search that measures per-layer sensitivity sets this (search/sensitivity.py reads it).
        self.sensitivity: dict | None = None
        self.pareto_metric = next(iter(budget.limits()))
        self.layer_names = [l.name for l in model.layers]

    # -- measurement ----------------------------------------------------------------------------------
    def damage_meter(self) -> DamageMeter:
        if self._meter is None:
            self._meter = DamageMeter(self.sim, self.splits.calib.inputs, self.layer_names)
        return self._meter

    def measurement_identity(self) -> dict:
        """What a measurement pass depends on besides its own widths, images and base config
        (search/measurement.py): the model, the calibration images by content, the quantizer settings."""
        if self._identity is None:
            o = self.options
            self._identity = pass_identity(
                self.model.sha256, self.splits.calib.inputs, o.scheme, o.clip, o.act_calibration
            )
        return self._identity

    @contextmanager
    def phase(self, name: str):
        """Count the time of the block to phase `name` (nested phases take their own time out of it)."""
        now = time.perf_counter()
        if self._phases:
            outer, since = self._phases[-1]
            self.phase_seconds[outer] = self.phase_seconds.get(outer, 0.0) + now - since
        self._phases.append((name, now))
        try:
            yield
        finally:
            end = time.perf_counter()
            _, since = self._phases.pop()
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + end - since
            if self._phases:
                self._phases[-1] = (self._phases[-1][0], end)

    # -- configs and costs --------------------------------------------------------------------------
    def config(self, w_bits: dict[str, int], a_bits: dict[str, int]) -> QuantConfig:
        o = self.options
        return QuantConfig.from_bits(
            self.model, w_bits, a_bits, scheme=o.scheme, clip=o.clip, act_calibration=o.act_calibration
        )

    def cost(self, w_bits: dict[str, int], a_bits: dict[str, int]) -> Cost:
        return cost_of(
            self.model,
            w_bits,
            a_bits,
            {n: self.options.scheme for n in w_bits},
            self.latency if self.budget.latency_us is not None else None,
        )

    def fits(self, w_bits: dict[str, int], a_bits: dict[str, int]) -> bool:
        return self.budget.fits(self.cost(w_bits, a_bits))

    def uniform_bits(self, bits: int) -> dict[str, int]:
        return {n: bits for n in self.layer_names}

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, config: QuantConfig, data: LabelledSet | None = None) -> EvalResult:
        if data is None:
            self._float_reference()
        return self.sim.evaluate(config, data if data is not None else self.val)

    def _float_reference(self) -> None:
        """The float model's outputs on the validation images, which every candidate is compared with: read from
        the measurements when a search on the same model and images kept them, else computed once and kept."""
        if self._reference_ready:
            return
        self._reference_ready = True
        x = self.val.inputs
        key = reference_key(self.model.sha256, x)
        stored = self.measurements.reference(key)
        if stored is not None and stored.shape[0] == x.shape[0]:
            self.sim.remember_float_logits(x, stored)
        else:
            self.measurements.keep_reference(key, self.sim.float_logits(x))

    def add_candidate(
        self,
        w_bits: dict[str, int],
        a_bits: dict[str, int],
        score: float | None = None,
        samples: int | None = None,
        **meta,
    ) -> Candidate | None:
        """Record a config that meets the budget (once), scored on the validation subset; others are skipped.

        `samples` scores it on only the first images of that subset (a search's cheap side candidates on a big
        model); such a candidate says so in meta.val_samples and is recommended only when no fully scored one fits.
        """
        key = (tuple(w_bits[n] for n in self.layer_names), tuple(a_bits[n] for n in self.layer_names))
        if key in self._seen:
            return self._seen[key]
        cost = self.cost(w_bits, a_bits)
        if not self.budget.fits(cost):
            return None
        config = self.config(w_bits, a_bits)
        with self.phase("score"):
            if samples is not None and samples < len(self.val):
                res = self.evaluate(config, self.val.subset(slice(0, samples)))
                meta = {**meta, "val_samples": samples}
            else:
                res = self.evaluate(config)
        if score is None:
            score = res.top1 if res.top1 is not None else res.sqnr_db
        cand = Candidate(config, cost, score, res.top1, res.sqnr_db, True, meta)
        self._seen[key] = cand
        self.candidates.append(cand)
        if self._on_candidate is not None:
            self._on_candidate(cand)
        return cand

    def best_fitting(self) -> Candidate | None:
        # Ties in accuracy go to the cheaper config (then the earlier one), the same order mark_pareto uses,
        # so the recommended candidate is always on the Pareto front.
        fitting = [(i, c) for i, c in enumerate(self.candidates) if c.fits]
        if not fitting:
            return None
        # a candidate scored on fewer images is not compared with the others' figures while one of those fits
        fitting = [(i, c) for i, c in fitting if "val_samples" not in c.meta] or fitting
        return min(fitting, key=lambda ic: (-ic[1].quality, getattr(ic[1].cost, self.pareto_metric), ic[0]))[1]

    def finetune_set(self) -> LabelledSet:
        """The labelled images STE fine-tuning uses (options.finetune; checked when the context is made)."""
        if self._finetune_set is None:
            raise SearchError("fine-tuning is off (finetune.epochs and finetune.steps are 0)")
        return self._finetune_set

    def tick(self, total: int, phase: str) -> None:
        """Report the last step again from inside a long step (fine-tuning), so a caller can show that the
        search is alive and cancel it there; the step never moves backwards."""
        self.report(max(self._last_step, 0), total, phase)

    def report(self, step: int, total: int, phase: str) -> None:
        if self._on_progress is None:
            return
        step = max(step, self._last_step)  # never report going backwards
        self._last_step = step
        self._on_progress(Progress(step, total, phase, self.best_fitting()))

    def result(self) -> SearchResult:
        mark_pareto(self.candidates, self.pareto_metric)
        seconds = time.perf_counter() - self.started
        phases = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        phases["other"] = round(max(seconds - sum(self.phase_seconds.values()), 0.0), 3)
        recommended = self.best_fitting()
        sensitivity = self.sensitivity
        if sensitivity is not None:
            chosen = None if recommended is None else recommended.config
            sensitivity = {
                **sensitivity,
                "chosen": None if chosen is None else {"w_bits": chosen.w_bits(), "a_bits": chosen.a_bits()},
            }
        return SearchResult(
            self.method,
            self.budget,
            self.candidates,
            self.pareto_metric,
            seconds,
            recommended,
            phase_seconds=phases,
            measurement=[r.to_dict() for r in self.measurements.records[self._own_records :]],
            sensitivity=sensitivity,
        )
