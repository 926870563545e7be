"""Make a graph exported at a fixed batch size run at any batch size.

Users export the way the torch docs show, `torch.export.export(model, (torch.randn(1, 3, 224, 224),))`, which
bakes the batch size into every shape argument: `view(x, [1, 512])`, `expand(cls, [1, -1, -1])`,
`view(q, [17, 4, 8])` where 4 is heads x batch. Run as exported, such a graph takes one sample per call, which
made searches 4-5x slower and imprinting impossible.

The rewrite follows where the batch lives in every tensor of the graph, from the input (dimension 0) through
each op, using the shapes the export recorded:

- a dimension may be the batch itself (`own`), or hold the batch as its outermost factor (`outer`: heads x
  batch after a view) or as its innermost (`inner`: tokens x batch, as nn.MultiheadAttention folds them);
- shape arguments of views, expands and factories get the batch size as an expression of the input's size;
- an op that mixes values along a dimension (a linear's features, a softmax's axis, a convolution's channels,
  attention's tokens) may not hold the batch there.

Where a view could put the batch in two places (before or after a boundary), the first choice is tried and the
propagation backtracks when a later op finds the batch where it would mix samples. Whatever the rewrite decides is
then checked by running it: a few samples batched against the same samples one at a time through the original
graph. A graph that cannot be rewritten, or whose rewrite disagrees, stays as exported and the caller says so.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["rebatch"]

aten = torch.ops.aten

MAX_ATTEMPTS = 64  # backtracking bound: one per ambiguous view in practice
CHECK_SAMPLES = 3
INPUT_CHECKS = {"_check_input_constraints_pre_hook"}


@dataclass(frozen=True)
class Where:
    """The batch's place in one tensor."""

    dim: int
    role: str  # "own" | "outer" | "inner"


class CannotRebatch(Exception):
    pass


class _Ambiguous(Exception):
    """A choice failed downstream: the search moves to the next alternative."""


VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
EXPAND_OPS = {aten.expand.default}
FACTORY_OPS = {aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format}
NEW_FACTORY_OPS = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default}
SAME_SHAPE_OPS = {
    aten.contiguous.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.dropout.default,
    aten.detach.default,
    aten.alias.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.type_as.default,
    aten.feature_dropout.default,
}
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.convolution.default}
POOL_OPS = {
    aten.max_pool2d.default: 2,
    aten.max_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool1d.default: 1,
    aten.adaptive_avg_pool2d.default: 2,
    aten.adaptive_avg_pool1d.default: 1,
    aten.adaptive_max_pool2d.default: 2,
    aten.max_pool2d_with_indices.default: 2,
    aten.upsample_nearest2d.vec: 2,
    aten.upsample_bilinear2d.vec: 2,
    aten.pixel_shuffle.default: 3,
}
REDUCE_OPS = {
    aten.mean.dim,
    aten.sum.dim_IntList,
    aten.amax.default,
    aten.amin.default,
    aten.var.correction,
    aten.std.correction,
    aten.logsumexp.default,
}
AXIS_OPS = {aten.softmax.int, aten.log_softmax.int, aten._softmax.default, aten._log_softmax.default}


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v


def _shape(node) -> tuple[int, ...]:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise CannotRebatch(f"node {getattr(node, 'name', node)!r} has no recorded shape")
    return tuple(int(s) for s in v.shape)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class _Propagation:
    """One pass over the graph under a list of choices; raises _Ambiguous at the first contradiction."""

    def __init__(self, gm: fx.GraphModule, batch: int, choices: list[int]):
        self.gm, self.b0, self.choices = gm, batch, choices
        self.where: dict[fx.Node, object] = {}  # Where | None | tuple of those for multi-output ops
        self.rewrites: list[tuple[fx.Node, int, int, int]] = []  # node, arg index, list position, multiplier
        self.retargets: list[tuple[fx.Node, list[int]]] = []  # squeeze() nodes to pin to their dims
        self.decisions: list[int] = []  # alternatives count per choice point, in order
        self.failed_at: str | None = None

    def choose(self, alternatives: int) -> int:
        i = len(self.decisions)
        self.decisions.append(alternatives)
        return self.choices[i] if i < len(self.choices) else 0

    def fail(self, node: fx.Node, why: str):
        self.failed_at = f"node {node.name!r} ({_op_name(node)}): {why}"
        raise _Ambiguous(self.failed_at)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.where[node] = Where(0, "own")
            elif node.op == "get_attr":
                self.where[node] = None
            elif node.op == "output":
                out = node.args[0]
                first = out[0] if isinstance(out, (tuple, list)) else out
                for leaf in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(leaf, fx.Node) and self.where.get(leaf) not in (None, Where(0, "own")):
                        self.fail(node, f"an output holds the batch at {self.where[leaf]}, not dimension 0")
                if self.where.get(first) != Where(0, "own"):
                    self.fail(node, "the first output does not depend on the input's batch")
            elif node.op == "call_function":
                self.where[node] = self.step(node)
            else:
                raise CannotRebatch(f"node {node.name!r}: {node.op} is not supported")

    # -- helpers -------------------------------------------------------------------------------------

    def w(self, arg) -> Where | None:
        return self.where.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]

    def carried(self, node: fx.Node) -> list[tuple[fx.Node, Where]]:
        return [(a, self.w(a)) for a in self.tensor_inputs(node) if isinstance(self.w(a), Where)]

    def forbid(self, node, where: Where, dims, what: str):
        if where.dim in dims:
            self.fail(node, f"{what} (the batch is in dimension {where.dim})")

    def place_after_prefix(self, node: fx.Node, prefix: int, out: tuple[int, ...], suffix: int) -> list[tuple]:
        """Where the batch can go in `out` (a view of a tensor whose batch sits after `prefix` elements):
        (Where, position to rewrite or None, multiplier)."""
        b0, options = self.b0, []
        acc = 1
        for k, size in enumerate(out):
            if acc == prefix:
                rest = math.prod(out[k + 1 :])
                if size == b0 and rest == suffix:
                    options.append((Where(k, "own"), k, 1))
                if size % b0 == 0 and size > b0 and (size // b0) * rest == suffix:
                    options.append((Where(k, "outer"), k, size // b0))
            if k > 0 and acc == prefix * b0 and out[k - 1] % b0 == 0 and out[k - 1] > b0:
                if math.prod(out[k:]) == suffix:
                    options.append((Where(k - 1, "inner"), k - 1, out[k - 1] // b0))
            acc *= size
        if acc == prefix * b0 and out and out[-1] % b0 == 0 and out[-1] > b0 and suffix == 1:
            options.append((Where(len(out) - 1, "inner"), len(out) - 1, out[-1] // b0))
        # own first (no ambiguity), then the two merges; duplicates dropped
        seen, unique = set(), []
        for o in sorted(options, key=lambda o: {"own": 0, "outer": 1, "inner": 2}[o[0].role]):
            if o[0] not in seen:
                seen.add(o[0])
                unique.append(o)
        return unique

    def prefix_of(self, shape: tuple[int, ...], where: Where) -> tuple[int, int]:
        """Elements before and after the batch in a tensor of `shape` (the batch excluded)."""
        d, b0 = where.dim, self.b0
        before, after = math.prod(shape[:d]), math.prod(shape[d + 1 :])
        inner_dim = shape[d] // b0
        if where.role == "outer":
            after *= inner_dim
        elif where.role == "inner":
            before *= inner_dim
        return before, after

    # -- the rules -----------------------------------------------------------------------------------

    def step(self, node: fx.Node):
        t = node.target
        carried = self.carried(node)
        if t is operator.getitem:
            parent, index = node.args
            w = self.where.get(parent)
            return w[index] if isinstance(w, tuple) else w
        if t in FACTORY_OPS or t in NEW_FACTORY_OPS:
            return self.factory(node)
        if t is aten.arange.default or t is aten.arange.start or t is aten.arange.start_step:
            return None
        if t is aten.sym_size.int:
            w = self.w(node.args[0])
            if isinstance(w, Where) and _norm(node.args[1], len(_shape(node.args[0]))) == w.dim:
                self.fail(node, "the graph reads the batch size")
            return None
        if not carried:
            if t in EXPAND_OPS:
                return self.expand_constant(node)
            return None
        if t in VIEW_OPS:
            return self.view(node, carried[0][1])
        if t in EXPAND_OPS:
            w = carried[0][1]
            in_nd, sizes = len(_shape(node.args[0])), list(node.args[1])
            d = w.dim + len(sizes) - in_nd
            if sizes[d] != -1:  # expand(x, [1, 16, 64]) names the batch size: follow the input's
                self.rewrites.append((node, 1, d, _shape(node)[d] // self.b0))
            return Where(d, w.role)
        if t in SAME_SHAPE_OPS or torch.Tag.pointwise in getattr(t, "tags", ()):
            return self.pointwise(node, carried)
        if t in CONV_OPS:
            w = self.w(node.args[0])
            if not isinstance(w, Where) or any(isinstance(self.w(a), Where) for a in node.args[1:]):
                self.fail(node, "a convolution's weight depends on the input")
            self.forbid(
                node, w, range(1, len(_shape(node.args[0]))), "a convolution over channels and space would mix samples"
            )
            return w
        if t is aten.linear.default:
            w = self.w(node.args[0])
            if not isinstance(w, Where) or any(isinstance(self.w(a), Where) for a in node.args[1:]):
                self.fail(node, "a linear layer's weight depends on the input")
            self.forbid(node, w, [len(_shape(node.args[0])) - 1], "a linear layer over features would mix samples")
            return w
        if t in POOL_OPS:
            w = self.w(node.args[0])
            nd = len(_shape(node.args[0]))
            self.forbid(node, w, range(nd - POOL_OPS[t], nd), "pooling would mix samples")
            if t is aten.pixel_shuffle.default and w.dim != 0:
                self.fail(node, "pixel shuffle with the batch past dimension 0")
            return (w, w) if t is aten.max_pool2d_with_indices.default else w
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            w = self.w(node.args[0])
            self.forbid(node, w, [1], "batch norm's channels would mix samples")
            if t is aten.batch_norm.default and node.args[5]:
                self.fail(node, "batch norm in training mode uses statistics of the whole batch")
            return w if t is aten.batch_norm.default else (w, None, None)
        if t in (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default):
            w = self.w(node.args[0])
            nd, normalized = len(_shape(node.args[0])), len(node.args[1])
            self.forbid(node, w, range(nd - normalized, nd), "normalisation would mix samples")
            return w if t is not aten.native_layer_norm.default else (w, None, None)
        if t is aten.group_norm.default:
            w = self.w(node.args[0])
            self.forbid(node, w, range(1, len(_shape(node.args[0]))), "group norm would mix samples")
            return w
        if t in AXIS_OPS:
            w = self.w(node.args[0])
            self.forbid(node, w, [_norm(node.args[1], len(_shape(node.args[0])))], "softmax would mix samples")
            return w
        if t in REDUCE_OPS:
            return self.reduce(node)
        if t is aten.scaled_dot_product_attention.default:
            return self.attention(node)
        if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            return self.matmul(node)
        if t is aten.embedding.default:
            if isinstance(self.w(node.args[0]), Where):
                self.fail(node, "an embedding table depends on the input")
            return self.w(node.args[1])
        if t in (aten.transpose.int, aten.swapaxes.default):
            w = self.w(node.args[0])
            nd = len(_shape(node.args[0]))
            a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
            return Where(b if w.dim == a else a if w.dim == b else w.dim, w.role)
        if t is aten.t.default:
            w = self.w(node.args[0])
            return Where(1 - w.dim if len(_shape(node.args[0])) == 2 else w.dim, w.role)
        if t is aten.permute.default:
            w = self.w(node.args[0])
            nd = len(_shape(node.args[0]))
            perm = [_norm(p, nd) for p in node.args[1]]
            return Where(perm.index(w.dim), w.role)
        if t is aten.unsqueeze.default:
            w = self.w(node.args[0])
            d = _norm(node.args[1], len(_shape(node.args[0])) + 1)
            return Where(w.dim + 1 if d <= w.dim else w.dim, w.role)
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return self.squeeze(node)
        if t in (aten.flatten.using_ints, aten.unflatten.int):
            return self.view(node, self.w(node.args[0]), rewrite=False)
        if t is aten.select.int:
            w = self.w(node.args[0])
            d = _norm(node.args[1], len(_shape(node.args[0])))
            self.forbid(node, w, [d], "selecting one index along the batch")
            return Where(w.dim - 1 if d < w.dim else w.dim, w.role)
        if t is aten.slice.Tensor:
            w = self.w(node.args[0])
            shape = _shape(node.args[0])
            d = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape))
            if d == w.dim and _shape(node)[d] != shape[d]:
                self.fail(node, "slicing the batch")
            return w
        if t in (aten.cat.default, aten.stack.default):
            return self.concat(node)
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int):
            w = self.w(node.args[0])
            nd = len(_shape(node.args[0]))
            d = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), nd)
            if t is aten.unbind.int:
                d = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
                self.forbid(node, w, [d], "unbinding along the batch")
                return tuple(Where(w.dim - 1 if d < w.dim else w.dim, w.role) for _ in _val(node))
            self.forbid(node, w, [d], "splitting along the batch")
            return tuple(w for _ in _val(node))
        self.fail(node, "no batch rule for this op")

    def factory(self, node: fx.Node):
        size_arg = 1 if node.target in NEW_FACTORY_OPS else 0
        sizes = list(node.args[size_arg])
        if not sizes or sizes[0] != self.b0 or isinstance(sizes[0], fx.Node):
            return None
        # `torch.zeros(x.shape[0], ...)` exported at batch 1 and a constant whose first size happens to be 1 look
        # alike: batch first, the constant when that contradicts something later.
        if self.choose(2) == 0:
            self.rewrites.append((node, size_arg, 0, 1))
            return Where(0, "own")
        return None

    def expand_constant(self, node: fx.Node):
        sizes = list(node.args[1])
        in_shape = _shape(node.args[0])
        lead = len(sizes) - len(in_shape)
        if not sizes or sizes[0] != self.b0 or (lead == 0 and in_shape[0] != 1):
            return None
        if self.choose(2) == 0:  # cls_token.expand(x.shape[0], -1, -1): the batch, unless something contradicts
            self.rewrites.append((node, 1, 0, 1))
            return Where(0, "own")
        return None

    def view(self, node: fx.Node, w: Where, rewrite: bool = True) -> Where:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        before, after = self.prefix_of(in_shape, w)
        options = self.place_after_prefix(node, before, out_shape, after)
        if not options:
            self.fail(node, f"cannot place the batch in the view {list(in_shape)} -> {list(out_shape)}")
        where, position, multiplier = options[self.choose(len(options)) if len(options) > 1 else 0]
        if rewrite:
            self.rewrites.append((node, 1, position, multiplier))
        elif node.target is aten.unflatten.int:
            d = _norm(node.args[1], len(in_shape))
            if w.dim == d:
                self.fail(node, "unflattening the dimension that holds the batch")
        elif node.target is aten.flatten.using_ints:
            nd = len(in_shape)
            start = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
            end = _norm(node.args[2] if len(node.args) > 2 else -1, nd)
            if start < end and start <= w.dim <= end:
                # what flatten does is fixed: the batch must stay the outermost factor of the merged dimension
                if w.dim != start or w.role == "inner":
                    self.fail(node, "flattening the batch into the middle of a dimension")
                return Where(start, "outer")
        return where

    def pointwise(self, node: fx.Node, carried) -> Where:
        out_nd = len(_shape(node))
        aligned = {Where(w.dim + out_nd - len(_shape(a)), w.role) for a, w in carried}
        if len(aligned) != 1:
            self.fail(node, f"operands hold the batch in different places {sorted(map(str, aligned))}")
        (w,) = aligned
        for a in self.tensor_inputs(node):
            if isinstance(self.w(a), Where):
                continue
            shape = _shape(a)
            d = w.dim - (out_nd - len(shape))
            if 0 <= d < len(shape) and shape[d] != 1:
                self.fail(node, "an operand without the batch does not broadcast over it")
        return w

    def reduce(self, node: fx.Node):
        w = self.w(node.args[0])
        nd = len(_shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or dims == []:
            self.fail(node, "a reduction over every dimension")
        dims = [_norm(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        self.forbid(node, w, dims, "a reduction would mix samples")
        keep = len(_shape(node)) == nd
        return w if keep else Where(w.dim - sum(1 for d in dims if d < w.dim), w.role)

    def squeeze(self, node: fx.Node):
        w = self.w(node.args[0])
        shape = _shape(node.args[0])
        nd = len(shape)
        if node.target is aten.squeeze.default:
            dims = [i for i, s in enumerate(shape) if s == 1]
        else:
            raw = node.args[1]
            dims = [
                _norm(d, nd) for d in (raw if isinstance(raw, (list, tuple)) else [raw]) if shape[_norm(d, nd)] == 1
            ]
        self.forbid(node, w, dims, "squeeze() drops a batch of 1")
        if node.target is aten.squeeze.default and self.b0 > 1:
            self.retargets.append((node, dims))  # at a batch of 1, squeeze() would drop the batch too
        return Where(w.dim - sum(1 for d in dims if d < w.dim), w.role)

    def concat(self, node: fx.Node):
        tensors = node.args[0]
        nd = len(_shape(tensors[0]))
        d = _norm(
            node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd + (node.target is aten.stack.default)
        )
        places = {self.w(a) for a in tensors}
        if len(places) != 1 or None in places:
            self.fail(node, "joining tensors of which only some hold the batch")
        (w,) = places
        if node.target is aten.stack.default:
            return Where(w.dim + 1 if d <= w.dim else w.dim, w.role)
        self.forbid(node, w, [d], "concatenating along the batch would mix samples")
        return w

    def attention(self, node: fx.Node):
        q, k, v = node.args[:3]
        places = {self.w(a) for a in (q, k, v)}
        if len(places) != 1 or None in places:
            self.fail(node, "query, key and value hold the batch in different places")
        (w,) = places
        nd = len(_shape(q))
        self.forbid(node, w, [nd - 2, nd - 1], "attention over tokens would mix samples")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(self.w(mask), Where) and self.w(mask) != w:
            self.fail(node, "the attention mask holds the batch elsewhere")
        return w

    def matmul(self, node: fx.Node):
        a, b = node.args[:2]
        wa, wb = self.w(a), self.w(b)
        na, nb, no = len(_shape(a)), len(_shape(b)), len(_shape(node))
        if isinstance(wa, Where) and isinstance(wb, Where):
            da, db = wa.dim + no - na, wb.dim + no - nb
            if da != db or wa.role != wb.role or wa.dim >= na - 2:
                self.fail(node, "both matrices hold the batch in their matrix dimensions")
            return Where(da, wa.role)
        if isinstance(wa, Where):
            self.forbid(node, wa, [na - 1], "a matrix product's contraction would mix samples")
            return Where(wa.dim + no - na, wa.role)
        self.forbid(node, wb, [nb - 2] if nb > 1 else [0], "a matrix product's contraction would mix samples")
        return Where(wb.dim + no - nb, wb.role)


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t.name() if hasattr(t, "name") and callable(t.name) else getattr(t, "__name__", str(t))


def _propagate(gm: fx.GraphModule, batch: int) -> _Propagation:
    """Depth-first over the ambiguous choices, most recent first, until one propagation goes through."""
    choices: list[int] = []
    first_failure = None
    for _ in range(MAX_ATTEMPTS):
        p = _Propagation(gm, batch, choices)
        try:
            p.run()
            return p
        except _Ambiguous:
            first_failure = first_failure or p.failed_at
            # next alternative at the latest choice point that has one
            taken = [p.choices[i] if i < len(p.choices) else 0 for i in range(len(p.decisions))]
            while taken and taken[-1] + 1 >= p.decisions[len(taken) - 1]:
                taken.pop()
            if not taken:
                break
            taken[-1] += 1
            choices = taken
    raise CannotRebatch(first_failure or "no consistent placement of the batch")


def _apply(gm: fx.GraphModule, propagation: _Propagation) -> list[tuple[fx.Node, tuple]]:
    """Rewrite in place (a copy of a language model's weights is not free); returns what undoes it."""
    undo: list[tuple[fx.Node, tuple]] = []
    rewrites = propagation.rewrites
    for node, dims in propagation.retargets:
        undo.append((node, (node.target, node.args)))
        node.target, node.args = (
            (aten.squeeze.dims, (node.args[0], dims)) if dims else (aten.alias.default, node.args[:1])
        )
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    batch = None
    if rewrites:  # a graph whose shapes never name the batch (e.g. a CNN ending in mean()) needs no size node
        with gm.graph.inserting_after(placeholder):
            batch = gm.graph.call_function(aten.sym_size.int, (placeholder, 0))
        undo.append((batch, ()))
    for node, arg_index, position, multiplier in rewrites:
        sizes = list(node.args[arg_index])
        if sizes[position] == -1:  # view(x, [-1, 512]) already follows the batch
            continue
        size = batch
        if multiplier != 1:
            with gm.graph.inserting_before(node):
                size = gm.graph.call_function(operator.mul, (batch, multiplier))
            undo.append((size, ()))
        sizes[position] = size
        args = list(node.args)
        args[arg_index] = sizes
        undo.append((node, node.args))
        node.args = tuple(args)
    gm.graph.lint()
    gm.recompile()
    return undo


def _undo(gm: fx.GraphModule, undo: list[tuple[fx.Node, tuple]]) -> None:
    for node, args in reversed(undo):
        if node.op == "call_function" and node.target in (aten.sym_size.int, operator.mul) and not args:
            continue
        if len(args) == 2 and not isinstance(args[0], fx.Node) and callable(args[0]):  # a retargeted squeeze
            node.target, node.args = args
            continue
        node.args = args
    for node, args in reversed(undo):
        if not args and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _sample_inputs(gm: fx.GraphModule, per_sample: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn((CHECK_SAMPLES, *per_sample), generator=gen).to(dtype)
    # token ids: stay inside the smallest embedding table the graph looks them up in
    rows = [
        int(_shape(n.args[0])[0])
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is aten.embedding.default
    ]
    high = min(rows) if rows else 2
    return torch.randint(0, high, (CHECK_SAMPLES, *per_sample), generator=gen, dtype=dtype)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _agrees(batched: fx.GraphModule, x: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when the rewritten graph gives, for a batch, what the exported graph gave sample by sample."""
    out = _first(batched(x))
    if out.shape != ref.shape:
        return f"the rewritten graph returns {list(out.shape)} for {x.shape[0]} samples, expected {list(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-6)
    if not ref.is_floating_point():
        return None if torch.equal(out, ref) else "the rewritten graph's outputs differ"
    err = float((out - ref).abs().max() / scale)
    return None if err < 1e-4 else f"the rewritten graph's outputs differ from the exported one's ({err:.1e})"


def rebatch(gm: fx.GraphModule, batch: int) -> str | None:
    """Rewrite `gm` in place to run at any batch size; when it cannot, leave it as it was and say why."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    val = _val(placeholder)
    x = _sample_inputs(gm, tuple(val.shape[1:]), val.dtype)
    with torch.no_grad():
        reference = [_first(gm(x[i : i + 1].expand(batch, *x.shape[1:])))[:1] for i in range(x.shape[0])]
    try:
        undo = _apply(gm, _propagate(gm, batch))
    except CannotRebatch as e:
        return str(e)
    # torch.export's module checks every call's input against the export's shapes, the batch size included
    checks = {k: h for k, h in gm._forward_pre_hooks.items() if getattr(h, "__name__", "") in INPUT_CHECKS}
    for k in checks:
        del gm._forward_pre_hooks[k]
    try:
        disagreement = _agrees(gm, x, torch.cat(reference))
        if not disagreement and batch != 1:  # the last chunk of a run may hold one sample
            disagreement = _agrees(gm, x[:1], reference[0])
    except Exception as e:  # the rewrite mis-sized something: keep the export as it is
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        disagreement = f"the rewritten graph does not run batched: {first_line[:200]}"
    if disagreement:
        _undo(gm, undo)
        gm._forward_pre_hooks.update(checks)
    return disagreement
