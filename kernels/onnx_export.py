"""A config as an ONNX QDQ model: QuantizeLinear/DequantizeLinear pairs that reproduce the simulation.

The folded float graph (LoadedModel.gm) is exported with torch's ONNX exporter, then each quantizable layer is
rewritten in the ONNX graph:

  weight  an integer initializer holding the simulation's codes, DequantizeLinear with its per-output-channel
          scales (axis 0, or 1 where the exporter transposed a linear weight into a MatMul), zero point 0.
          Uniform 4-bit codes ([-7, 7]) are INT4 (opset 21); every other uniform width, 1-bit binary (+-1)
          included, is an int8 container holding only the narrowed range [-(2^(b-1)-1), 2^(b-1)-1].
          pot/apot levels are dyadic (sums of powers of two): their codes are stored exactly as integers on the
          finest power-of-two grid they need (int8 or int16), the scale divided by that grid; a width whose
          grid does not fit 24 bits (float32's exact integers: pot at 6-8 bits) is refused. These dequantize to the
          simulation's weights up to float32 rounding of the scale (the simulation multiplies a normalised
          level, the export an integer).
  bias    the simulation's bias: corrected for the weight's quantization error when the config says so.
  input   QuantizeLinear (uint8, the simulation's scale and zero point) -> DequantizeLinear; below 8 bits a
          Clip in front of it keeps the codes in [0, 2^b-1], as the simulation's clamp does. a_bits 16
          leaves the input float.

The model's metadata (`bitsearch.layers`) states per layer the true bit-widths, the container types and the
ranges the codes take; `bitsearch.config` is the config itself.

Which layer is which ONNX node: the exporter names initializers after the graph's attributes, but it also
folds a linear weight's transpose into a new constant, so nodes are matched by their weight's values (in
execution order, so tied weights still pair up), not by name.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from search.config import QuantConfig
from search.model import LoadedModel
from search.quant.activation import FLOAT_ACT_BITS
from search.quant.weight import _apot_magnitudes, weight_levels
from search.simulate import Simulator

OPSET = 21  # INT4 tensors and int16 DequantizeLinear
EXACT_INT_LIMIT = 1 << 24  # integers float32 holds exactly: a weight code beyond it would not dequantize exactly
FORMAT = "bitsearch.onnx-qdq"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """A model or config the ONNX export cannot represent; the message says which layer and why."""


@dataclass(frozen=True)
class WeightGrid:
    """How one (bits, scheme) weight is stored: codes as integers of `dtype`, value = int * scale / divisor."""

    dtype: str  # "int4" | "int8" | "int16" | "int32"
    table: np.ndarray | None  # codebook index -> integer (pot/apot); None: the codes are the integers
    divisor: float  # the per-channel scale is divided by it
    lo: int
    hi: int


def weight_grid(bits: int, scheme: str) -> WeightGrid:
    """The integer form of a (bits, scheme) weight, or ExportError when it has none that is exact."""
    if scheme == "uniform":
        if bits == 1:
            return WeightGrid("int8", None, 1.0, -1, 1)  # binary: code +-1 times mean|w| is exactly the simulation
        qmax = (1 << (bits - 1)) - 1
        return WeightGrid("int4" if bits == 4 else "int8", None, 1.0, -qmax, qmax)
    # Unnormalised magnitudes are exact dyadic numbers; the simulation's levels are them over the largest.
    if scheme == "pot":
        raw = [abs(float(v)) for v in weight_levels(bits, scheme)]
        top = 1.0
    elif scheme == "apot":
        raw = list(_apot_magnitudes(bits - 1))
        top = max(raw)
    else:
        raise ExportError(f"weight scheme {scheme!r} has no ONNX form")
    exponent = 0
    while not all(float(m * 2.0**exponent).is_integer() for m in raw):
        exponent += 1
        if 2.0**exponent * top > EXACT_INT_LIMIT:
            raise ExportError(
                f"{scheme} {bits}-bit weights have no exact integer form: their levels need a grid of 2^-{exponent}, "
                f"over the {int(math.log2(EXACT_INT_LIMIT))} bits float32 holds exactly; choose fewer bits, "
                "or the uniform scheme"
            )
    levels = weight_levels(bits, scheme).double().numpy() * top * 2.0**exponent
    table = np.rint(levels).astype(np.int64)
    peak = int(np.abs(table).max())
    dtype = "int8" if peak <= 127 else "int16" if peak <= 32767 else "int32"
    return WeightGrid(dtype, table, top * 2.0**exponent, -peak, peak)


def check_exportable(config: QuantConfig) -> None:
    """ExportError naming every layer whose weights have no exact integer form."""
    problems = []
    for name, lq in config.layers.items():
        try:
            weight_grid(lq.w_bits, lq.scheme)
        except ExportError as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise ExportError("the config cannot be exported to ONNX: " + "; ".join(problems))


def _onnx_float_graph(model: LoadedModel):
    """The folded float graph as an ONNX ModelProto (dynamic batch unless the model only runs at one)."""
    import onnx  # noqa: F401  (fails here, with the package's name, when it is not installed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = copy.deepcopy(model.gm)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    dtype = placeholder.meta["val"].dtype if "val" in placeholder.meta else torch.float32
    batch = model.static_batch or 2
    example = torch.zeros((batch, *model.input_shape), dtype=dtype)
    dynamic = None if model.static_batch else ({0: torch.export.Dim("batch")},)
    # The exporter reports its steps on stdout and warns about optional packages (torchvision); a library
    # call that the API and worker make must not print.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm, (example,), dynamo=True, dynamic_shapes=dynamic, opset_version=OPSET, optimize=True, verbose=False
            )
    except Exception as e:
        raise ExportError(f"torch's ONNX exporter failed on this model: {type(e).__name__}: {str(e)[:500]}") from e
    finally:
        quiet.setLevel(level)
    return program.model_proto


def _init_array(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _match_layers(mp, model: LoadedModel) -> dict[str, tuple[object, bool]]:
    """layer name -> (ONNX node, weight transposed) by weight values, in execution order."""
    inits = {i.name: i for i in mp.graph.initializer}
    candidates = []
    for node in mp.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b)
            candidates.append((node, transposed, _init_array(inits[node.input[1]])))
    used: set[int] = set()
    out = {}
    for layer in model.layers:
        w = model.weight(layer.name).detach().float().numpy()
        for i, (node, transposed, arr) in enumerate(candidates):
            if i in used:
                continue
            want = w.T if transposed else w
            if arr.shape == want.shape and np.array_equal(arr, want):
                used.add(i)
                out[layer.name] = (node, transposed)
                break
        else:
            raise ExportError(f"layer {layer.name!r} has no node in the exported ONNX graph whose weight is its own")
    return out


def _bias_target(mp, node, layer_bias: np.ndarray | None, inits) -> tuple[object, int] | None:
    """(node, input index) holding the layer's bias: Conv/Gemm's third input, or the Add after a MatMul."""
    if layer_bias is None:
        return None
    if node.op_type in ("Conv", "Gemm"):
        if len(node.input) > 2 and node.input[2] in inits:
            return node, 2
    else:
        for other in mp.graph.node:
            if other.op_type == "Add" and node.output[0] in other.input:
                for k, name in enumerate(other.input):
                    if name in inits and np.array_equal(_init_array(inits[name]).reshape(-1), layer_bias):
                        return other, k
    return None


def export_onnx(
    model: LoadedModel,
    config: QuantConfig,
    calib_inputs: torch.Tensor | None = None,
    simulator: Simulator | None = None,
):
    """The ONNX QDQ ModelProto of `config` on `model`. Give the Simulator the search used (or the calibration
    inputs to build one) so activation ranges and corrected biases are the simulation's own."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    config.check_against(model)
    check_exportable(config)
    if simulator is None:
        if calib_inputs is None:
            raise ValueError("export_onnx() needs calib_inputs or a simulator for the activation ranges")
        simulator = Simulator(model, calib_inputs)
    sim = simulator
    mp = _onnx_float_graph(model)
    graph = mp.graph
    inits = {i.name: i for i in graph.initializer}
    matched = _match_layers(mp, model)
    users: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1

    new_inits, inserted, layers_meta, dropped = [], {}, {}, set()
    for layer in model.layers:
        lq = config.layers[layer.name]
        node, transposed = matched[layer.name]
        tag = f"bitsearch.{layer.name}"
        grid = weight_grid(lq.w_bits, lq.scheme)
        qw = sim.weight_codes(layer.name, lq.w_bits, lq.scheme, lq.clip)
        codes = qw.codes.numpy().astype(np.int64)
        if grid.table is not None:
            codes = grid.table[codes]
        scale = (qw.scale.double() / grid.divisor).float().numpy()
        if transposed:
            codes = codes.T
        axis = 1 if transposed else 0
        # ml_dtypes.int4 arrays become packed raw data, two codes a byte (a list of values would be varints).
        np_dtype = {"int4": ml_dtypes.int4, "int8": np.int8, "int16": np.int16, "int32": np.int32}[grid.dtype]
        q_init = numpy_helper.from_array(np.ascontiguousarray(codes).astype(np_dtype), f"{tag}.weight_q")
        zp_init = numpy_helper.from_array(np.zeros(scale.shape, np_dtype), f"{tag}.weight_zero_point")
        s_init = numpy_helper.from_array(scale.astype(np.float32), f"{tag}.weight_scale")
        new_inits += [q_init, zp_init, s_init]
        before = [
            helper.make_node(
                "DequantizeLinear",
                [q_init.name, s_init.name, zp_init.name],
                [f"{tag}.weight"],
                name=f"{tag}.weight_dq",
                axis=axis,
            )
        ]
        old_weight = node.input[1]
        node.input[1] = f"{tag}.weight"
        users[old_weight] -= 1
        if users[old_weight] == 0:
            dropped.add(old_weight)

        float_bias = model.bias(layer.name)
        bias = sim.layer_bias(layer.name, lq.w_bits, lq.scheme, lq.clip, config.bias_correction)
        target = _bias_target(mp, node, None if float_bias is None else float_bias.detach().float().numpy(), inits)
        if float_bias is not None and target is None and bool(float_bias.any()):
            raise ExportError(f"layer {layer.name!r}: its bias was not found in the exported ONNX graph")
        after = []
        if target is not None and target[0] is not node:  # a MatMul's Add
            bnode, k = target
            old = bnode.input[k]
            shape = tuple(_init_array(inits[old]).shape)
            b_init = numpy_helper.from_array(bias.detach().float().numpy().reshape(shape), f"{tag}.bias")
            new_inits.append(b_init)
            bnode.input[k] = b_init.name
            users[old] -= 1
            if users[old] == 0:
                dropped.add(old)
        elif bias is not None:
            # The layer's own bias input (Conv, Gemm), or none where the exporter dropped an all-zero bias that
            # correction makes nonzero. onnxruntime rounds a Conv's or Gemm's bias to int32 codes of input scale
            # x weight scale when both inputs come from DequantizeLinear (its WeightBiasQuantization pass): at
            # 4 bits that moves the bias far from the simulation's. Added after the layer, the bias stays float.
            if target is not None:
                old = node.input[2]
                del node.input[2]
                users[old] -= 1
                if users[old] == 0:
                    dropped.add(old)
            shape = (-1, *([1] * (len(layer.out_shape) - 1))) if node.op_type == "Conv" else (-1,)
            out = node.output[0]
            node.output[0] = f"{tag}.output_nobias"
            b_init = numpy_helper.from_array(bias.detach().float().numpy().reshape(shape), f"{tag}.bias")
            new_inits.append(b_init)
            after.append(helper.make_node("Add", [node.output[0], b_init.name], [out], name=f"{tag}.bias_add"))

        act = None
        if lq.a_bits < FLOAT_ACT_BITS:
            act = sim.act_range(layer.name, lq.a_bits, config.act_calibration)
            a_scale = np.float32(act.scale)
            zp = int(act.zero_point)
            x = node.input[0]
            sa = numpy_helper.from_array(np.array(a_scale, np.float32), f"{tag}.input_scale")
            za = numpy_helper.from_array(np.array(zp, np.uint8), f"{tag}.input_zero_point")
            new_inits += [sa, za]
            if act.qmax < 255:
                # The float bounds whose codes are 0 and 2^b-1: QuantizeLinear then saturates nowhere else.
                lo = numpy_helper.from_array(np.array(np.float32(-zp) * a_scale, np.float32), f"{tag}.input_lo")
                hi = numpy_helper.from_array(
                    np.array(np.float32(act.qmax - zp) * a_scale, np.float32), f"{tag}.input_hi"
                )
                new_inits += [lo, hi]
                before.append(helper.make_node("Clip", [x, lo.name, hi.name], [f"{tag}.input_clipped"]))
                x = f"{tag}.input_clipped"
            before += [
                helper.make_node("QuantizeLinear", [x, sa.name, za.name], [f"{tag}.input_q"], name=f"{tag}.input_q"),
                helper.make_node(
                    "DequantizeLinear", [f"{tag}.input_q", sa.name, za.name], [f"{tag}.input"], name=f"{tag}.input_dq"
                ),
            ]
            node.input[0] = f"{tag}.input"
        inserted[id(node)] = (before, after)
        layers_meta[layer.name] = {
            "onnx_node": node.name,
            "op": node.op_type,
            "w_bits": lq.w_bits,
            "scheme": lq.scheme,
            "weight_container": grid.dtype,
            "weight_codes": [grid.lo, grid.hi],
            "weight_axis": axis,
            "a_bits": lq.a_bits,
            "input_container": None if act is None else "uint8",
            "input_codes": None if act is None else [0, act.qmax],
            "input_scale": None if act is None else float(np.float32(act.scale)),
            "input_zero_point": None if act is None else int(act.zero_point),
            "bias_corrected": bool(config.bias_correction and float_bias is not None),
        }

    nodes = []
    for n in graph.node:
        before, after = inserted.get(id(n), ((), ()))
        nodes.extend(before)
        nodes.append(n)
        nodes.extend(after)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    mp.producer_name = "bitsearch"
    # The exporter annotates every node and the graph with torch's internals (fx node text, stack traces, the
    # export signature): a quarter to a half of a W4 model's file, and nothing a runtime reads.
    for n in graph.node:
        del n.metadata_props[:]
    del graph.metadata_props[:]
    del mp.metadata_props[:]
    meta = {
        "bitsearch.format": FORMAT,
        "bitsearch.format_version": str(FORMAT_VERSION),
        "bitsearch.model_sha256": model.sha256,
        "bitsearch.config": config.model_dump_json(),
        "bitsearch.layers": json.dumps(layers_meta),
        "bitsearch.note": (
            "Weights: uniform 4-bit codes are INT4; other widths are int8 (or int16/int32 for pot/apot grids) "
            "containers holding only the codes in each layer's weight_codes range. Inputs: uint8 codes in "
            "input_codes (a Clip keeps widths below 8 bits in range). w_bits and a_bits are the true widths."
        ),
    }
    onnx.helper.set_model_props(mp, meta)
    onnx.checker.check_model(mp, full_check=True)
    return mp


def save_onnx(mp, path: str | os.PathLike) -> Path:
    import onnx

    path = Path(path)
    onnx.save_model(mp, str(path))
    return path


# onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits; at its default accuracy level (4) that op
# re-quantizes the float input to int8 in blocks of 32, a second rounding the simulation does not make (on the
# mixer, 1.2% of argmaxes moved). Level 1 keeps the input float32, as the simulation does.
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def onnx_session(model_or_path, threads: int | None = None):
    """An onnxruntime CPU session (of a ModelProto, its bytes or a path) with every graph optimisation on, as a
    deployment runs it, and ORT_SESSION_CONFIG."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in ORT_SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if hasattr(model_or_path, "SerializeToString"):
        src = model_or_path.SerializeToString()
    elif isinstance(model_or_path, bytes):
        src = model_or_path
    else:
        src = str(model_or_path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of an ONNX session on x, in batches (padded to the model's batch when the export fixed it)."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or batch_size
    outs = []
    for i in range(0, x.shape[0], step):
        chunk = x[i : i + step].numpy()
        n = chunk.shape[0]
        if fixed and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {inp.name: chunk})[0][:n])
    return torch.from_numpy(np.concatenate(outs))


ONNX_FILE = "model.onnx"
ONNX_ERROR_FILE = "onnx-error.txt"


def write_onnx_artifact(directory: str | os.PathLike, model: LoadedModel, config: QuantConfig, simulator: Simulator):
    """Beside a packed model: model.onnx, or onnx-error.txt saying why the config has none (a width without an
    exact integer form, an op the exporter cannot write). The validation stores both with the packed model."""
    directory = Path(directory)
    try:
        save_onnx(export_onnx(model, config, simulator=simulator), directory / ONNX_FILE)
    except ExportError as e:
        (directory / ONNX_ERROR_FILE).write_text(str(e))
    except Exception as e:  # the packed model is still good: a failed export must not fail its validation
        logging.getLogger(__name__).warning("ONNX export failed", exc_info=True)
        (directory / ONNX_ERROR_FILE).write_text(f"the ONNX export failed: {type(e).__name__}: {str(e)[:500]}")
