"""Lowering a config to a packed model: each quantized conv/linear becomes a bitsearch low-bit op.

Weights, scales, corrected biases and activation ranges come from the Simulator itself, so the packed model
computes the same integer arithmetic as the simulation and agrees with it up to float summation order.
Layers the bit-plane kernels do not cover stay float ops on the simulation's dequantized weights, with the
input fake-quantized: non-uniform schemes (pot, apot) and float activations (a_bits 16). `kernel_layers`
lists what runs on the kernels.

A packed model is saved as a torch.export archive (model.pt2: the graph with the packed buffers) plus the
config (config.json); `load_packed` reads it back with bitsearch's safe archive reader, without the original
model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx

from search.config import QuantConfig
from search.model import LoadedModel, get_attr, run_batched, set_param
from search.quant.activation import FLOAT_ACT_BITS
from search.simulate import Simulator

from . import ops  # noqa: F401  (registers torch.ops.bitsearch.*)
from .packing import LAYOUT, pack

MODEL_FILE, CONFIG_FILE = "model.pt2", "config.json"

# lowbit_conv2d returns channels-last memory, as torch's conv2d does on a channels-last input. Pointwise ops,
# reshape/flatten and the reductions accept that; a strict view of the exported graph may not, so its input
# is made contiguous first (a no-op when it already is).
_STRICT_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


class PackedModel:
    def __init__(
        self,
        module: torch.nn.Module,
        config: QuantConfig | dict,
        input_shape: tuple[int, ...],
        static_batch: int | None,
        kernel_layers: list[str],
    ):
        self.module = module
        self.config = config
        self.input_shape = tuple(input_shape)
        self.static_batch = static_batch
        self.kernel_layers = kernel_layers

    @torch.no_grad()
    def forward(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return run_batched(self.module, x, self.static_batch, batch_size)

    __call__ = forward

    @property
    def buffer_bytes(self) -> int:
        """Bytes of every tensor the packed model holds (packed planes, scales, biases, float layers)."""
        seen = {}
        for name, t in [*self.module.named_buffers(), *self.module.named_parameters()]:
            seen[name] = t.numel() * t.element_size()
        return sum(seen.values())

    def export(self) -> torch.export.ExportedProgram:
        batch = self.static_batch or 2
        example = (torch.zeros((batch, *self.input_shape)),)
        dynamic = None if self.static_batch else ({0: torch.export.Dim("batch", min=1)},)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(self.module, example, dynamic_shapes=dynamic)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.export.save(self.export(), str(directory / MODEL_FILE))
        config = self.config.model_dump(mode="json") if isinstance(self.config, QuantConfig) else self.config
        meta = {
            "layout": LAYOUT,
            "config": config,
            "input_shape": list(self.input_shape),
            "static_batch": self.static_batch,
            "kernel_layers": self.kernel_layers,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return directory

    @property
    def nbytes(self) -> int:
        """Size of the packed model as stored on disk (graph + packed weights + config)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return sum(f.stat().st_size for f in Path(tmp).iterdir())


def load_packed(directory: str | os.PathLike, max_bytes: int = 512 << 20) -> PackedModel:
    """Read a packed model directory back. It may come from anyone (a download, a shared folder), so it is read
    as data: the archive through bitsearch's safe reader, the metadata checked for type and size, the graph
    allowed only aten and bitsearch ops, and every tensor it computes bounded, before it runs."""
    from search.archive import ArchiveError, read_exported_program
    from search.model import (
        ALLOWED_PYTHON_TARGETS,
        DEFAULT_MAX_INPUT_ELEMENTS,
        DEFAULT_MAX_TENSOR_ELEMENTS,
        check_tensor_sizes,
    )

    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{directory / CONFIG_FILE} is missing or not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ArchiveError(f"{directory / CONFIG_FILE} is not a JSON object")
    if meta.get("layout") != LAYOUT:
        raise ValueError(
            f"{directory} holds weights packed in layout {meta.get('layout', 'bitsearch.bitplanes/1')!r}; "
            f"this version runs {LAYOUT!r}: pack the config again (bitsearch pack)"
        )
    input_shape, static_batch, kernel_layers = (
        meta.get("input_shape"),
        meta.get("static_batch"),
        meta.get("kernel_layers"),
    )
    if (
        not isinstance(input_shape, list)
        or not all(type(d) is int and d > 0 for d in input_shape)
        or math.prod(input_shape) > DEFAULT_MAX_INPUT_ELEMENTS
        or not (static_batch is None or type(static_batch) is int and 0 < static_batch <= 4096)
        or not isinstance(kernel_layers, list)
        or not all(isinstance(n, str) for n in kernel_layers)
        or not isinstance(meta.get("config"), dict)
    ):
        raise ArchiveError(
            f"{directory / CONFIG_FILE}: input_shape, static_batch, kernel_layers or config is "
            "malformed or out of range"
        )
    program = read_exported_program(directory / MODEL_FILE, max_bytes=max_bytes)
    for node in program.graph.nodes:
        target = node.target
        if (
            node.op == "call_function"
            and target not in ALLOWED_PYTHON_TARGETS
            and not (isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "bitsearch"))
        ):
            raise ArchiveError(f"packed model node {node.name!r} calls {target}; only aten and bitsearch ops run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = program.module()
    check_tensor_sizes(module, (static_batch or 1, *input_shape), DEFAULT_MAX_TENSOR_ELEMENTS)
    return PackedModel(module, meta["config"], tuple(input_shape), static_batch, kernel_layers)


def _attr(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, value.contiguous())
    return gm.graph.get_attr(name)


def lower(
    model: LoadedModel,
    config: QuantConfig,
    calib_inputs: torch.Tensor | None = None,
    simulator: Simulator | None = None,
) -> PackedModel:
    """Replace every layer of `model` with its low-bit op under `config`. Give the Simulator the search used
    (or the calibration inputs to build one) so activation ranges and corrected biases are the same."""
    config.check_against(model)
    if simulator is None:
        if calib_inputs is None:
            raise ValueError("lower() needs calib_inputs or a simulator for the activation ranges")
        simulator = Simulator(model, calib_inputs)
    sim = simulator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(model.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    on_kernels = []
    for layer in model.layers:
        lq = config.layers[layer.name]
        node = nodes[model.layer_nodes[layer.name].name]
        x = node.args[0]
        bias = sim.layer_bias(layer.name, lq.w_bits, lq.scheme, lq.clip, config.bias_correction)
        quant_act = lq.a_bits < FLOAT_ACT_BITS
        act = sim.act_range(layer.name, lq.a_bits, config.act_calibration) if quant_act else None
        if lq.scheme == "uniform" and quant_act:
            qw = sim.weight_codes(layer.name, lq.w_bits, lq.scheme, lq.clip)
            packed = pack(qw, layer.groups)
            if bias is None:
                bias = torch.zeros(qw.codes.shape[0])
            tag = f"bitsearch_{layer.index}"
            with gm.graph.inserting_before(node):
                tensors = [
                    _attr(gm, f"{tag}_{k}", v)
                    for k, v in (
                        ("planes", packed.planes),
                        ("qsum", packed.qsum),
                        ("scale", packed.scale),
                        ("bias", bias.float().reshape(layer.groups, -1)),
                    )
                ]
                common = (packed.k, float(act.scale), int(act.zero_point), int(act.qmax))
                if layer.op == "linear":
                    new = gm.graph.call_function(torch.ops.bitsearch.lowbit_linear.default, (x, *tensors, *common))
                else:
                    two_d = layer.op == "conv2d"
                    kernel = list(layer.kernel) if two_d else [1, layer.kernel[0]]
                    stride, padding, dilation = (
                        (list(v) if two_d else [1, v[0]]) for v in (layer.stride, layer.padding, layer.dilation)
                    )
                    if not two_d:
                        padding[0] = 0
                    xin = x if two_d else gm.graph.call_function(torch.ops.aten.unsqueeze.default, (x, 2))
                    new = gm.graph.call_function(
                        torch.ops.bitsearch.lowbit_conv2d.default,
                        (xin, *tensors, *common, kernel, stride, padding, dilation),
                    )
                    if not two_d:
                        new = gm.graph.call_function(torch.ops.aten.squeeze.dim, (new, 2))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            on_kernels.append(layer.name)
        else:
            # Float path on the simulation's own dequantized weights and corrected bias.
            set_param(gm, node.args[1].target, sim.quantized_weight(layer.name, lq.w_bits, lq.scheme, lq.clip))
            if bias is not None:
                set_param(gm, node.args[2].target, bias)
            if quant_act:
                with gm.graph.inserting_before(node):
                    fq = gm.graph.call_function(
                        torch.ops.aten.fake_quantize_per_tensor_affine.default,
                        (x, float(act.scale), int(act.zero_point), 0, int(act.qmax)),
                    )
                node.args = (fq, *node.args[1:])
    if on_kernels:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _STRICT_VIEWS:
                with gm.graph.inserting_before(node):
                    dense = gm.graph.call_function(torch.ops.aten.contiguous.default, (node.args[0],))
                node.args = (dense, *node.args[1:])
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:  # the float weights the packed ops replaced
            *path, leaf = name.split(".")
            delattr(get_attr(gm, ".".join(path)) if path else gm, leaf)
    gm.recompile()
    return PackedModel(gm, config, model.input_shape, model.static_batch, on_kernels)
