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
FINETUNE_METHODS = ("imprinting", "haq")  # the methods that take options.finetune


def check_method_options(method: str, options: SearchOptions) -> None:
    """Refuse options the method does not take (fine-tuning outside imprinting and haq)."""
    if method not in METHODS:
        raise SearchError(f"unknown search method {method!r}; available: {', '.join(sorted(METHODS))}")
    if options.finetune.enabled and method not in FINETUNE_METHODS:
        raise SearchError(f"method {method!r} does not fine-tune; fine-tuning is an option of "
                          f"{' and '.join(FINETUNE_METHODS)}")


def run_search(method: str, model: LoadedModel, data: DataSplits, budget: Budget,
               options: SearchOptions | None = None, on_progress: ProgressCallback | None = None,
               latency: LatencyTable | None = None, simulator: Simulator | None = None,
               on_candidate: CandidateCallback | None = None) -> SearchResult:
    """Run `method`; `on_candidate` sees each recorded candidate as it is found (the service stores it then)."""
    options = options or SearchOptions()
    check_method_options(method, options)
    ctx = SearchContext(method, model, data, budget, options, on_progress, latency, simulator,
                        on_candidate)
    METHODS[method](ctx)
    return ctx.result()


__all__ = ["FINETUNE_METHODS", "METHODS", "Candidate", "Progress", "SearchContext", "SearchError", "SearchOptions",
           "SearchResult", "check_method_options", "run_search"]
