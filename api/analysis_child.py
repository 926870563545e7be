"""What runs inside the analysis child (api/analysis.py): loading an uploaded model or data set and describing it
as plain JSON. Preloaded into the fork server, so a child starts with torch and the loaders already imported.

Everything here handles hostile bytes, which is why it never runs in the API process: the child has an address
space and CPU time limit, and its only way out is one JSON message.
"""

from __future__ import annotations

import json
import os
import re
import resource

import torch

from search.archive import ArchiveError
from search.data import DatasetError, load_dataset_file
from search.memory import activation_profile
from search.model import load_model

# Children are forked from this module's process: an OpenMP thread pool started here would leave them waiting on
# threads they do not have. One thread keeps the pool from ever starting (an analysis is small work anyway).
torch.set_num_threads(1)

# A message may quote a torch exception, which can carry a whole traceback and the server's file paths.
_TRACEBACK = re.compile(r"\s*(Original exception )?Traceback \(most recent call last\).*", re.S)
_UNRESOLVED_OP = re.compile(r"(?:failed to resolve |Failed deserializing node Node\(target=')(torch\.ops\.[\w.]+)")
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")
MAX_MESSAGE = 500


def one_line(message: str) -> str:
    """A loader's message as one line for a stranger: no traceback, no absolute paths, bounded length."""
    op = _UNRESOLVED_OP.search(message)
    if op is not None:
        # torch's deserializer names an op it does not know inside a dump of the node; the op is what matters.
        prefix = message.split(":", 1)[0] if message.startswith("exported program") else "model"
        return f"{prefix}: uses op {op.group(1)}, which this server does not know (only aten ops are supported)"
    message = _TRACEBACK.sub("", message)
    message = " ".join(message.split())
    message = _ABS_PATH.sub("<path>", message)
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


class Unfit(ValueError):
    """A model that loads but whose output bitsearch cannot use."""


def analyse_model(path: str, opts: dict) -> dict:
    model = load_model(path, max_bytes=opts["max_bytes"], max_layers=opts["max_layers"])
    with torch.no_grad():
        out = model.forward(torch.zeros((1, *model.input_shape)))
    if out.ndim != 2:
        raise Unfit(f"the model's output has shape {list(out.shape)}; bitsearch needs [batch, classes] logits")
    layers = []
    for layer in model.layers:
        d = layer.to_dict()
        d.pop("depthwise", None)  # derived from the other fields
        layers.append(d)
    return {
        "input_shape": list(model.input_shape),
        "static_batch": model.static_batch,
        "exported_batch": model.exported_batch,
        "batch_note": model.batch_note,
        **activation_profile(model.gm).to_dict(),
        "num_outputs": int(out.shape[1]),
        "total_params": int(model.total_params),
        "unquantized_bytes": int(model.unquantized_bytes),
        "layers": layers,
    }


def analyse_dataset(path: str, opts: dict) -> dict:
    data = load_dataset_file(path, max_bytes=opts["max_bytes"])
    if len(data) < 2:
        raise DatasetError(f"it has {len(data)} sample(s); at least 2 are needed")
    return {"num_samples": len(data), "sample_shape": list(data.sample_shape), "num_classes": data.num_classes}


ANALYSERS = {"model": analyse_model, "dataset": analyse_dataset}


def _out_of_memory(e: BaseException) -> bool:
    """Whether the failure was an allocation at the address-space limit, wherever it surfaced: the loaders wrap
    what they catch in their own errors ("record ... is unreadable")."""
    seen = 0
    while e is not None and seen < 16:
        # torch reports a failed allocation as RuntimeError from its CPU allocator, Python as MemoryError.
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _warm_up() -> None:
    """Load one small model here, in the fork server: torch imports much of itself lazily on a first load (the
    exported-program deserializer, sympy, dynamo), and every child would otherwise pay for that again."""
    import tempfile
    import warnings

    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{d}/warm.pt2"
        torch.export.save(
            torch.export.export(
                net, (torch.zeros(2, 1, 4, 4),), dynamic_shapes={"input": {0: torch.export.Dim.DYNAMIC}}
            ),
            path,
        )
        analyse_model(path, {"max_bytes": 1 << 24, "max_layers": 16})


if os.environ.get("BITSEARCH_ANALYSIS_WARM_UP", "1") == "1" and __name__ != "__main__":
    try:
        _warm_up()
    except Exception:
        pass


def run(conn, kind: str, path: str, opts: dict) -> None:
    try:
        if opts["memory_bytes"] > 0:
            resource.setrlimit(resource.RLIMIT_AS, (opts["memory_bytes"], opts["memory_bytes"]))
        # A backstop for a child whose parent died before it could kill it at the time limit.
        cpu = int(opts["time_s"]) + 5
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        result = {"ok": ANALYSERS[kind](path, opts)}
    except BaseException as e:
        if _out_of_memory(e):
            result = {"error": "memory"}
        elif isinstance(e, (ArchiveError, DatasetError)):
            result = {"error": "invalid", "message": one_line(str(e))}
        elif isinstance(e, Unfit):
            result = {"error": "unfit", "message": one_line(str(e))}
        else:
            result = {"error": "internal", "message": one_line(f"{type(e).__name__}: {e}")}
    try:
        conn.send_bytes(json.dumps(result).encode())
        conn.close()
    except BaseException:
        os._exit(3)
