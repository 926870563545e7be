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
from .base import Candidate, CandidateCallback, Progress, ProgressCallback, SearchContext, SearchError, SearchOptions, SearchResult
from .baselines import random_configs, uniform
from .haq import haq_search
from .imprinting import imprinting_search
from .sqnr import sqnr_search

METHODS = {
    "uniform": uniform,
    "random": random_configs,
    "sqnr": sqnr_search,
    "imprinting": imprinting_search,
    "haq": haq_search,
}


def run_search(method: str, model: LoadedModel, data: DataSplits, budget: Budget,
               options: SearchOptions | None = None, on_progress: ProgressCallback | None = None,
               latency: LatencyTable | None = None, simulator: Simulator | None = None,
               on_candidate: CandidateCallback | None = None) -> SearchResult:
    """Run `method`; `on_candidate` sees each recorded candidate as it is found (the service stores it then)."""
    if method not in METHODS:
        raise SearchError(f"unknown search method {method!r}; available: {', '.join(sorted(METHODS))}")
    ctx = SearchContext(method, model, data, budget, options or SearchOptions(), on_progress, latency, simulator,
                        on_candidate)
    METHODS[method](ctx)
    return ctx.result()


__all__ = ["METHODS", "Candidate", "Progress", "SearchContext", "SearchError", "SearchOptions", "SearchResult",
           "run_search"]
