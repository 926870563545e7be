"""Crafted archives for the loader tests: each one is a real attack or a real corruption."""

from __future__ import annotations

import io
import json
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
