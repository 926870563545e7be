"""A job's expected peak memory, before it starts, from the layer shapes and the options.

The service refuses a job whose estimate is over the worker's limit at submission, with the estimate and the
option that lowers it most; the CLI and the job page show it. The estimate adds up what a search holds at its
peak (docs/methods.md#memory-estimate):

- runtime: the interpreter, torch and our kernels (measured: about 350 MB resident after import);
- weights: the folded float weights, times the copies a search keeps (the loaded graph, the simulator's copy
  and its float originals, fake-quantized weights cached per bit-width);
- data: the calibration and validation samples the search decodes to float32, and the test samples a
  validation reads;
- forward: one batch through the graph, the batch sized by search.simulate.batch_size_for so that the largest
  tensor stays within its budget, times the most that is alive at once (liveness over the export's shapes);
- method: what the method keeps across forwards (sqnr: the values its suffix re-runs read; imprinting: one
  embedding per layer and calibration sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["ActivationProfile", "MemoryEstimate", "activation_profile", "estimate_job_memory"]

MB = 1 << 20
# Calibrated on 2026-12-05 against the peak RSS of searches on ResNet-18 and MobileNetV2 at 224 px (docs/benchmarks.md):
# a search process imports more than torch (scipy's HiGHS, rich, pydantic), and a simulated forward holds each
# quantized layer's input, its fake-quantized copy and a channels-last copy besides the liveness walk's tensors.
RUNTIME_BYTES = 600 * MB
WEIGHT_COPIES = 4
FORWARD_COPIES = 3
FLOAT = 4


@dataclass(frozen=True)
class ActivationProfile:
    """Elements per sample: the largest tensor the graph computes, and the most alive at once."""

    largest: int
    peak_live: int
    total: int = 0  # every tensor the graph computes for one sample (what imprinting keeps when it can)

    def to_dict(self) -> dict:
        return {
            "activation_largest": self.largest,
            "activation_peak_live": self.peak_live,
            "activation_total": self.total,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ActivationProfile | None:
        """From a stored model analysis; None for analyses stored before the profile was recorded."""
        if d.get("activation_largest") is None:
            return None
        peak = int(d["activation_peak_live"])
        return cls(int(d["activation_largest"]), peak, int(d.get("activation_total") or peak))


def _elements(node: fx.Node) -> int:
    val = node.meta.get("val")
    leaves = val if isinstance(val, (tuple, list)) else [val]
    total = 0
    for v in leaves:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            try:
                total += math.prod(int(s) for s in v.shape[1:])
            except (TypeError, ValueError):
                continue
    return total


def activation_profile(gm: fx.GraphModule) -> ActivationProfile:
    """Walk the graph in order, adding each value when computed and dropping it after its last use (views are
    counted as new tensors: the estimate errs high)."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    alive: dict[fx.Node, int] = {}
    live = peak = largest = total = 0
    for i, n in enumerate(nodes):
        if n.op in ("call_function", "call_module", "placeholder"):
            e = _elements(n)
            alive[n] = e
            live += e
            largest = max(largest, e)
            peak = max(peak, live)
            total += e
        for a in n.all_input_nodes:
            if last_use.get(a) == i and a in alive:
                live -= alive.pop(a)
    return ActivationProfile(largest, peak, total)


@dataclass(frozen=True)
class MemoryEstimate:
    phase: str  # "search" | "validation": they run in different processes, the job's peak is the larger
    parts: dict[str, int]  # bytes
    lever: str  # the option that lowers the estimate most

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def total_mb(self) -> int:
        return math.ceil(self.total_bytes / MB)

    def parts_mb(self) -> dict[str, int]:
        return {k: math.ceil(v / MB) for k, v in self.parts.items()}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / MB:,.0f}" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1]))
        return f"about {self.total_mb:,} MB in its {self.phase} ({parts} MB)"


def forward_batch(profile: ActivationProfile) -> int:
    from .simulate import batch_for_largest

    return batch_for_largest(profile.largest)


def estimate_job_memory(
    *,
    method: str,
    profile: ActivationProfile,
    input_elements: int,
    weight_params: int,
    layers: int,
    calib_samples: int,
    val_samples: int,
    validate_samples: int = 0,
    embedding: int = 256,
    sqnr_samples: int = 64,
) -> MemoryEstimate:
    """The larger of the search's and the validation's peak (each runs in its own worker process)."""
    common = {
        "runtime": RUNTIME_BYTES,
        "weights": weight_params * FLOAT * WEIGHT_COPIES,
        "forward": forward_batch(profile) * profile.peak_live * FLOAT * FORWARD_COPIES,
    }
    search = {**common, "data": (calib_samples + val_samples) * input_elements * FLOAT}
    levers = {"data": "calib_size or val_samples"}
    if method == "sqnr":
        from .measurement import MEASURE_BYTES

        # a chunk of measurement images keeps the float layer outputs and the base run's values, at most 1 GB
        search["method"] = min(MEASURE_BYTES, min(calib_samples, sqnr_samples) * profile.peak_live * FLOAT)
        levers["method"] = "the sqnr measurement's samples (params.propagation_samples)"
    elif method == "imprinting":
        from .searches.imprinting import KEEP_ACTIVATIONS_BYTES, STREAM_CHUNK_BYTES

        # every intermediate of the calibration set when it fits, else a streamed chunk; and the embeddings
        kept = calib_samples * profile.total * FLOAT
        search["method"] = (kept if kept <= KEEP_ACTIVATIONS_BYTES else STREAM_CHUNK_BYTES) + (
            layers * calib_samples * embedding * FLOAT
        )
        levers["method"] = "calib_size or params.embedding"
    searching = MemoryEstimate("search", search, levers[max(levers, key=lambda k: search[k])])
    validation = {**common, "data": (calib_samples + validate_samples) * input_elements * FLOAT}
    validating = MemoryEstimate("validation", validation, "validate_top_k=0 or the server's validate_samples")
    return max(searching, validating, key=lambda e: e.total_bytes) if validate_samples else searching
