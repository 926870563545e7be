"""Measurement passes: what sqnr measures, as data that can be keyed, split into chunks, stored and reused.

A pass quantizes every layer alone at each measured width, with the others at a base config, and sums the
noise that lands at every layer output and at the network output (docs/methods.md#sqnr-allocation). Its
sums depend only on what `DamagePass` holds: the model and calibration images (by content hash), the
quantizer settings, the widths, the images measured and the base config, plus the version of this code and of
torch. Its key is the sha256 of all of that, so a pass with the same key is the same measurement, and
anything that changes it changes the key (docs/measurement.md).

A pass is split into chunks of layers. A chunk's result is a few floats per (layer, width); combining the
chunks in order gives the same tables however many processes computed them, because each chunk runs
exactly what one process would run for those layers (the same image chunks, in the same order).

    meter = DamageMeter(sim, calib_inputs, layer_names)
    results = Measurements().run(damage_pass, meter)     # here, chunk by chunk; the worker spreads them
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .quant.activation import ActStats
from .simulate import Simulator, SuffixRunner, fast_layout

__all__ = [
    "MEASUREMENT_VERSION",
    "CHUNK_WORK",
    "MEASURE_BYTES",
    "DamageMeter",
    "DamagePass",
    "Measurements",
    "PassRecord",
    "PassRunner",
    "ScorePass",
    "calibration_key",
    "load_calibration",
    "reference_key",
    "save_calibration",
    "chunk_layers",
    "pass_from_json",
    "pass_identity",
    "tensor_sha256",
]

# Bump when anything that changes a pass's sums changes (the measuring code, the quantizers it calls):
# every stored measurement then stops matching and is measured again.
MEASUREMENT_VERSION = 1
MEASURE_BYTES = 1 << 30  # what one image chunk keeps: the float layer outputs and the base run
# A chunk of layers is about this much work (MACs re-run, search.simulate.layer_work): about 3 s on 2 cores
# (search/searches/sqnr.py MEASURE_WORK's scale), long enough that the database round trips and a helping
# worker's float and base runs do not count, short enough that a killed worker loses little.
CHUNK_WORK = 5e11
OUTPUT = "__output__"


def _digest(fields: dict) -> str:
    """sha256 of `fields` as canonical JSON: the one way every key here is made."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def pass_identity(model_sha256: str, calib_inputs: torch.Tensor, scheme: str, clip: str, act_calibration: str) -> dict:
    """What a pass depends on besides its widths, images and base config: the model, the calibration images by
    content (the activation ranges come from all of them), the quantizer settings, this code and torch."""
    return {
        "model_sha256": model_sha256,
        "calibration_sha256": tensor_sha256(calib_inputs),
        "scheme": scheme,
        "clip": clip,
        "act_calibration": act_calibration,
        "measurement_version": MEASUREMENT_VERSION,
        "torch": torch.__version__,
    }


def calibration_key(model_sha256: str, calib_inputs: torch.Tensor) -> str:
    """The key of a simulator's activation calibration: it depends on the model and the calibration images."""
    fields = {
        "model_sha256": model_sha256,
        "calibration_sha256": tensor_sha256(calib_inputs),
        "measurement_version": MEASUREMENT_VERSION,
        "torch": torch.__version__,
    }
    return _digest(fields)


def reference_key(model_sha256: str, inputs: torch.Tensor) -> str:
    """The key of the float model's outputs on `inputs` (every candidate's SQNR and KL are against them)."""
    return _digest({"model_sha256": model_sha256, "inputs_sha256": tensor_sha256(inputs), "torch": torch.__version__})


def save_calibration(stats: dict[str, ActStats], path: Path) -> None:
    """A simulator's activation statistics (`Simulator.stats`) as a safetensors file: what the ranges and the
    bias correction read (the kept sample, min and max, channel sums); no pickle."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for i, (name, st) in enumerate(stats.items()):
        tensors[f"{i}.sample"] = st.sample().contiguous()
        if st.channel_sum is not None:
            tensors[f"{i}.channel_sum"] = st.channel_sum.contiguous()
        meta[name] = {
            "index": i,
            "lo": st.lo,
            "hi": st.hi,
            "seen": st.seen,
            "channel_dim": st.channel_dim,
            "channel_count": st.channel_count,
        }
    save_file(tensors, str(path), metadata={"stats": json.dumps(meta)})


def load_calibration(path: Path) -> dict[str, ActStats]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["stats"])
        stats = {}
        for name, m in meta.items():
            i = m["index"]
            channel_sum = f.get_tensor(f"{i}.channel_sum") if f"{i}.channel_sum" in f.keys() else None
            stats[name] = ActStats(
                lo=m["lo"],
                hi=m["hi"],
                samples=[f.get_tensor(f"{i}.sample")],
                seen=m["seen"],
                channel_dim=m["channel_dim"],
                channel_sum=channel_sum,
                channel_count=m["channel_count"],
            )
    return stats


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _StoredPass:
    """What both kinds of pass share: the key (the sha256 of all their fields) and their JSON form."""

    @property
    def key(self) -> str:
        return _digest(self.to_json())

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DamagePass(_StoredPass):
    """One measurement pass as data: everything that decides its sums, and how it is split into chunks."""

    identity: dict  # model sha256, calibration sha256, scheme, clip, act_calibration, code and torch versions
    samples: int  # the first `samples` calibration images are measured
    w_widths: list[int]
    a_widths: list[int]
    base_w: dict[str, int | None]  # the other layers' widths while one is changed (None: float)
    base_a: dict[str, int | None]
    chunks: list[list[str]]  # layer names, per chunk
    kind: str = "damage"

    @property
    def around_float(self) -> bool:
        return all(b is None for b in self.base_w.values())


@dataclass(frozen=True)
class ScorePass(_StoredPass):
    """A batch of configs to score (HAQ's episodes, search/searches/haq.py), as data. A chunk's result is the
    scores of its configs; `identity` holds what a score depends on besides the config (the model, the
    calibration, the reward images, the fine-tuning options)."""

    identity: dict
    configs: list[list[list[int]]]  # per config: [weight bits, activation bits] in layer order
    chunks: list[list[int]]  # config indexes, per chunk
    kind: str = "score"

    around_float = False


def pass_from_json(raw: dict) -> DamagePass | ScorePass:
    """A stored pass (MeasurementRecord.spec in the service) back as data."""
    kinds = {"damage": DamagePass, "score": ScorePass}
    return kinds[raw.get("kind", "damage")](**raw)


def chunk_layers(names: list[str], work: dict[str, float], count: int) -> list[list[str]]:
    """Consecutive layers in min(count, layers) chunks of about equal work (`work`: per layer)."""
    count = max(1, min(count, len(names)))
    chunks: list[list[str]] = []
    left = sum(work[n] for n in names)
    current, acc = [], 0.0
    for i, n in enumerate(names):
        current.append(n)
        acc += work[n]
        chunks_left = count - len(chunks)
        layers_left = len(names) - i - 1
        # close the chunk at its share of the work left, or when each chunk left needs one of the layers left
        if chunks_left > 1 and (acc >= left / chunks_left or layers_left == chunks_left - 1):
            chunks.append(current)
            left -= acc
            current, acc = [], 0.0
    chunks.append(current)
    return chunks


class DamageMeter:
    """Computes chunks of passes on one simulator. Between chunks of one pass that fits one image chunk,
    the float and base runs are kept, so one process computing every chunk runs them once."""

    def __init__(self, sim: Simulator, calib_inputs: torch.Tensor, names: list[str]):
        self.sim = sim
        self.inputs = calib_inputs
        self.names = names
        self.runner = SuffixRunner(sim, None, names)
        self.affected = {n: self.runner.affected_layers(n) for n in names}
        self._kept: tuple | None = None  # (pass identity, image chunk start, refs, ref_sq, base_err)

    def images_per_chunk(self, samples: int) -> int:
        per_sample = 4 * (self.runner.kept_elements() + sum(l.out_features for l in self.sim.model.layers))
        return max(1, min(samples, MEASURE_BYTES // max(per_sample, 1)))

    def release(self) -> None:
        self._kept = None
        self.sim.set_float()

    @torch.no_grad()
    def measure(self, p: DamagePass, index: int) -> dict:
        """Chunk `index` of pass `p`: per (layer, kind, width) the change in summed layer-output noise it
        causes and the noise at the network output, and the base config's summed noise."""
        sim, runner = self.sim, self.runner
        o = p.identity
        scheme, clip, calibration = o["scheme"], o["clip"], o["act_calibration"]

        def set_layer(name, w, a):
            sim.set_layer(name, w, a, scheme, clip, calibration)

        def add(sums: dict, key, value: torch.Tensor) -> None:
            sums[key] = value if key not in sums else sums[key] + value

        for n in self.names:
            set_layer(n, p.base_w[n], p.base_a[n])
        x = self.inputs[: p.samples]
        step = self.images_per_chunk(p.samples)
        starts = range(0, len(x), step)
        identity = (json.dumps({**p.to_json(), "chunks": None}, sort_keys=True), step)
        ref_sq: dict = {}
        base_err: dict = {}
        err: dict[tuple, dict] = {}
        for start in starts:
            kept = self._kept
            if kept is not None and kept[0] == identity and kept[1] == start:
                refs = kept[2]
                for m, v in kept[3].items():
                    add(ref_sq, m, v)
                for m, v in kept[4].items():
                    add(base_err, m, v)
            else:
                self._kept = None
                runner.x = fast_layout(x[start : start + step])
                for n in self.names:
                    set_layer(n, None, None)
                refs = {}
                refs[OUTPUT] = runner.run(refs.__setitem__)
                chunk_ref_sq = {m: (v**2).sum() for m, v in refs.items()}
                for n in self.names:
                    set_layer(n, p.base_w[n], p.base_a[n])
                chunk_base: dict = {}
                out = runner.run(lambda m, v: add(chunk_base, m, ((v - refs[m]) ** 2).sum()))
                add(chunk_base, OUTPUT, ((out - refs[OUTPUT]) ** 2).sum())
                for m, v in chunk_ref_sq.items():
                    add(ref_sq, m, v)
                for m, v in chunk_base.items():
                    add(base_err, m, v)
                if len(starts) == 1:  # keep it for the next chunk of this pass
                    self._kept = (identity, start, refs, chunk_ref_sq, chunk_base)
            for n in p.chunks[index]:
                changes = [("w", b, b, p.base_a[n]) for b in p.w_widths] + [
                    ("a", b, p.base_w[n], b) for b in p.a_widths
                ]
                for kind, b, w, a in changes:
                    set_layer(n, w, a)
                    sums = err.setdefault((n, kind, b), {})
                    out = runner.run_suffix(n, lambda m, v, sums=sums: add(sums, m, ((v - refs[m]) ** 2).sum()))
                    add(sums, OUTPUT, ((out - refs[OUTPUT]) ** 2).sum())
                set_layer(n, p.base_w[n], p.base_a[n])

        def nmse(sums: dict, m) -> float:
            return float(sums[m] / ref_sq[m].clamp_min(1e-30))

        base_nmse = {n: nmse(base_err, n) for n in self.names}
        entries = {}
        for (n, kind, b), sums in err.items():
            changed = sum(nmse(sums, m) - base_nmse[m] for m in self.affected[n])
            entries[f"{n}|{kind}|{b}"] = [changed, nmse(sums, OUTPUT)]
        return {"base_total": sum(base_nmse.values()), "entries": entries}


class PassRunner(Protocol):
    """What computes a pass's chunks: DamageMeter for damage passes, haq.EpisodeScorer for score passes."""

    def measure(self, p, index: int) -> dict: ...

    def release(self) -> None: ...


@dataclass
class PassRecord:
    """How one pass of a search was obtained: chunks computed here or elsewhere, and reused ones."""

    key: str
    around_float: bool
    chunks: int
    kind: str = "damage"
    computed: int = 0  # by this search's process
    elsewhere: int = 0  # by other workers while this search waited
    reused: int = 0  # found finished: an earlier job's, or a dead attempt's
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measurements:
    """Where a search's passes are computed and kept. This one computes them here, chunk by chunk, and keeps
    them for its own life (a budget sweep in one process measures once); the worker's subclass keeps them in
    the database and spreads the chunks over workers (worker/measurements.py)."""

    records: list[PassRecord] = field(default_factory=list)
    _done: dict[str, list[dict]] = field(default_factory=dict, repr=False)
    _references: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def reference(self, key: str) -> torch.Tensor | None:
        """A stored float reference output (the float model on a job's validation images), or None."""
        return self._references.get(key)

    def keep_reference(self, key: str, logits: torch.Tensor) -> None:
        self._references[key] = logits

    def new_record(self, p: DamagePass | ScorePass) -> PassRecord:
        """The record of how this search obtains pass `p`, kept in `records` (the job's timings list them)."""
        record = PassRecord(p.key, p.around_float, len(p.chunks), kind=p.kind)
        self.records.append(record)
        return record

    def run(
        self, p: DamagePass | ScorePass, meter: PassRunner, on_chunk: Callable[[int, int], None] | None = None
    ) -> list[dict]:
        """The results of every chunk of `p`, in order, computed by `meter` (a DamageMeter for a DamagePass)."""
        started = time.perf_counter()
        record = self.new_record(p)
        if p.key in self._done:
            record.reused = len(p.chunks)
            return self._done[p.key]
        try:
            results = []
            for i in range(len(p.chunks)):
                results.append(meter.measure(p, i))
                record.computed += 1
                if on_chunk is not None:
                    on_chunk(i + 1, len(p.chunks))
        finally:
            meter.release()
        self._done[p.key] = results
        record.seconds = time.perf_counter() - started
        return results
