"""The bit-allocation searches behind one interface.

    result = run_search("sqnr", model, splits, Budget(avg_wbits=3), SearchOptions(), on_progress)

Every method records candidates through a SearchContext, which checks the budget's
feasibility before anything runs, scores each candidate on the validation split,
marks the Pareto front and recommends the most accurate candidate that fits.
"""

from __future__ import annotations

from ..cost import Budget, LatencyTable
from ..data import DataSplits
from ..model import LoadedModel
from ..simulate import Simulator
from .base import Candidate, Progress, ProgressCallback, SearchContext, SearchError, SearchOptions, SearchResult
from .baselines import random_configs, uniform

METHODS = {
    "uniform": uniform,
    "random": random_configs,
}


def _register_optional() -> None:
    # Each search lives in its own module; import lazily so one broken method does not hide the others.
    import importlib

    for name, module, func in (("sqnr", "sqnr", "sqnr_search"), ("imprinting", "imprinting", "imprinting_search"),
                               ("haq", "haq", "haq_search")):
        try:
            METHODS[name] = getattr(importlib.import_module(f"{__name__}.{module}"), func)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise


_register_optional()


def run_search(method: str, model: LoadedModel, data: DataSplits, budget: Budget,
               options: SearchOptions | None = None, on_progress: ProgressCallback | None = None,
               latency: LatencyTable | None = None, simulator: Simulator | None = None) -> SearchResult:
    if method not in METHODS:
        raise SearchError(f"unknown search method {method!r}; available: {', '.join(sorted(METHODS))}")
    ctx = SearchContext(method, model, data, budget, options or SearchOptions(), on_progress, latency, simulator)
    METHODS[method](ctx)
    return ctx.result()


__all__ = ["METHODS", "Candidate", "Progress", "SearchContext", "SearchError", "SearchOptions", "SearchResult",
           "run_search"]
