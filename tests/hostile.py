"""Crafted archives for the loader tests: each one is a real attack or a real corruption."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter


class RunsCode:
    """Unpickling this object runs `code` (what a hostile upload would do)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def rewrite_archive(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 record by record; edit(records) may change any record (name -> bytes)."""
    with PT2ArchiveReader(str(src)) as reader:
        records = {n: reader.read_bytes(n) for n in reader.get_file_names() if not n.startswith(".data/")}
    edit(records)
    with PT2ArchiveWriter(str(dst)) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)
    return dst


def torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def with_pickled_weight(src: Path, dst: Path, marker: Path) -> Path:
    def edit(records):
        cfg_name = next(n for n in records if n.endswith("_weights_config.json"))
        cfg = json.loads(records[cfg_name])
        fqn, meta = next(iter(cfg["config"].items()))
        meta["use_pickle"] = True
        records[f"data/weights/{meta['path_name']}"] = torch_saved(RunsCode(marker_code(marker)))
        records[cfg_name] = json.dumps(cfg).encode()

    return rewrite_archive(src, dst, edit)


def with_pickled_sample_inputs(src: Path, dst: Path, marker: Path) -> Path:
    def edit(records):
        name = next(n for n in records if n.startswith("data/sample_inputs/"))
        records[name] = torch_saved(((RunsCode(marker_code(marker)),), {}))

    return rewrite_archive(src, dst, edit)


def with_guard_code(src: Path, dst: Path, marker: Path) -> Path:
    def edit(records):
        name = next(n for n in records if n.startswith("models/") and n.endswith(".json"))
        program = json.loads(records[name])
        # Single quotes only: torch pastes the guard into a double-quoted message as well.
        program["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch() is None"]
        records[name] = json.dumps(program).encode()

    return rewrite_archive(src, dst, edit)


def code_in_a_name(marker: Path) -> str:
    """A name that, pasted unescaped into generated source, closes its string and runs code that writes
    `marker`. No dots (a dot would split an FQN), no newline; the code travels as byte values."""
    code = ",".join(str(b) for b in marker_code(marker).encode())
    return f'n",exec(bytes([{code}])),"'


def code_in_an_expression(marker: Path) -> str:
    """A size expression that sympify would evaluate into running code."""
    return f"__import__('pathlib').Path('{marker}').touch() or Symbol('s0', integer=True)"


def _replace_strings(obj, old: str, new: str):
    """Every string value and dict key equal to `old` becomes `new` (a rename as the exporter would write it)."""
    if isinstance(obj, dict):
        return {(new if k == old else k): _replace_strings(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_strings(v, old, new) for v in obj]
    return new if obj == old else obj


def with_renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """Rename `old` to `new` wherever the archive's program and tensor configs use it."""

    def edit(records):
        for name in list(records):
            if name.endswith(".json") and (name.startswith("models/") or "_config.json" in name):
                records[name] = json.dumps(_replace_strings(json.loads(records[name]), old, new)).encode()

    return rewrite_archive(src, dst, edit)


def with_program_edit(src: Path, dst: Path, edit_program) -> Path:
    """Apply edit_program(program_dict) to the archive's exported program JSON."""

    def edit(records):
        name = next(n for n in records if n.startswith("models/") and n.endswith(".json"))
        program = json.loads(records[name])
        edit_program(program)
        records[name] = json.dumps(program).encode()

    return rewrite_archive(src, dst, edit)


def with_input_shape(src: Path, dst: Path, per_sample: list[int]) -> Path:
    """Declare another per-sample input shape (the batch dimension is kept)."""

    def edit(program):
        graph = program["graph_module"]["graph"]
        spec = next(s for s in program["graph_module"]["signature"]["input_specs"] if "user_input" in s)
        sizes = graph["tensor_values"][spec["user_input"]["arg"]["as_tensor"]["name"]]["sizes"]
        sizes[1:] = [{"as_int": d} for d in per_sample]

    return with_program_edit(src, dst, edit)


def with_weight_layout(src: Path, dst: Path, fqn: str, sizes: list[int], strides: list[int]) -> Path:
    """Declare another shape and stride for one weight, keeping its payload."""

    def edit(records):
        cfg_name = next(n for n in records if n.endswith("_weights_config.json"))
        cfg = json.loads(records[cfg_name])
        meta = cfg["config"][fqn]["tensor_meta"]
        meta["sizes"] = [{"as_int": s} for s in sizes]
        meta["strides"] = [{"as_int": s} for s in strides]
        records[cfg_name] = json.dumps(cfg).encode()

    return rewrite_archive(src, dst, edit)


def with_payload_aliases(src: Path, dst: Path, copies: int) -> Path:
    """Many extra tensors that all view the largest weight's payload (each would be materialised)."""

    def edit(records):
        cfg_name = next(n for n in records if n.endswith("_weights_config.json"))
        cfg = json.loads(records[cfg_name])
        fqn, meta = max(cfg["config"].items(), key=lambda kv: len(records[f"data/weights/{kv[1]['path_name']}"]))
        for i in range(copies):
            cfg["config"][f"alias{i}"] = meta
        records[cfg_name] = json.dumps(cfg).encode()

    return rewrite_archive(src, dst, edit)


def with_compressed_sample_inputs(src: Path, dst: Path, size: int = 256 << 20) -> Path:
    """Sample inputs that are a deflated zip expanding to `size` bytes (a bomb one level down)."""

    def edit(records):
        name = next(n for n in records if n.startswith("data/sample_inputs/"))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("sample/data/0", b"\0" * size)
        records[name] = buf.getvalue()

    return rewrite_archive(src, dst, edit)


def with_int_list_argument(src: Path, dst: Path, op: str, values: list[int]) -> Path:
    """Change the int-list argument of the first node calling `op` (e.g. repeat's repeats): the declared
    output shapes stay as they were, so only running the graph shows the real size."""

    def edit(program):
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == op)
        arg = next(i["arg"] for i in node["inputs"] if "as_ints" in i["arg"])
        arg["as_ints"] = values

    return with_program_edit(src, dst, edit)
