"""Read a torch.export `.pt2` archive as data, never as code.

`torch.export.load` unpickles with `weights_only=False` in three places (pickled
weights or constants, the legacy `.pt` weight files, and the sample inputs when a
weights-only load fails) and runs `pickle.loads` on opaque constants. Any of these
runs code an attacker put in the file. This module checks the zip structure first
(size limits, entry names, declared sizes), refuses every payload that would need
unpickling, reads raw tensor payloads itself, loads sample inputs with
`weights_only=True` only, drops the archive's guard code (Python source that
`ExportedProgram.module()` would exec), and hands the pieces to torch's JSON graph
deserializer.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

DEFAULT_MAX_ARCHIVE_BYTES = 256 * 1024 * 1024
# Raw payloads are stored uncompressed by torch.export.save; a large ratio means a crafted archive.
MAX_EXPANSION = 4
MAX_ENTRIES = 20_000


class ArchiveError(ValueError):
    """An uploaded archive that bitsearch will not load; the message says why."""


def _check_zip(path: Path, max_bytes: int) -> tuple[str, list[str]]:
    size = path.stat().st_size
    if size > max_bytes:
        raise ArchiveError(f"archive is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"not a torch.export .pt2 archive (not a readable zip file: {e})") from e
    if not infos:
        raise ArchiveError("not a torch.export .pt2 archive (empty zip file)")
    if len(infos) > MAX_ENTRIES:
        raise ArchiveError(f"archive holds {len(infos)} entries, over the limit of {MAX_ENTRIES}")
    declared = sum(i.file_size for i in infos)
    if declared > max(max_bytes, MAX_EXPANSION * size):
        raise ArchiveError(
            f"archive declares {declared} bytes of content in a {size}-byte file; refusing a possible zip bomb"
        )
    names = [i.filename for i in infos]
    for name in names:
        parts = name.split("/")
        if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or ":" in parts[0]:
            raise ArchiveError(f"archive entry name {name!r} is not a plain relative path")
    root = names[0].split("/", 1)[0]
    if any(not n.startswith(root + "/") for n in names):
        raise ArchiveError("not a torch.export .pt2 archive (entries do not share one top-level folder)")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ArchiveError(f"archive entry {info.filename!r} is compressed; torch.export archives store raw records")
    inner = [n[len(root) + 1 :] for n in names]
    if "archive_format" not in inner:
        raise ArchiveError("not a torch.export .pt2 archive (no archive_format record)")
    return root, inner


def _read_json(reader, name: str) -> dict:
    try:
        return json.loads(reader.read_string(name))
    except (RuntimeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"archive record {name!r} is not valid JSON: {e}") from e


def _raw_tensors(reader, base_dir: str, config: dict, what: str) -> dict[str, torch.Tensor]:
    """Rebuild tensors from raw payload records, refusing anything pickled."""
    from torch._export.serde.serialize import deserialize_scalar_type

    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.get("config", {}).items():
        path_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not path_name.startswith(("weight_", "tensor_")):
            raise ArchiveError(
                f"{what} {fqn!r} is stored as a pickled object ({path_name!r}); bitsearch loads raw tensors only"
            )
        tm = meta.get("tensor_meta")
        if not tm:
            raise ArchiveError(f"{what} {fqn!r} has no tensor metadata")
        try:
            dtype = deserialize_scalar_type(tm["dtype"])
            sizes = [int(s["as_int"]) for s in tm["sizes"]]
            strides = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArchiveError(f"{what} {fqn!r} has malformed tensor metadata: {e}") from e
        if path_name not in flat:
            record = f"{base_dir}{path_name}"
            try:
                raw = reader.read_bytes(record)
            except RuntimeError as e:
                raise ArchiveError(f"{what} {fqn!r}: record {record!r} is missing or unreadable") from e
            item = torch.empty((), dtype=dtype).element_size()
            if len(raw) % item:
                raise ArchiveError(f"{what} {fqn!r}: {len(raw)} bytes is not a whole number of {dtype} elements")
            flat[path_name] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        storage = flat[path_name]
        needed = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1 if all(sizes) else 0
        if any(s < 0 for s in sizes) or any(st < 0 for st in strides) or needed > storage.numel():
            raise ArchiveError(f"{what} {fqn!r}: shape {sizes} does not fit its {storage.numel()}-element payload")
        tensor = torch.as_strided(storage, sizes, strides, offset).clone() if all(sizes) else torch.zeros(sizes, dtype=dtype)
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=False) if meta.get("is_param") else tensor
    return out


def read_exported_program(path: str | Path, max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES):
    """Return the ExportedProgram stored in `path`, or raise ArchiveError. No code in the file runs."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive._package import PT2ArchiveReader

    path = Path(path)
    _, names = _check_zip(path, max_bytes)
    models = [n for n in names if n.startswith("models/") and n.endswith(".json")]
    if len(models) != 1:
        raise ArchiveError(f"archive must hold exactly one exported program, found {len(models)}")
    model_name = models[0][len("models/") : -len(".json")]
    for legacy in (f"data/weights/{model_name}.pt", f"data/constants/{model_name}.pt"):
        if legacy in names:
            raise ArchiveError(f"archive uses the legacy pickled record {legacy!r}; re-export with torch.export.save")
    try:
        reader = PT2ArchiveReader(str(path))
    except RuntimeError as e:
        raise ArchiveError(f"not a torch.export .pt2 archive: {e}") from e
    with reader:
        program_dict = _read_json(reader, models[0])
        weights_cfg = _read_json(reader, f"data/weights/{model_name}_weights_config.json")
        constants_cfg = (
            _read_json(reader, f"data/constants/{model_name}_constants_config.json")
            if f"data/constants/{model_name}_constants_config.json" in names
            else {}
        )
        state_dict = _raw_tensors(reader, "data/weights/", weights_cfg, "weight")
        constants = _raw_tensors(reader, "data/constants/", constants_cfg, "constant")
        sample_inputs = None
        sample_name = f"data/sample_inputs/{model_name}.pt"
        if sample_name in names:
            try:
                sample_inputs = torch.load(io.BytesIO(reader.read_bytes(sample_name)), weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means the record needs more than tensors
                raise ArchiveError(
                    f"sample inputs record {sample_name!r} cannot be read with weights_only=True ({type(e).__name__}); "
                    "it may contain code"
                ) from e
    try:
        program = _dict_to_dataclass(schema.ExportedProgram, program_dict)
    except Exception as e:  # noqa: BLE001 - schema violations surface as many exception types
        raise ArchiveError(f"exported program JSON does not match torch.export's schema: {e}") from e
    # Guard strings are Python source that ExportedProgram.module() passes to exec(); an archive
    # could carry anything there. Drop them; loading checks input shapes itself.
    program.guards_code = []
    try:
        # A tuple is passed through untouched by torch's deserializer; bytes would reach its unsafe fallback.
        return ExportedProgramDeserializer().deserialize(
            program, state_dict, constants, sample_inputs if sample_inputs is not None else ()
        )
    except ArchiveError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ArchiveError(f"exported program cannot be rebuilt: {type(e).__name__}: {e}") from e
