"""The strict grammar every string of a `.pt2` archive must match before torch parses it.

torch pastes names from the archive (parameter and buffer FQNs, node and input names, `forward_arg_names`)
into the Python source that torch.fx generates and `exec`s, and hands symbolic size expressions to
`sympy.sympify`, which evaluates them. Escaping is not enough (Python's tokenizer also breaks lines at a
carriage return), so nothing is escaped: every string is checked against the grammar of the field it sits
in, and a field this module does not know is refused. Free text torch does not need (node metadata such as
stack traces, the module's metadata, guard code) is dropped instead of checked.

`check_program_json` runs on the raw JSON before deserialization; `check_program_names` runs again on the
rebuilt ExportedProgram before any code is generated from it, so names torch derives itself are checked too.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import keyword
import re
import tokenize
import typing

__all__ = [
    "GrammarError",
    "check_program_json",
    "check_payload_config",
    "check_program_names",
    "is_identifier",
    "is_fqn",
]

MAX_NAME = 256
MAX_EXPR = 2048
MAX_SPEC = 1 << 20
MAX_SPEC_NODES = 100_000

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_FQN = re.compile(rf"{_FQN_PART}(?:\.{_FQN_PART})*\Z")
# A module call graph entry: an FQN, with "@N" for the N-th call of the same module; "" is the root.
_CALL_FQN = re.compile(rf"(?:{_FQN_PART}(?:\.{_FQN_PART})*(?:@[0-9]+)?)?\Z")
# Operators resolved by attribute lookup: torch.ops.<ns>.<op>.<overload> and the few Python operators torch
# serializes by module path. No part may start with "__" (no reaching into dunder attributes).
_TARGET = re.compile(r"(?:torch|_operator|operator|math|builtins)(?:\.(?!__)[A-Za-z_][A-Za-z0-9_]*){1,4}\Z")
_PAYLOAD_PATH = re.compile(r"(?:weight|tensor)_[0-9]{1,9}\Z")
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,64}\Z")
# String arguments reach generated code through repr(), which quotes them safely; the grammar is defence in
# depth: printable ASCII without quotes or backslashes (einsum equations, reduction and rounding modes).
_STRING_ARG = re.compile(r"[ -!#-&(-\[\]-~]{0,256}\Z")

# sympy names a serialized size expression may call, and the assumption keywords torch writes. Anything else
# (an attribute, a dunder, a builtin) is refused before sympify sees the text.
_EXPR_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ITE",
        "FloorDiv",
        "CeilDiv",
        "CleanDiv",
        "PythonMod",
        "IntTrueDiv",
        "FloatTrueDiv",
        "TruncToInt",
        "FloorToInt",
        "CeilToInt",
        "RoundToInt",
        "ToFloat",
        "Identity",
        "floor",
        "ceiling",
        "true",
        "false",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "zero",
        "commutative",
        "even",
        "odd",
    }
)
_EXPR_OPS = frozenset({"(", ")", ",", "=", "+", "-", "*", "/", "//", "%", "<", ">", "<=", ">=", "==", "!="})
# A bare symbol as torch names them (s0, u3, ps12): letters then digits, which no sympy function name is.
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}\Z")
_MAX_INT_DIGITS = 19  # int64: a size expression needs no more, and sympify of a huge power is a CPU bomb

# Serialized pytree node types a model's input and output structure may use; no custom or namedtuple types.
_SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})
# Float arguments: non-finite values are written as strings.
_FLOAT_WORDS = frozenset({"Infinity", "-Infinity", "NaN"})


class GrammarError(ValueError):
    """A string in the archive that does not match its field's grammar."""


def is_identifier(text: object) -> bool:
    return (
        isinstance(text, str)
        and len(text) <= MAX_NAME
        and _IDENT.match(text) is not None
        and not keyword.iskeyword(text)
    )


def is_fqn(text: object) -> bool:
    return isinstance(text, str) and len(text) <= MAX_NAME and _FQN.match(text) is not None


def _show(text: str) -> str:
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def _need(ok: bool, what: str, text: str, grammar: str) -> None:
    if not ok:
        raise GrammarError(
            f"{what} {_show(text)} is not {grammar}; bitsearch refuses archives whose names could reach generated code"
        )


def check_identifier(text: str, what: str) -> None:
    _need(is_identifier(text), what, text, "a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")


def check_fqn(text: str, what: str) -> None:
    _need(is_fqn(text), what, text, "a dotted name of identifiers and indices (e.g. layers.0.conv1.weight)")


def check_expr(text: str, what: str = "size expression") -> None:
    """A symbolic size as torch writes it (sympy's srepr), e.g. Mul(Integer(4), Symbol('s77', integer=True))."""
    if not isinstance(text, str) or len(text) > MAX_EXPR:
        raise GrammarError(f"{what} is longer than {MAX_EXPR} characters")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError) as e:
        raise GrammarError(f"{what} {_show(text)} is not a size expression: {e}") from e
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NAME and (tok.string in _EXPR_NAMES or _SYMBOL_NAME.match(tok.string)):
            continue
        if tok.type == tokenize.NUMBER and re.fullmatch(rf"[0-9]{{1,{_MAX_INT_DIGITS}}}", tok.string):
            continue
        if tok.type == tokenize.STRING and re.fullmatch(r"'[A-Za-z_][A-Za-z0-9_]{0,63}'", tok.string):
            continue
        if tok.type == tokenize.OP and tok.string in _EXPR_OPS:
            continue
        raise GrammarError(f"{what} {_show(text)} holds {tok.string!r}, which a size expression never contains")


def _check_spec_node(node, what: str, count: list[int], depth: int) -> None:
    if depth > 64:
        raise GrammarError(f"{what} nests deeper than 64 levels")
    count[0] += 1
    if count[0] > MAX_SPEC_NODES:
        raise GrammarError(f"{what} has more than {MAX_SPEC_NODES} nodes")
    if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
        raise GrammarError(f"{what} is not a serialized pytree")
    kind, context, children = node["type"], node["context"], node["children_spec"]
    if kind not in _SPEC_TYPES:
        raise GrammarError(f"{what} uses the container type {kind!r}; plain tensors, tuples, lists and dicts only")
    if kind in ("builtins.dict", "collections.OrderedDict"):
        try:
            keys = json.loads(context)
        except (TypeError, json.JSONDecodeError) as e:
            raise GrammarError(f"{what} has a malformed dict context") from e
        if not isinstance(keys, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) or is_identifier(k) for k in keys
        ):
            raise GrammarError(f"{what}: dict keys must be identifiers or integers")
    elif context not in (None, "null"):
        raise GrammarError(f"{what} carries a context its container type does not use")
    if not isinstance(children, list):
        raise GrammarError(f"{what} is not a serialized pytree")
    for child in children:
        _check_spec_node(child, what, count, depth + 1)


def check_spec(text: str, what: str) -> None:
    if not isinstance(text, str) or len(text) > MAX_SPEC:
        raise GrammarError(f"{what} is missing or longer than {MAX_SPEC} characters")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"{what} is not valid JSON") from e
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], int)):
        raise GrammarError(f"{what} is not a serialized pytree")
    _check_spec_node(spec[1], what, [0], 0)


@functools.cache
def _schema_field_names() -> frozenset[str]:
    from torch._export.serde import schema

    names = set()
    for obj in vars(schema).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            names.update(f.name for f in dataclasses.fields(obj))
    return frozenset(names)


# Dicts keyed by data (names), not by schema field names: how each key is checked.
_KEYED = {
    "tensor_values": check_identifier,
    "sym_int_values": check_identifier,
    "sym_bool_values": check_identifier,
    "sym_float_values": check_identifier,
    "opset_version": check_identifier,
    "range_constraints": lambda t, w: _need(_SYMBOL_NAME.match(t) is not None, w, t, "a symbol name (e.g. s0)"),
    "as_string_to_argument": check_identifier,
}
# Fields whose strings are checked, by field name; a string under any other field is refused.
_FIELDS: dict[str, typing.Callable[[str, str], None]] = {
    "name": check_identifier,
    "as_name": check_identifier,
    "user_input_name": check_identifier,
    "forward_arg_names": check_identifier,
    "verifiers": check_identifier,
    "type": check_identifier,
    "parameter_name": check_fqn,
    "buffer_name": check_fqn,
    "tensor_constant_name": check_fqn,
    "fqn": lambda t, w: _need(
        isinstance(t, str) and len(t) <= MAX_NAME and _CALL_FQN.match(t) is not None,
        w,
        t,
        "a module path (e.g. layers.0 or layers.0@1)",
    ),
    "target": lambda t, w: _need(_TARGET.match(t) is not None, w, t, "an operator path (torch.ops.ns.op.overload)"),
    "as_operator": lambda t, w: _need(_TARGET.match(t) is not None, w, t, "an operator path"),
    "expr_str": check_expr,
    "in_spec": check_spec,
    "out_spec": check_spec,
    "as_string": lambda t, w: _need(_STRING_ARG.match(t) is not None, w, t, "a short printable string"),
    "as_strings": lambda t, w: _need(_STRING_ARG.match(t) is not None, w, t, "a short printable string"),
    "as_float": lambda t, w: _need(t in _FLOAT_WORDS, w, t, "a number"),
    "as_floats": lambda t, w: _need(t in _FLOAT_WORDS, w, t, "a number"),
    "torch_version": lambda t, w: _need(_VERSION.match(t) is not None, w, t, "a version string"),
}
# Refused outright: torch would instantiate a class named by the archive.
_REFUSED = {
    "custom_obj_values": "custom (TorchBind) objects",
    "custom_obj": "custom (TorchBind) objects",
    "as_custom_obj": "custom (TorchBind) objects",
    "treespec_namedtuple_fields": "namedtuple outputs",
}


def _walk(obj, field: str | None, known: frozenset[str], where: str) -> None:
    if isinstance(obj, dict):
        if field in _REFUSED and obj:
            raise GrammarError(f"the archive uses {_REFUSED[field]}, which bitsearch does not load")
        keyed = _KEYED.get(field)
        for key, value in obj.items():
            if keyed is not None:
                keyed(key, f"{field} key")
                _walk(value, None, known, f"{where}/{key}")
            else:
                if key not in known:
                    raise GrammarError(f"unknown field {_show(key)} at {where or '/'}")
                _walk(value, key, known, f"{where}/{key}")
    elif isinstance(obj, list):
        for item in obj:
            _walk(item, field, known, where)
    elif isinstance(obj, str):
        check = _FIELDS.get(field or "")
        if check is None:
            raise GrammarError(f"unexpected text in field {field!r} at {where or '/'}")
        check(obj, f"{field} at {where}" if field not in ("name",) else f"name at {where}")
    elif obj is not None and not isinstance(obj, (bool, int, float)):
        raise GrammarError(f"unexpected value at {where}")


def check_program_json(program: dict) -> dict:
    """Check every string of a serialized ExportedProgram; returns it with the free-text fields torch does not
    need (node metadata, module metadata, guard code) emptied. Raises GrammarError naming the first bad string."""
    if not isinstance(program, dict):
        raise GrammarError("the exported program record is not a JSON object")
    gm = program.get("graph_module")
    if isinstance(gm, dict):
        gm["metadata"] = {}
        _drop_node_metadata(gm.get("graph"))
    program["guards_code"] = []
    _walk(program, None, _schema_field_names(), "")
    return program


def _drop_node_metadata(graph) -> None:
    if not isinstance(graph, dict):
        return
    for node in graph.get("nodes") or []:
        if isinstance(node, dict):
            node["metadata"] = {}
            for inp in node.get("inputs") or []:  # subgraphs of higher-order ops carry nodes of their own
                arg = inp.get("arg") if isinstance(inp, dict) else None
                if isinstance(arg, dict) and isinstance(arg.get("as_graph"), dict):
                    _drop_node_metadata(arg["as_graph"].get("graph"))


def check_payload_config(config: dict, what: str) -> None:
    """A weights or constants config: FQN keys, raw payload record names."""
    if not isinstance(config, dict) or not isinstance(config.get("config", {}), dict):
        raise GrammarError(f"{what} config is not a JSON object of tensors")
    for fqn, meta in config.get("config", {}).items():
        check_fqn(fqn, f"{what} name")
        if not isinstance(meta, dict):
            raise GrammarError(f"{what} {fqn!r} has malformed metadata")
        path = meta.get("path_name")
        if not isinstance(path, str) or not _PAYLOAD_PATH.match(path):
            raise GrammarError(f"{what} {fqn!r} points at the record {_show(str(path))}, not a raw tensor record")


def check_program_names(ep) -> None:
    """The rebuilt program's own names, as torch.fx will paste them: graph nodes and attribute targets, the
    signature, the state dict and constants, the module call graph."""
    sig = ep.graph_signature
    for node in ep.graph.nodes:
        check_identifier(node.name, "graph node name")
        if node.op == "get_attr":
            check_fqn(str(node.target), "attribute")
    for spec in [*sig.input_specs, *sig.output_specs]:
        if getattr(spec.arg, "name", None) is not None:
            check_identifier(spec.arg.name, "signature name")
        if spec.target is not None:
            check_fqn(spec.target, "signature target")
    for name in [*ep.state_dict, *ep.constants]:
        check_fqn(name, "tensor name")
    for entry in ep.module_call_graph:
        _need(_CALL_FQN.match(entry.fqn or "") is not None, "module path", entry.fqn, "a module path")
        if entry.signature is not None:
            for arg_name in entry.signature.forward_arg_names or []:
                check_identifier(arg_name, "forward argument name")
