"""Simulated quantization: apply a config to the loaded graph and measure it.

The simulator copies the folded graph once and puts an activation quantizer in front
of every quantizable layer's input. Calibration runs the float model over calibration
images once and keeps per-input statistics; each config then only swaps fake-quantized
weights (cached per layer, bits and scheme) and activation ranges (cached per layer,
bits and calibration method), so evaluating many configs in a search stays cheap.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import fx, nn

from .config import QuantConfig
from .data import DatasetError
from .model import LoadedModel, get_attr, run_batched, set_param
from .quant.activation import FLOAT_ACT_BITS, ActRange, ActStats, calibrate_range, fake_quantize_activation
from .quant.bias_correction import output_shift
from .quant.weight import quantize_weight, sqnr_db

EVAL_BATCH = 512  # images per forward at most
BATCH_BYTES = 128 << 20  # the largest tensor of one forward at most


def sample_elements(node: fx.Node) -> int | None:
    """Elements per sample of a node's tensor value, from the export's shape metadata (None: not known)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    try:
        return math.prod(int(s) for s in val.shape[1:])
    except (TypeError, ValueError):  # a symbolic non-batch size
        return None


# What one memory-bound pass over one activation element (fake quantization, ReLU, an addition) costs, in the
# multiply-accumulates of a convolution: about 400 on 2 cores (ResNet-18 and MobileNetV2 at 224 px, simulated).
ELEMENT_MACS = 400


def layer_work(layer) -> int:
    """A layer's share of a simulated forward per sample, in MACs: its own, its input's fake quantization and
    about two elementwise passes over its output (bias, activation, residual addition)."""
    return layer.macs + ELEMENT_MACS * (layer.in_features + 2 * layer.out_features)


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last memory: convolutions and pooling run 20-25% faster on the CPU (and a
    one-channel image is the same either way, so 28x28 grey models compute exactly as before)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def batch_size_for(gm: fx.GraphModule, budget_bytes: int = BATCH_BYTES, cap: int = EVAL_BATCH) -> int:
    """Images per batch such that the graph's largest tensor stays within budget_bytes (4 bytes an element)."""
    largest = max((e for n in gm.graph.nodes if (e := sample_elements(n))), default=1)
    return batch_for_largest(largest, budget_bytes, cap)


def batch_for_largest(largest: int, budget_bytes: int = BATCH_BYTES, cap: int = EVAL_BATCH) -> int:
    """Images per batch when the largest tensor holds `largest` elements per image (search/memory.py reads the
    same rule from a stored activation profile)."""
    return max(1, min(cap, budget_bytes // (4 * max(1, largest))))


class ActivationQuantizer(nn.Module):
    """Off, observing (calibration) or fake-quantizing one layer's input."""

    def __init__(self):
        super().__init__()
        self.range: ActRange | None = None
        self.stats: ActStats | None = None

    def forward(self, x):
        if self.stats is not None:
            self.stats.update(x)
        if self.range is not None:
            return fake_quantize_activation(x, self.range)
        return x


@dataclass
class EvalResult:
    top1: float | None  # fraction in [0, 1]; None for unlabelled data
    sqnr_db: float  # output (logit) SQNR against the float model
    kl: float  # mean KL(p_float || p_quant) of the softmax outputs
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p_log = torch.log_softmax(ref_logits.double(), 1)
    q_log = torch.log_softmax(logits.double(), 1)
    return float((p_log.exp() * (p_log - q_log)).sum(1).mean())


@torch.no_grad()
def evaluate_float(model: LoadedModel, data) -> float:
    return top1(model.forward(data.inputs), data.labels)


class Simulator:
    def __init__(self, model: LoadedModel, calib_inputs: torch.Tensor | None, stats: dict[str, ActStats] | None = None):
        """`stats` reuses another simulator's calibration (activation ranges and bias-correction means)
        instead of calibrating on `calib_inputs`: fine-tuned weights are evaluated with the
        calibration they were trained under (search/finetune.py)."""
        if calib_inputs is not None and tuple(calib_inputs.shape[1:]) != tuple(model.input_shape):
            # Every path that runs a model on data (eval, search, validate, pack, the worker) builds a Simulator
            # first: the one place to say the two do not fit, before an op fails deep in the graph.
            raise DatasetError(
                f"the data's inputs are {list(calib_inputs.shape[1:])} per sample but the model takes "
                f"{list(model.input_shape)}"
            )
        self.model = model
        with warnings.catch_warnings():  # torch's own pytree deprecation noise on GraphModule copies
            warnings.simplefilter("ignore", FutureWarning)
            self.gm: fx.GraphModule = copy.deepcopy(model.gm)
        self.static_batch = model.static_batch
        self._float_weights: dict[str, torch.Tensor] = {}
        self._float_biases: dict[str, torch.Tensor] = {}
        self._bias_targets: dict[str, str] = {}
        self._weight_targets: dict[str, str] = {}
        self.quantizers: dict[str, ActivationQuantizer] = {}
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for layer in model.layers:
            node = nodes[model.layer_nodes[layer.name].name]
            target = node.args[1].target
            self._weight_targets[layer.name] = target
            self._float_weights[layer.name] = get_attr(self.gm, target).detach().clone()
            if layer.has_bias:
                self._bias_targets[layer.name] = node.args[2].target
                self._float_biases[layer.name] = get_attr(self.gm, node.args[2].target).detach().clone()
            q = ActivationQuantizer()
            mod_name = f"bitsearch_act_{layer.index}"
            self.gm.add_module(mod_name, q)
            with self.gm.graph.inserting_before(node):
                qnode = self.gm.graph.call_module(mod_name, (node.args[0],))
            node.args = (qnode, *node.args[1:])
            self.quantizers[layer.name] = q
        self.gm.recompile()
        self.batch_size = batch_size_for(self.gm)
        self._weight_cache: dict[tuple, torch.Tensor] = {}
        self._bias_cache: dict[tuple, torch.Tensor] = {}
        self._range_cache: dict[tuple, ActRange] = {}
        self._float_logits: dict[tuple, torch.Tensor] = {}
        self.config: QuantConfig | None = None
        if stats is None:
            self._calibrate(calib_inputs)
        else:
            if set(stats) != set(self.quantizers):
                raise ValueError("calibration statistics are for other layers than this model's")
            self.stats = stats

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        self.set_float()
        for name, q in self.quantizers.items():
            q.stats = ActStats(channel_dim=-1 if self.model.layer(name).op == "linear" else 1)
        self.forward(x)
        self.stats = {name: q.stats for name, q in self.quantizers.items()}
        for q in self.quantizers.values():
            q.stats = None

    def quantized_weight(self, layer: str, bits: int, scheme: str = "uniform", clip: str = "mse") -> torch.Tensor:
        key = (layer, bits, scheme, clip)
        if key not in self._weight_cache:
            self._weight_cache[key] = quantize_weight(self._float_weights[layer], bits, scheme, clip).dequantize()
        return self._weight_cache[key]

    def weight_codes(self, layer: str, bits: int, scheme: str = "uniform", clip: str = "mse"):
        """The QuantizedWeight (codes and scales) behind quantized_weight(): what the kernels pack."""
        return quantize_weight(self._float_weights[layer], bits, scheme, clip)

    def layer_bias(
        self, layer: str, bits: int | None, scheme: str = "uniform", clip: str = "mse", bias_correction: bool = True
    ) -> torch.Tensor | None:
        """The bias the simulation uses for this layer at these bits (corrected when enabled); None if none."""
        if layer not in self._bias_targets:
            return None
        if bias_correction and bits is not None:
            return self.corrected_bias(layer, bits, scheme, clip)
        return self._float_biases[layer]

    def corrected_bias(self, layer: str, bits: int, scheme: str = "uniform", clip: str = "mse") -> torch.Tensor:
        """The layer's float bias minus the output shift its quantized weights cause (bias_correction.py)."""
        key = (layer, bits, scheme, clip)
        if key not in self._bias_cache:
            error = self.quantized_weight(layer, bits, scheme, clip) - self._float_weights[layer]
            shift = output_shift(error, self.stats[layer].channel_mean, self.model.layer(layer).groups)
            self._bias_cache[key] = self._float_biases[layer] - shift
        return self._bias_cache[key]

    def act_range(self, layer: str, bits: int, method: str = "mse") -> ActRange:
        key = (layer, bits, method)
        if key not in self._range_cache:
            self._range_cache[key] = calibrate_range(self.stats[layer], bits, method)
        return self._range_cache[key]

    def set_float(self) -> None:
        for name in self._float_weights:
            self.set_layer(name, None, None)
        self.config = None

    def apply(self, config: QuantConfig) -> None:
        config.check_against(self.model)
        for name, lq in config.layers.items():
            self.set_layer(
                name, lq.w_bits, lq.a_bits, lq.scheme, lq.clip, config.act_calibration, config.bias_correction
            )
        self.config = config

    def set_layer(
        self,
        name: str,
        w_bits: int | None,
        a_bits: int | None,
        scheme: str = "uniform",
        clip: str = "mse",
        act_calibration: str = "mse",
        bias_correction: bool = True,
    ) -> None:
        """Quantize one layer (None keeps its weights or its input float); the others stay as they are."""
        w = self._float_weights[name] if w_bits is None else self.quantized_weight(name, w_bits, scheme, clip)
        set_param(self.gm, self._weight_targets[name], w)
        if name in self._bias_targets:
            correct = bias_correction and w_bits is not None
            b = self.corrected_bias(name, w_bits, scheme, clip) if correct else self._float_biases[name]
            set_param(self.gm, self._bias_targets[name], b)
        self.quantizers[name].range = (
            None if a_bits is None or a_bits >= FLOAT_ACT_BITS else self.act_range(name, a_bits, act_calibration)
        )
        self.config = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_batched(self._run, x, self.static_batch, self.batch_size)

    def _run(self, x: torch.Tensor):
        return self.gm(fast_layout(x))

    @property
    def work_per_sample(self) -> int:
        """What one sample's forward costs, in MACs (layer_work): the unit searches size their measurements in."""
        return sum(layer_work(l) for l in self.model.layers)

    def remember_float_logits(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Take `logits` as the float model's output on `x` (a stored copy of what float_logits computed)."""
        if logits.shape[0] != x.shape[0]:
            raise ValueError(f"{logits.shape[0]} stored reference outputs for {x.shape[0]} inputs")
        self._float_logits[(x.data_ptr(), tuple(x.shape))] = logits

    def float_logits(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in self._float_logits:
            config = self.config
            self.set_float()
            self._float_logits[key] = self.forward(x)
            if config is not None:
                self.apply(config)
        return self._float_logits[key]

    @torch.no_grad()
    def evaluate(self, config: QuantConfig | None, data) -> EvalResult:
        ref = self.float_logits(data.inputs)
        if config is None:
            self.set_float()
        else:
            self.apply(config)
        logits = self.forward(data.inputs)
        acc = top1(logits, data.labels) if data.labels is not None else None
        return EvalResult(acc, sqnr_db(ref, logits), kl_divergence(ref, logits), len(data.inputs))

    def incremental(self, x: torch.Tensor) -> IncrementalRunner:
        return IncrementalRunner(self, x)

    def weight_sqnr_db(self, layer: str, bits: int, scheme: str = "uniform", clip: str = "mse") -> float:
        return sqnr_db(self._float_weights[layer], self.quantized_weight(layer, bits, scheme, clip))

    def activation_sqnr_db(self, layer: str, bits: int, method: str = "mse") -> float:
        x = self.stats[layer].sample()
        return sqnr_db(x, fake_quantize_activation(x, self.act_range(layer, bits, method)))


class IncrementalRunner:
    """Runs the simulated graph on fixed inputs, recomputing only what a changed layer feeds.

    Every node's value is kept between runs; after `run(changed)` only the nodes downstream of
    the changed layers' input quantizer or weight are executed again. Memory: all intermediate
    tensors of the batch (about 2 GB for ResNet-20 on 1,024 28x28 images).
    """

    def __init__(self, sim: Simulator, x: torch.Tensor):
        self.sim = sim
        self.x = fast_layout(x)
        self.nodes = list(sim.gm.graph.nodes)
        self.env: dict[fx.Node, object] = {}
        by_name = {n.name: n for n in self.nodes}
        self.layer_nodes = {name: by_name[node.name] for name, node in sim.model.layer_nodes.items()}
        self._downstream: dict[str, set[fx.Node]] = {}
        for name, node in self.layer_nodes.items():
            quantizer = node.args[0]
            seen, stack = set(), [quantizer, node]
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(n.users)
            self._downstream[name] = seen

    @torch.no_grad()
    def run(self, changed: list[str] | None = None) -> None:
        dirty = None if changed is None or not self.env else set().union(*(self._downstream[c] for c in changed))
        gm = self.sim.gm
        for node in self.nodes:
            if dirty is not None and node not in dirty and node.op != "get_attr":
                continue
            if node.op == "placeholder":
                value = self.x
            elif node.op == "get_attr":
                value = get_attr(gm, node.target)
            elif node.op == "output":
                continue
            else:
                args = fx.node.map_arg(node.args, self.env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
                fn = gm.get_submodule(node.target) if node.op == "call_module" else node.target
                value = fn(*args, **kwargs)
            self.env[node] = value

    def affected_layers(self, changed: list[str]) -> list[str]:
        """Layers whose output depends on any of `changed` (they included)."""
        dirty = set().union(*(self._downstream[c] for c in changed))
        return [name for name, node in self.layer_nodes.items() if node in dirty]

    def layer_output(self, name: str) -> torch.Tensor:
        return self.env[self.layer_nodes[name]]

    def output(self) -> torch.Tensor:
        out = self.nodes[-1].args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        return self.env[out]


LayerCallback = Callable[[str, torch.Tensor], None]


class SuffixRunner:
    """Runs the simulated graph on fixed inputs, then re-runs one layer's suffix at a time, streaming.

    Like IncrementalRunner, a re-run after changing a layer recomputes only what the layer's input
    quantizer and weight feed. Unlike it, nothing recomputed is kept: a re-run reads the values of the
    last full run (`run()`), hands every recomputed layer output to a callback, drops each value after
    its last recomputed user and returns the network's output, so the full run stays valid for the
    next layer without recomputing it. Of the full run only the values a suffix reads from outside
    itself are kept (in a ResNet, the block outputs): memory is those plus one suffix's working set,
    against every intermediate tensor for IncrementalRunner (docs/methods.md#sqnr-allocation).
    """

    def __init__(self, sim: Simulator, x: torch.Tensor, layers: list[str]):
        self.sim = sim
        self.x = x
        self.nodes = list(sim.gm.graph.nodes)
        order = {n: i for i, n in enumerate(self.nodes)}
        by_name = {n.name: n for n in self.nodes}
        self.layer_nodes = {name: by_name[node.name] for name, node in sim.model.layer_nodes.items()}
        self._layer_of = {node: name for name, node in self.layer_nodes.items()}
        self._suffix: dict[str, list[fx.Node]] = {}
        self._reads: dict[str, dict[fx.Node, int]] = {}  # per suffix: value -> recomputed users left
        keep: set[fx.Node] = set()
        for name in layers:
            seen, stack = set(), [self.layer_nodes[name].args[0], self.layer_nodes[name]]
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(n.users)
            suffix = sorted(seen, key=order.__getitem__)
            reads: dict[fx.Node, int] = {}
            for n in suffix:
                for a in n.all_input_nodes:
                    if a in seen:
                        reads[a] = reads.get(a, 0) + 1
                    elif a.op != "get_attr":  # weights are read afresh: set_layer swaps them
                        keep.add(a)
            self._suffix[name], self._reads[name] = suffix, reads
        self._keep = keep
        self.env: dict[fx.Node, object] = {}
        self.output_value: torch.Tensor | None = None

    def kept_elements(self) -> int:
        """Elements per sample the full run keeps for the suffixes (from the export's shape metadata)."""
        return sum(sample_elements(n) or 0 for n in self._keep)

    def _value(self, node: fx.Node, overlay: dict):
        if node in overlay:
            return overlay[node]
        if node.op == "get_attr":
            return get_attr(self.sim.gm, node.target)
        return self.env[node]

    def _compute(self, node: fx.Node, lookup):
        if node.op == "placeholder":
            return self.x
        if node.op == "get_attr":
            return get_attr(self.sim.gm, node.target)
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        fn = self.sim.gm.get_submodule(node.target) if node.op == "call_module" else node.target
        return fn(*args, **kwargs)

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def run(self, on_layer: LayerCallback | None = None) -> torch.Tensor:
        """The whole graph under the simulator's current config; keeps what the suffixes read."""
        env: dict[fx.Node, object] = {}
        left = {n: len(n.users) for n in self.nodes}
        out = None
        for node in self.nodes:
            if node.op == "output":
                out = self._first(fx.node.map_arg(node.args[0], env.__getitem__))
                continue
            env[node] = self._compute(node, env.__getitem__)
            if on_layer is not None and node in self._layer_of:
                on_layer(self._layer_of[node], env[node])
            for a in node.all_input_nodes:
                left[a] -= 1
                if left[a] == 0 and a not in self._keep:
                    del env[a]
        self.env = {n: v for n, v in env.items() if n in self._keep}
        self.output_value = out
        return out

    @torch.no_grad()
    def run_suffix(self, changed: str, on_layer: LayerCallback | None = None) -> torch.Tensor:
        """The output after re-running what `changed` feeds under the current config; the kept full run
        is left as it was."""
        overlay: dict[fx.Node, object] = {}
        left = dict(self._reads[changed])
        lookup = partial(self._value, overlay=overlay)
        out = None
        for node in self._suffix[changed]:
            if node.op == "output":
                out = self._first(fx.node.map_arg(node.args[0], lookup))
                continue
            overlay[node] = self._compute(node, lookup)
            if on_layer is not None and node in self._layer_of:
                on_layer(self._layer_of[node], overlay[node])
            for a in node.all_input_nodes:
                if a in left:
                    left[a] -= 1
                    if left[a] == 0:
                        overlay.pop(a, None)
        return self.output_value if out is None else out

    def affected_layers(self, changed: str) -> list[str]:
        """Layers whose output depends on `changed` (it included), in layer order."""
        suffix = set(self._suffix[changed])
        return [name for name, node in self.layer_nodes.items() if node in suffix]

    def suffix_work(self) -> dict[str, int]:
        """Per layer the runner was built for, what re-running its suffix costs per sample (layer_work, MACs)."""
        work = {l.name: layer_work(l) for l in self.sim.model.layers}
        return {n: sum(work[m] for m in self.affected_layers(n)) for n in self._suffix}
