"""A loaded model: the exported graph with BatchNorm folded, and its quantizable layers.

Layers are the conv1d/conv2d (grouped and depthwise included) and linear nodes whose
weight is a parameter, in execution order. A layer's name is its weight's FQN without
`.weight` (`layers.0.conv1`), so it is stable across loads and readable in configs.
"""

from __future__ import annotations

import hashlib
import math
import operator
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import fx

from .archive import DEFAULT_MAX_ARCHIVE_BYTES, ArchiveError, brief, read_exported_program
from .rebatch import rebatch

DEFAULT_MAX_LAYERS = 4096
# Per sample: the model's input, and any tensor the graph computes (an ImageNet CNN's largest activation is
# about 1 M elements, a 2k-token attention map of 32 heads 128 M). Checked before anything is allocated.
DEFAULT_MAX_INPUT_ELEMENTS = 1 << 24
DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 28

aten = torch.ops.aten
CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.convolution.default: None}
LINEAR_OPS = {aten.linear.default}
BATCH_NORM_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
# aten ops whose semantics we do not lower or simulate; everything else in aten runs as float.
REJECTED_ATEN = {
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
}
ALLOWED_PYTHON_TARGETS = {operator.getitem, operator.add, operator.mul, operator.sub, operator.floordiv}


class ModelError(ArchiveError):
    """A model that loads but that bitsearch cannot quantize: the message names the node."""


@dataclass(frozen=True)
class Layer:
    name: str
    op: str  # "conv1d" | "conv2d" | "linear"
    weight_shape: tuple[int, ...]
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel: tuple[int, ...]
    has_bias: bool
    params: int
    macs: int  # per sample
    in_shape: tuple[int, ...]  # per sample (no batch dim)
    out_shape: tuple[int, ...]
    index: int

    @property
    def c_out(self) -> int:
        return self.weight_shape[0]

    @property
    def c_in(self) -> int:
        return self.weight_shape[1] * self.groups

    @property
    def is_depthwise(self) -> bool:
        return self.op != "linear" and self.groups > 1 and self.groups == self.c_in

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depthwise"] = self.is_depthwise
        return d


@dataclass
class LoadedModel:
    path: Path | None
    sha256: str
    gm: fx.GraphModule
    layers: list[Layer]
    input_shape: tuple[int, ...]  # per sample
    static_batch: int | None  # set when the graph only runs at the batch size it was exported with
    layer_nodes: dict[str, fx.Node] = field(repr=False, default_factory=dict)
    exported_batch: int | None = None  # the batch size fixed at export, rewritten away unless static_batch is set
    batch_note: str | None = None  # why a fixed-batch export could not be made to run batched

    @property
    def batch_summary(self) -> str:
        """One line for the CLI and the job page on how this model runs batches."""
        if self.exported_batch is None:
            return "exported with a dynamic batch"
        if self.static_batch is None:
            return f"exported at batch {self.exported_batch}, rewritten to run at any batch size"
        return (
            f"exported at batch {self.exported_batch} and runs {self.exported_batch} sample(s) per call "
            f"(slow: {self.batch_note}); export with a dynamic batch to run faster"
        )

    @cached_property
    def unquantized_bytes(self) -> int:
        """search.cost.unquantized_bytes of this model, once: every config's cost adds it."""
        from .cost import unquantized_bytes

        return unquantized_bytes(self)

    @property
    def total_params(self) -> int:
        """Parameters of the folded graph: quantizable weights, biases and every other float tensor it uses."""
        return sum(t.numel() for t in self.used_tensors().values())

    def used_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                t = get_attr(self.gm, node.target)
                if isinstance(t, torch.Tensor):
                    out[node.target] = t
        return out

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def weight(self, name: str) -> torch.Tensor:
        return get_attr(self.gm, self.layer_nodes[name].args[1].target)

    def bias(self, name: str) -> torch.Tensor | None:
        node = self.layer_nodes[name]
        b = node.args[2] if len(node.args) > 2 else None
        return get_attr(self.gm, b.target) if isinstance(b, fx.Node) else None

    def forward(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return run_batched(self.gm, x, self.static_batch, batch_size)


@torch.no_grad()
def run_batched(gm: fx.GraphModule, x: torch.Tensor, static_batch: int | None, batch_size: int) -> torch.Tensor:
    """Logits (the first output) for x, in batches, padded to the export's batch size when it was fixed."""
    step = static_batch or batch_size
    outs = []
    for i in range(0, x.shape[0], step):
        chunk = x[i : i + step]
        n = chunk.shape[0]
        if static_batch and n < step:
            chunk = torch.cat([chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))])
        out = gm(chunk)
        outs.append((out[0] if isinstance(out, (tuple, list)) else out)[:n])
    return torch.cat(outs)


def get_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_param(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))


def _shape(node) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise ModelError(f"node {getattr(node, 'name', node)!r} has no tensor shape metadata")
    return tuple(val.shape)


def _per_sample(shape) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in shape[1:])
    except TypeError as e:  # a symbolic non-batch dimension
        raise ModelError(f"only the batch dimension may be dynamic, got shape {shape}") from e


def _tuple(v, n: int) -> tuple[int, ...]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(x) for x in (v * n if len(v) == 1 else v))


def _conv_args(node: fx.Node) -> dict:
    """Normalise aten.conv1d/conv2d/convolution arguments."""
    schema_args = node.target._schema.arguments
    args = {
        a.name: (node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value))
        for i, a in enumerate(schema_args)
    }
    if node.target is aten.convolution.default and args["transposed"]:
        raise ModelError(f"node {node.name!r}: transposed convolution is not supported")
    w_shape = _shape(node.args[1])
    dims = len(w_shape) - 2
    if dims not in (1, 2):
        raise ModelError(f"node {node.name!r}: conv{dims}d is not supported (conv1d, conv2d and linear are)")
    padding = args["padding"]
    if isinstance(padding, str):
        raise ModelError(
            f"node {node.name!r}: string padding {padding!r} is not supported; export with numeric padding"
        )
    return {
        "dims": dims,
        "stride": _tuple(args["stride"], dims),
        "padding": _tuple(padding, dims),
        "dilation": _tuple(args["dilation"], dims),
        "groups": int(args["groups"]),
    }


def _check_supported(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            if node.op == "call_module":
                raise ModelError(f"node {node.name!r} calls a submodule; only flat aten graphs are supported")
            continue
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t.namespace != "aten":
                raise ModelError(f"node {node.name!r} uses unsupported op {t.name()} (only aten ops are supported)")
            if t._schema.name.split("::")[-1] in REJECTED_ATEN:
                raise ModelError(f"node {node.name!r} uses unsupported op {t.name()}")
        elif t not in ALLOWED_PYTHON_TARGETS:
            raise ModelError(f"node {node.name!r} uses unsupported op {getattr(t, '__name__', t)!r}")


def _fold_batch_norm(gm: fx.GraphModule) -> None:
    """W' = gamma*W/sqrt(var+eps), b' = gamma*(b-mu)/sqrt(var+eps) + beta (docs/methods.md#batchnorm-folding)."""
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in BATCH_NORM_OPS:
            continue
        conv = bn.args[0]
        if not (
            isinstance(conv, fx.Node)
            and conv.target in CONV_OPS
            and len(conv.users) == 1
            and isinstance(conv.args[1], fx.Node)
            and conv.args[1].op == "get_attr"
        ):
            continue
        if bn.target is aten.batch_norm.default:
            if bn.args[5]:  # training=True: statistics come from the batch, nothing to fold
                continue
            eps, replaced = bn.args[7], bn
        else:
            getitems = list(bn.users)
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in getitems) or len(getitems) != 1:
                continue
            eps, replaced = bn.args[6], getitems[0]
        gamma, beta, mean, var = (get_attr(gm, a.target) if isinstance(a, fx.Node) else None for a in bn.args[1:5])
        w_node = conv.args[1]
        w = get_attr(gm, w_node.target).detach()
        inv_std = torch.rsqrt(var.detach() + eps)
        factor = inv_std if gamma is None else gamma.detach() * inv_std
        b_node = conv.args[2] if len(conv.args) > 2 else None
        b = get_attr(gm, b_node.target).detach() if isinstance(b_node, fx.Node) else torch.zeros_like(mean)
        new_b = (b - mean.detach()) * factor + (0 if beta is None else beta.detach())
        set_param(gm, w_node.target, w * factor.reshape(-1, *([1] * (w.dim() - 1))))
        bias_target = b_node.target if isinstance(b_node, fx.Node) else w_node.target.rsplit(".", 1)[0] + ".bias"
        if not isinstance(b_node, fx.Node):
            i = 0
            while _has_attr(gm, bias_target):
                i += 1
                bias_target = f"{w_node.target.rsplit('.', 1)[0]}.folded_bias{i}"
        set_param(gm, bias_target, new_b)
        if not isinstance(b_node, fx.Node):
            with gm.graph.inserting_before(conv):
                b_node = gm.graph.get_attr(bias_target)
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[2] = b_node
            conv.args = tuple(args)
        b_node.meta["val"] = new_b
        replaced.replace_all_uses_with(conv)
        for n in [replaced, bn] if replaced is not bn else [bn]:
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    _drop_unused_attrs(gm)
    gm.recompile()


def _has_attr(gm, target: str) -> bool:
    try:
        get_attr(gm, target)
        return True
    except AttributeError:
        return False


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            *path, leaf = name.split(".")
            owner = get_attr(gm, ".".join(path)) if path else gm
            delattr(owner, leaf)


def _discover_layers(gm: fx.GraphModule, max_layers: int) -> tuple[list[Layer], dict[str, fx.Node]]:
    layers: list[Layer] = []
    nodes: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_OPS and node.target not in LINEAR_OPS:
            continue
        w_node = node.args[1]
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            raise ModelError(
                f"node {node.name!r}: the weight is computed at run time, not a parameter; cannot quantize it"
            )
        w_shape = tuple(get_attr(gm, w_node.target).shape)
        in_shape, out_shape = _per_sample(_shape(node.args[0])), _per_sample(_shape(node))
        has_bias = len(node.args) > 2 and isinstance(node.args[2], fx.Node)
        params = math.prod(w_shape)
        if node.target in LINEAR_OPS:
            op, groups, stride, padding, dilation, kernel = "linear", 1, (), (), (), ()
            macs = params * math.prod(out_shape[:-1])  # one dot product per leading position (e.g. per token)
        else:
            c = _conv_args(node)
            op = f"conv{c['dims']}d"
            groups, stride, padding, dilation = c["groups"], c["stride"], c["padding"], c["dilation"]
            kernel = w_shape[2:]
            macs = params * math.prod(out_shape[1:])  # Cout*Cin/groups*k*k * Hout*Wout
        name = w_node.target[: -len(".weight")] if w_node.target.endswith(".weight") else w_node.target
        if name in nodes:  # the same weight used twice: tell the uses apart
            name = f"{name}#{sum(1 for n in nodes if n.split('#')[0] == name)}"
        layers.append(
            Layer(
                name,
                op,
                w_shape,
                groups,
                stride,
                padding,
                dilation,
                tuple(kernel),
                has_bias,
                params,
                int(macs),
                in_shape,
                out_shape,
                len(layers),
            )
        )
        nodes[name] = node
        if len(layers) > max_layers:
            raise ModelError(f"model has more than {max_layers} quantizable layers")
    if not layers:
        raise ModelError("model has no quantizable layer (conv1d, conv2d or linear with a weight parameter)")
    return layers, nodes


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tensor_sizes(
    gm: fx.GraphModule, in_shape: tuple[int, ...], max_elements: int, dtype: torch.dtype = torch.float32
) -> None:
    """Run the graph on fake tensors (shapes only, nothing allocated) and refuse it when any tensor it would
    compute is over the limit: the sizes an archive declares are metadata, an op with a constant size
    argument (full, expand, repeat) is not bound by them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import _pytree

    class SizeCheck(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for t in _pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() > max_elements:
                    raise ModelError(
                        f"node {n.name!r} computes a tensor of shape {list(t.shape)}, over the limit "
                        f"of {max_elements} elements"
                    )
            return out

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(in_shape, dtype=dtype)  # token ids are int64: an embedding refuses floats
        try:
            SizeCheck(gm).run(x)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"the graph does not run at its input shape {list(in_shape)}: {brief(e)}") from e


def load_model(
    path: str | Path,
    max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    max_layers: int = DEFAULT_MAX_LAYERS,
    max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS,
    max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
) -> LoadedModel:
    """Load a .pt2 archive safely, fold BatchNorm and discover the quantizable layers."""
    path = Path(path)
    ep = read_exported_program(path, max_bytes)
    sig = ep.graph_signature
    user_inputs = [s for s in sig.input_specs if s.kind.name == "USER_INPUT"]
    if len(user_inputs) != 1:
        raise ModelError(f"model must take exactly one tensor input, it takes {len(user_inputs)}")
    try:
        with warnings.catch_warnings():  # torch's own pytree deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            gm = ep.module(check_guards=False)
    except Exception as e:
        raise ModelError(f"exported program cannot be turned into a module: {brief(e)}") from e
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    in_shape = _shape(placeholders[0])
    if not in_shape:
        raise ModelError("the model's input is a scalar; bitsearch needs a batch dimension")
    static_batch = in_shape[0] if isinstance(in_shape[0], int) else None
    per_sample = _per_sample(in_shape)
    if math.prod(per_sample) > max_input_elements:
        raise ModelError(
            f"the model's input is {list(per_sample)} per sample, over the limit of {max_input_elements} elements"
        )
    _check_supported(gm)
    check_tensor_sizes(gm, (static_batch or 1, *per_sample), max_tensor_elements, placeholders[0].meta["val"].dtype)
    _fold_batch_norm(gm)
    batch_note = rebatch(gm, static_batch) if static_batch else None
    layers, nodes = _discover_layers(gm, max_layers)
    for name, t in gm.named_parameters():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"model tensor {name!r} holds NaN or Inf values")

    return LoadedModel(
        path,
        sha256_file(path),
        gm,
        layers,
        per_sample,
        static_batch if batch_note else None,
        nodes,
        exported_batch=static_batch,
        batch_note=batch_note,
    )
