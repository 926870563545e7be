"""Hostile names and memory bombs in .pt2 archives: every name torch would paste into generated code is
checked against a strict grammar, every declared size against its payload and the limits, before anything
runs or is allocated. Each crafted archive is a real attack: where torch's own loader runs it, the test
shows that first."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import export_model
from hostile import (
    code_in_a_name,
    code_in_an_expression,
    with_compressed_sample_inputs,
    with_input_shape,
    with_int_list_argument,
    with_payload_aliases,
    with_program_edit,
    with_renamed,
    with_weight_layout,
)
from torch import nn

from search.archive import ArchiveError
from search.model import load_model

BITSEARCH = Path(sys.executable).parent / "bitsearch"


class Named(nn.Module):
    """A parameter, a BatchNorm, a registered buffer, a tensor constant, an int-list op and a second output:
    one of each kind of name an archive holds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 26 * 26, 10)
        self.register_buffer("scale", torch.ones(1))
        self.c = torch.ones(4, 1, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) * self.c
        y = torch.div(y.repeat(1, 1, 1, 1), 2.0, rounding_mode="floor")
        return self.fc(y.flatten(1)) * self.scale


@pytest.fixture(scope="module")
def named_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_model(Named(), tmp_path_factory.mktemp("named") / "named.pt2")


def _program(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(next(n for n in zf.namelist() if "/models/" in n and n.endswith(".json"))))


def _torch_runs_it(path: Path, marker: Path) -> bool:
    """Whether torch's own loader runs the archive's code (load, build the module, run it once)."""
    try:
        torch.export.load(str(path)).module()(torch.randn(2, 1, 28, 28))
    except Exception:
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


# (what, old name, whether torch 2.13's loader runs the code): names pasted into fx's generated source.
RENAMES = [
    ("parameter", "conv.weight", True),
    ("buffer", "scale", True),
    ("batch-norm buffer", "bn.running_mean", True),
    ("tensor constant", "c", True),
    ("graph node", "conv2d", False),
    ("output node", "mul_1", False),
    ("user input and forward argument", "x", False),
    ("placeholder of a parameter", "p_conv_weight", False),
    ("module path", "fc", False),
]


@pytest.mark.parametrize("what,old,torch_runs", RENAMES, ids=[r[0] for r in RENAMES])
def test_code_in_a_name_is_refused_and_never_runs(named_path, tmp_path, what, old, torch_runs):
    marker = tmp_path / "pwned"
    hostile = with_renamed(named_path, tmp_path / "hostile.pt2", old, code_in_a_name(marker))
    assert old in json.dumps(_program(named_path))  # the rename really changes something
    assert _torch_runs_it(hostile, marker) == torch_runs
    with pytest.raises(ArchiveError, match="refuses archives whose names could reach generated code"):
        load_model(hostile).forward(torch.randn(2, 1, 28, 28))
    assert not marker.exists()


def _set_first(program: dict, key: str, value) -> None:
    """Set the first `key` found in the program (depth first)."""

    def walk(o):
        if isinstance(o, dict):
            if key in o:
                o[key] = value(o[key]) if callable(value) else value
                return True
            return any(walk(v) for v in o.values())
        return isinstance(o, list) and any(walk(v) for v in o)

    assert walk(program), key


def _all_exprs(marker):
    def edit(program):
        for meta in program["graph_module"]["graph"]["tensor_values"].values():
            for size in meta.get("sizes", []):
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = code_in_an_expression(marker)

    return edit


PROGRAM_EDITS = {
    # sympify evaluates the size expressions.
    "size expression": (_all_exprs, True),
    "forward argument names": (lambda m: lambda p: _set_first(p, "forward_arg_names", [code_in_a_name(m)]), False),
    "range constraint symbol": (
        lambda m: (
            lambda p: p.update(range_constraints={code_in_a_name(m): next(iter(p["range_constraints"].values()))})
        ),
        False,
    ),
    "input structure (dict key)": (
        lambda m: (
            lambda p: _set_first(
                p,
                "in_spec",
                lambda s: s.replace('"context": "[]"', '"context": ' + json.dumps(json.dumps([code_in_a_name(m)]))),
            )
        ),
        False,
    ),
    "string argument": (lambda m: lambda p: _set_first(p, "as_string", code_in_a_name(m)), False),
    "operator path": (lambda m: lambda p: _set_first(p, "target", "torch.ops.aten.__class__.__init__"), False),
    "unknown field": (lambda m: lambda p: p["graph_module"].update(extra=code_in_a_name(m)), False),
}


@pytest.mark.parametrize("what", list(PROGRAM_EDITS))
def test_code_in_any_program_string_is_refused_and_never_runs(named_path, tmp_path, what):
    marker = tmp_path / "pwned"
    make_edit, torch_runs = PROGRAM_EDITS[what]
    hostile = with_program_edit(named_path, tmp_path / "hostile.pt2", make_edit(marker))
    assert _torch_runs_it(hostile, marker) == torch_runs
    with pytest.raises(ArchiveError):
        load_model(hostile).forward(torch.randn(2, 1, 28, 28))
    assert not marker.exists()


def test_every_reference_model_passes_the_grammar():
    # The grammar must not refuse what torch.export writes for real models.
    for name in ("resnet20-fmnist", "mobilenetv2-fmnist", "mixer-fmnist"):
        assert load_model(Path(__file__).resolve().parent.parent / "models" / f"{name}.pt2").layers


def test_cli_refuses_a_hostile_name_without_running_it(named_path, tmp_path):
    marker = tmp_path / "pwned"
    hostile = with_renamed(named_path, tmp_path / "hostile.pt2", "conv.weight", code_in_a_name(marker))
    for args in (["inspect", hostile], ["eval", hostile, "--data", "fashion-mnist", "--uniform", "4/8"]):
        proc = subprocess.run([str(BITSEARCH), *map(str, args)], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "generated code" in proc.stderr and "Traceback" not in proc.stderr, proc
    assert not marker.exists()


def test_load_packed_refuses_a_hostile_name(tiny_model, tiny_model_path, fmnist, tmp_path):
    from kernels.lower import MODEL_FILE, load_packed, lower
    from search.config import QuantConfig

    packed_dir = lower(tiny_model, QuantConfig.uniform(tiny_model, 4, 8), fmnist.calib.inputs[:64]).save(
        tmp_path / "packed"
    )
    assert load_packed(packed_dir).forward(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    marker = tmp_path / "pwned"
    program = _program(packed_dir / MODEL_FILE)
    buffer = next(
        s["buffer"]["buffer_name"] for s in program["graph_module"]["signature"]["input_specs"] if "buffer" in s
    )
    hostile = with_renamed(packed_dir / MODEL_FILE, tmp_path / "hostile.pt2", buffer, code_in_a_name(marker))
    hostile.replace(packed_dir / MODEL_FILE)
    with pytest.raises(ArchiveError, match="generated code"):
        load_packed(packed_dir).forward(torch.randn(2, 1, 28, 28))
    assert not marker.exists()


# -- memory bombs: refused from the declared figures, before anything is allocated ------------------------------


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BOMBS = {
    "input of 2^28 elements per sample": (
        lambda src, dst: with_input_shape(src, dst, [1, 16384, 16384]),
        "input is .* over the limit",
    ),
    "stride-0 weight": (
        lambda src, dst: with_weight_layout(src, dst, "fc.weight", [1 << 15, 1 << 15], [0, 0]),
        "does not fit its",
    ),
    "weight past its payload": (
        lambda src, dst: with_weight_layout(src, dst, "fc.weight", [10, 2705], [2705, 1]),
        "does not fit its",
    ),
    "one payload viewed 400 times": (lambda src, dst: with_payload_aliases(src, dst, 400), "times its size|4x"),
    "compressed sample inputs": (with_compressed_sample_inputs, "compressed content"),
    "an op that computes more than declared": (
        lambda src, dst: with_int_list_argument(src, dst, "torch.ops.aten.repeat.default", [1, 1, 4096, 4096]),
        "computes a tensor of shape .* over the limit",
    ),
    "negative size": (
        lambda src, dst: with_weight_layout(src, dst, "fc.weight", [-1, 10], [10, 1]),
        "impossible layout",
    ),
}


@pytest.mark.parametrize("what", list(BOMBS))
def test_memory_bombs_are_refused_quickly_without_allocating(named_path, tmp_path, what):
    make, message = BOMBS[what]
    hostile = make(named_path, tmp_path / "bomb.pt2")
    assert hostile.stat().st_size < 2 * named_path.stat().st_size + (1 << 20)  # a small upload
    peak = _peak_rss_mb()
    start = time.perf_counter()
    with pytest.raises(ArchiveError, match=message):
        load_model(hostile)
    assert time.perf_counter() - start < 2.0
    assert _peak_rss_mb() - peak < 100


def test_a_legitimately_shared_weight_still_loads(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x.flatten(1))))

    loaded = load_model(export_model(Tied(), tmp_path / "tied.pt2", example=(torch.randn(2, 1, 4, 4),)))
    assert len(loaded.layers) == 2


# -- the same attacks through the service ------------------------------------------------------------------------


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture(scope="module")
def api_stack(tmp_path_factory):
    from tests.stack import Stack

    # No worker: nothing here is meant to run; an accepted job would only wait in the queue.
    s = Stack(tmp_path_factory.mktemp("uploads"), backend="postgres", max_model_bytes=8 * 2**20)
    s.start(workers=0)
    yield s
    s.stop()


def _post(client, path: Path):
    return client.post(
        "/jobs",
        data={"method": "uniform", "budget": json.dumps({"avg_wbits": 4}), "data_name": "fashion-mnist"},
        files={"model": (path.name, path.read_bytes(), "application/zip")},
    )


def test_uploads_with_code_or_bombs_are_refused_quickly_and_the_api_stays_small(api_stack, named_path, tmp_path):
    marker = tmp_path / "pwned"
    attacks = {
        what: with_renamed(named_path, tmp_path / f"name{i}.pt2", old, code_in_a_name(marker))
        for i, (what, old, _) in enumerate(RENAMES)
    }
    attacks["size expression"] = with_program_edit(named_path, tmp_path / "expr.pt2", _all_exprs(marker))
    for what, (make, _) in BOMBS.items():
        attacks[what] = make(named_path, tmp_path / f"bomb_{len(attacks)}.pt2")
    pid = api_stack.api.pid
    with api_stack.client() as c:
        # A valid upload first: what the API loads for any submission (the spec code, torch) is not the attacks'.
        assert _post(c, named_path).status_code == 202
        before = _memory_kib(pid)
        for what, path in attacks.items():
            start = time.perf_counter()
            r = _post(c, path)
            elapsed = time.perf_counter() - start
            assert r.status_code == 400, (what, r.status_code, r.text)
            detail = r.json()["detail"]
            assert "Traceback" not in detail and "/work/" not in detail and str(tmp_path) not in detail, (what, detail)
            assert elapsed < 2.0, (what, elapsed)
        after = _memory_kib(pid)
        assert c.get("/health").json()["database"] == "ok"
    assert not marker.exists()
    assert after["VmHWM"] - before["VmHWM"] < 100 * 1024, (before, after)
    stored = [p.name for p in (api_stack.var_dir / "artifacts").rglob("*") if p.is_file()]
    assert stored == [hashlib.sha256(named_path.read_bytes()).hexdigest()], stored  # the valid upload only


def test_a_language_model_taking_token_ids_passes_the_size_check(tmp_path):
    # The fake-tensor size check runs the graph on an input of the export's own dtype: int64 token ids here.
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 32)
            self.att = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 256)

        def forward(self, ids):
            x = self.emb(ids)
            return self.head(x + self.att(x, x, x, need_weights=False)[0])

    path = tmp_path / "lm.pt2"
    torch.export.save(torch.export.export(TinyLM().eval(), (torch.randint(0, 256, (1, 16)),)), str(path))
    loaded = load_model(path)
    assert loaded.input_shape == (16,) and loaded.exported_batch == 1 and loaded.layers
