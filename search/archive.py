"""Read a torch.export `.pt2` archive as data, never as code.

`torch.export.load` unpickles with `weights_only=False` in three places (pickled weights or constants, the
legacy `.pt` weight files, and the sample inputs when a weights-only load fails), runs `pickle.loads` on
opaque constants, pastes names from the archive into Python source that torch.fx `exec`s, and hands size
expressions to `sympy.sympify`. Any of these runs code an attacker put in the file. This module:

- checks the zip structure first (size limits, entry names, declared sizes, no compression);
- checks every string of the program and of the tensor configs against a strict grammar
  (search/archive_grammar.py) and drops free text torch does not need (stack traces, guard code);
- refuses every payload that would need unpickling and reads raw tensor payloads itself, checking each
  declared shape and stride against its payload before anything is allocated;
- never reads the sample inputs (bitsearch does not need them; they are a pickle);
- hands the checked pieces to torch's JSON graph deserializer, one archive at a time (torch keeps the
  deserializer in a process-global), and checks the rebuilt program's names again.
"""

from __future__ import annotations

import io
import json
import math
import threading
import zipfile
from pathlib import Path

import torch

from .archive_grammar import GrammarError, check_payload_config, check_program_json, check_program_names

DEFAULT_MAX_ARCHIVE_BYTES = 256 * 1024 * 1024
# Raw payloads are stored uncompressed by torch.export.save; a large ratio means a crafted archive.
MAX_EXPANSION = 4
MAX_ENTRIES = 20_000
MAX_DIM = 1 << 40  # any one declared dimension; a real one is far smaller
MAX_DECLARED_ELEMENTS = 1 << 40  # a declared activation shape, before the model is run
# Tensors may share a payload (tied weights); materialised together they may not exceed this many times the
# archive's size, so a few bytes of payload cannot be declared as many large views.
MAX_TENSOR_EXPANSION = 4
_DTYPES = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
}
# torch's graph deserializer keeps the archive being read in a process-global; two threads loading at once
# would trip over each other.
_DESERIALIZE_LOCK = threading.Lock()


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
            raise ArchiveError(
                f"archive entry {info.filename!r} is compressed; torch.export archives store raw records"
            )
    inner = [n[len(root) + 1 :] for n in names]
    if "archive_format" not in inner:
        raise ArchiveError("not a torch.export .pt2 archive (no archive_format record)")
    return root, inner


def _read_json(reader, name: str) -> dict:
    try:
        return json.loads(reader.read_string(name))
    except (RuntimeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"archive record {name!r} is not valid JSON: {e}") from e


def brief(error: BaseException) -> str:
    """One line of an exception's text for a user-facing message: torch's messages can run to whole tracebacks
    with the server's paths in them."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


def _raw_tensors(reader, base_dir: str, config: dict, what: str, budget: list[int]) -> dict[str, torch.Tensor]:
    """Rebuild tensors from raw payload records, refusing anything pickled. `budget` holds the bytes the
    tensors may still take once materialised."""
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
            raise ArchiveError(f"{what} {fqn!r} has malformed tensor metadata: {brief(e)}") from e
        if dtype not in _DTYPES:
            raise ArchiveError(f"{what} {fqn!r} has dtype {dtype}; bitsearch loads real, integer and bool tensors")
        if (
            len(sizes) != len(strides)
            or len(sizes) > 16
            or any(not 0 <= s <= MAX_DIM for s in sizes)
            or any(not 0 <= st <= MAX_DIM for st in strides)
            or not 0 <= offset <= MAX_DIM
        ):
            raise ArchiveError(
                f"{what} {fqn!r} declares an impossible layout: sizes {sizes[:16]}, "
                f"strides {strides[:16]}, offset {offset}"
            )
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
        numel = math.prod(sizes)
        needed = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1 if numel else 0
        # A view may not hold more elements than its payload (stride 0 would let a few bytes declare gigabytes
        # that the copy below allocates), nor reach past it.
        if needed > storage.numel() or numel > storage.numel() - offset and numel:
            raise ArchiveError(
                f"{what} {fqn!r}: shape {sizes} with strides {strides} does not fit its "
                f"{storage.numel()}-element payload"
            )
        budget[0] -= numel * storage.element_size()
        if budget[0] < 0:
            raise ArchiveError(
                f"{what} {fqn!r}: the archive's tensors take more than {MAX_TENSOR_EXPANSION}x "
                "its size once their shared payloads are expanded"
            )
        tensor = torch.as_strided(storage, sizes, strides, offset).clone() if numel else torch.zeros(sizes, dtype=dtype)
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
        try:
            check_program_json(program_dict)
            check_payload_config(weights_cfg, "weight")
            check_payload_config(constants_cfg, "constant")
        except GrammarError as e:
            raise ArchiveError(str(e)) from e
        _check_declared_sizes(program_dict)
        sample_name = f"data/sample_inputs/{model_name}.pt"
        if sample_name in names:
            _check_nested_zip(reader.read_bytes(sample_name), sample_name)
        budget = [MAX_TENSOR_EXPANSION * path.stat().st_size + (1 << 20)]
        state_dict = _raw_tensors(reader, "data/weights/", weights_cfg, "weight", budget)
        constants = _raw_tensors(reader, "data/constants/", constants_cfg, "constant", budget)
    try:
        program = _dict_to_dataclass(schema.ExportedProgram, program_dict)
    except Exception as e:
        raise ArchiveError(f"exported program JSON does not match torch.export's schema: {brief(e)}") from e
    try:
        with _DESERIALIZE_LOCK:
            # Example inputs are not needed to run the graph; an empty tuple also keeps torch's deserializer
            # away from its pickle fallback.
            ep = ExportedProgramDeserializer().deserialize(program, state_dict, constants, ())
        check_program_names(ep)
    except GrammarError as e:
        raise ArchiveError(str(e)) from e
    except Exception as e:
        raise ArchiveError(f"exported program cannot be rebuilt: {brief(e)}") from e
    return ep


def _check_nested_zip(record: bytes, name: str) -> None:
    """The sample inputs are never read, but an archive that hides compressed content in them is refused
    all the same: no record of a torch.export archive is compressed, so one that is was crafted."""
    try:
        with zipfile.ZipFile(io.BytesIO(record)) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        return  # not a zip: opaque bytes that nothing reads
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos) or sum(i.file_size for i in infos) > len(record):
        raise ArchiveError(
            f"archive record {name!r} holds compressed content; torch.export archives store raw "
            "records, refusing a possible zip bomb"
        )


def _check_declared_sizes(program: dict) -> None:
    """Every concrete size the graph declares is bounded before torch builds (fake) tensors from it."""
    graph = program.get("graph_module", {}).get("graph", {})
    values = graph.get("tensor_values") if isinstance(graph, dict) else None
    for name, meta in (values or {}).items():
        sizes = meta.get("sizes") if isinstance(meta, dict) else None
        concrete = [s.get("as_int") for s in sizes or [] if isinstance(s, dict) and "as_int" in s]
        if (
            any(not isinstance(v, int) or not 0 <= v <= MAX_DIM for v in concrete)
            or math.prod(concrete) > MAX_DECLARED_ELEMENTS
        ):
            raise ArchiveError(f"tensor {name!r} declares the shape {concrete[:16]}, beyond any model bitsearch loads")
