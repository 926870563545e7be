"""The bit-allocation searches behind one interface.

    result = run_search("sqnr", model, splits, Budget(avg_wbits=3), SearchOptions(), on_progress)

Every method records candidates through a SearchContext, which checks the budget's
feasibility before anything runs, scores each candidate on the validation split,
marks the Pareto front and recommends the most accurate candidate that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..cost import Budget, LatencyTable
from ..data import DataSplits
from ..measurement import Measurements
from ..model import LoadedModel
from ..simulate import Simulator
from .base import (
    Candidate,
    CandidateCallback,
    MethodParams,
    Progress,
    ProgressCallback,
    SearchContext,
    SearchError,
    SearchOptions,
    SearchResult,
    parse_params,
)
from .baselines import RandomParams, UniformParams, random_configs, uniform
from .haq import HaqParams, haq_search
from .imprinting import ImprintingParams, imprinting_search
from .sqnr import SqnrParams, sqnr_search


@dataclass(frozen=True)
class Method:
    """A search: the function that runs it, its typed params, and whether it takes options.finetune."""

    run: Callable[[SearchContext], None]
    params: type[MethodParams]
    finetunes: bool = False


METHODS: dict[str, Method] = {
    "uniform": Method(uniform, UniformParams),
    "random": Method(random_configs, RandomParams),
    "sqnr": Method(sqnr_search, SqnrParams),
    "imprinting": Method(imprinting_search, ImprintingParams, finetunes=True),
    "haq": Method(haq_search, HaqParams, finetunes=True),
}
FINETUNE_METHODS = tuple(name for name, m in METHODS.items() if m.finetunes)


def method(name: str) -> Method:
    if name not in METHODS:
        raise SearchError(f"unknown search method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_params(name: str, raw: dict) -> MethodParams:
    """`raw` checked against the method's typed params; unknown keys and bad values raise SearchError."""
    return parse_params(name, method(name).params, raw)


def check_method_options(name: str, options: SearchOptions) -> None:
    """Refuse options the method does not take: unknown or malformed params, fine-tuning outside the methods
    that fine-tune."""
    method_params(name, options.params)
    if options.finetune.enabled and not METHODS[name].finetunes:
        raise SearchError(
            f"method {name!r} does not fine-tune; fine-tuning is an option of {' and '.join(FINETUNE_METHODS)}"
        )


def run_search(
    method: str,
    model: LoadedModel,
    data: DataSplits,
    budget: Budget,
    options: SearchOptions | None = None,
    on_progress: ProgressCallback | None = None,
    latency: LatencyTable | None = None,
    simulator: Simulator | None = None,
    on_candidate: CandidateCallback | None = None,
    measurements: Measurements | None = None,
) -> SearchResult:
    """Run `method`; `on_candidate` sees each recorded candidate as it is found (the service stores it then);
    `measurements` keeps (and may spread) what the search measures, so a later search reuses it."""
    options = options or SearchOptions()
    check_method_options(method, options)
    ctx = SearchContext(
        method, model, data, budget, options, on_progress, latency, simulator, on_candidate, measurements
    )
    METHODS[method].run(ctx)
    return ctx.result()


__all__ = [
    "FINETUNE_METHODS",
    "METHODS",
    "Candidate",
    "HaqParams",
    "ImprintingParams",
    "Method",
    "MethodParams",
    "Progress",
    "RandomParams",
    "SearchContext",
    "SearchError",
    "SearchOptions",
    "SearchResult",
    "SqnrParams",
    "UniformParams",
    "check_method_options",
    "method",
    "method_params",
    "run_search",
]
