"""External baseline: Sony's Model Compression Toolkit (MCT) mixed-precision PTQ on ResNet-20 / Fashion-MNIST.

Runs in its OWN virtual environment (MCT wants a newer torch than the project's .venv, and pulls in
TensorBoard, scikit-image, PuLP, ...), never in .venv; nothing in the project imports this file and
it is not part of the test suite. Create the venv once, outside the repository:

    /root/.pyenv/versions/3.11.7/bin/python3 -m venv /work/mct-venv
    /work/mct-venv/bin/pip install torch==2.14.1 torchvision==0.29.1   # a CUDA build; it runs on CPU
    /work/mct-venv/bin/pip install model-compression-toolkit==2.6.1     # brings numpy, scipy, pydantic, PuLP (+CBC)

then, from the repository root:

    /work/mct-venv/bin/python bench/mct_baseline.py --budgets 2.5 3 4               # both TPCs, ~15 min on 2 cores
    /work/mct-venv/bin/python bench/mct_baseline.py --budgets 3 --tpc imx500-2to8   # one row

What it does, matching bench/search_quality.py where it can:
  * model: models/resnet20-fmnist.pt2 (our torch.export archive; trusted, our own file) is loaded with
    torch.export.load and its parameters and buffers (BatchNorm unfolded, same names) are copied into a
    fresh models/architectures.py ResNet20, a plain nn.Module that MCT can trace; its fp32 test top-1 is
    checked against models/manifest.json (92.27).
  * data: search/data.py (same idx files, normalisation, the same 1024 calibration images from the
    training split, seed 0); the full 10,000-image test set for top-1.
  * MCT: mct.ptq.pytorch_post_training_quantization with a MixedPrecisionQuantizationConfig (MCT's
    defaults: 32 images for the sensitivity metric, AVG distance, greedy refinement) and
    ResourceUtilization(weights_memory=B). Activations 8 bits (power-of-two thresholds, MCT's default);
    kernels symmetric per-channel. MCT folds BatchNorm into the convs before quantizing.
  * TPCs: `imx500` is MCT's default (IMX500 TPC v1.0): kernel bits {8, 4, 2}. MCT ships no TPC with
    2..8 bits, so `imx500-2to8` is the same TPC rebuilt with kernel bits {8, 7, 6, 5, 4, 3, 2} (our
    searches' choices), through MCT's own generate_tpc.
  * budget: MCT's weights memory is sum(params * n_bits / 8) over the QUANTIZED weight attributes only
    (TargetInclusionCriterion.AnyQuantizedNonFused); in the IMX500 TPCs only kernels are quantized, the
    (BN-folded) biases are float and not counted. So B = sum(conv + linear kernel params) * avg / 8
    bytes is exactly our avg_wbits budget (sum(params_l * wb_l) / sum(params_l) over the same layers).
    The script checks that MCT's graph counts the same parameters, and reports the achieved average
    bits read back from the quantized model's weight quantizers.
  * time: wall time of the pytorch_post_training_quantization call (statistics collection,
    mixed-precision search and PTQ together, so unlike bench/search_quality.py's search times it
    includes calibration), torch limited to --threads threads.
  * MCT's own PTQ extras stay at their defaults (MSE thresholds, bias correction, shift-negative
    correction); MCT quantizes every activation tensor at 8 bits, not only the layers' inputs. The
    per-layer bits of each row are in the JSON (--out), named like MCT's graph (`layers_3_conv1_bn`
    is our `layers.3.conv1`), so a config can be re-scored in our own simulator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

import model_compression_toolkit as mct  # noqa: E402
from architectures import ResNet20  # noqa: E402

from search.data import fashion_mnist_splits  # noqa: E402

MODEL = "resnet20-fmnist"
OURS = {  # bench/search_quality.py, same model (fp32 92.27): uniform at the widest fitting width, our best
    2.5: ("17.43 (W2)", "89.02"),
    3.0: ("89.64 (W3)", "91.56"),
    4.0: ("92.03 (W4)", "92.29"),
}


def load_resnet20() -> nn.Module:
    ep = torch.export.load(str(ROOT / "models" / f"{MODEL}.pt2"))
    model = ResNet20()
    exported = dict(ep.state_dict)
    expected = model.state_dict()
    missing = set(expected) - set(exported)
    if missing:
        raise SystemExit(f"archive lacks {sorted(missing)}")
    model.load_state_dict({k: exported[k] for k in expected}, strict=True)
    return model.eval()


@torch.no_grad()
def top1(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(inputs), batch):
        out = model(inputs[i : i + batch])
        if isinstance(out, (list, tuple)):
            out = out[0]
        correct += int((out.argmax(1) == labels[i : i + batch]).sum())
    return 100.0 * correct / len(inputs)


def make_tpc(name: str):
    if name == "imx500":
        return mct.get_target_platform_capabilities()  # what the PTQ facade defaults to: IMX500 TPC v1.0
    if name == "imx500-2to8":
        from model_compression_toolkit.target_platform_capabilities.constants import KERNEL_ATTR, WEIGHTS_N_BITS
        from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc as imx

        base, _, default = imx.get_op_quantization_configs()
        cfgs = [base] + [
            base.clone_and_edit(attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: b}}) for b in (7, 6, 5, 4, 3, 2)
        ]
        return imx.generate_tpc(
            default_config=default, base_config=base, mixed_precision_cfg_list=cfgs, name="imx500_tpc_2to8"
        )
    raise SystemExit(f"unknown --tpc {name}")


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, int, int]]:
    """(name, kernel params, kernel bits) of every weight-quantized layer in MCT's exported model."""
    from mct_quantizers import PytorchQuantizationWrapper

    rows = []
    for name, mod in qmodel.named_modules():
        if isinstance(mod, PytorchQuantizationWrapper) and mod.weights_quantizers:
            for attr, q in mod.weights_quantizers.items():
                w = getattr(mod.layer, attr)
                rows.append((name, int(w.numel()), int(q.num_bits)))
    return rows


def kernel_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[2.5, 3.0, 4.0],
        help="average weight bits over every conv and linear kernel",
    )
    parser.add_argument("--tpc", nargs="+", default=["imx500", "imx500-2to8"], choices=["imx500", "imx500-2to8"])
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--calib-batch", type=int, default=32)
    parser.add_argument(
        "--mp-images", type=int, default=None, help="images for MCT's sensitivity metric (default: MCT's own, 32)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    splits = fashion_mnist_splits(args.calib_size)
    calib, test = splits.calib.inputs, splits.test
    model = load_resnet20()
    fp32 = top1(model, test.inputs, test.labels)
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())[MODEL]["fp32_test_top1"]
    print(f"fp32 test top-1 {fp32:.2f} (manifest {manifest})", flush=True)
    if abs(fp32 - manifest) > 0.01:
        raise SystemExit("fp32 accuracy does not match the manifest: the weights were not copied right")
    n_params = kernel_params(model)
    print(f"conv + linear kernel params: {n_params}", flush=True)

    def representative_data_gen():
        for i in range(0, len(calib), args.calib_batch):
            yield [calib[i : i + args.calib_batch]]

    rows = []
    for tpc_name in args.tpc:
        tpc = make_tpc(tpc_name)
        for avg in args.budgets:
            budget_bytes = n_params * avg / 8
            mp_kwargs = {} if args.mp_images is None else {"num_of_images": args.mp_images}
            core_config = mct.core.CoreConfig(
                mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(**mp_kwargs)
            )
            ru = mct.core.ResourceUtilization(weights_memory=budget_bytes)
            torch.manual_seed(0)
            start = time.perf_counter()
            qmodel, info = mct.ptq.pytorch_post_training_quantization(
                load_resnet20(),
                representative_data_gen,
                target_resource_utilization=ru,
                core_config=core_config,
                target_platform_capabilities=tpc,
            )
            seconds = time.perf_counter() - start
            qmodel = qmodel.cpu().eval()
            layers = quantized_layers(qmodel)
            q_params = sum(p for _, p, _ in layers)
            if q_params != n_params:
                print(f"WARNING: MCT quantized {q_params} kernel params, ours count {n_params}", flush=True)
            bits = sum(p * b for _, p, b in layers) / q_params
            acc = top1(qmodel, test.inputs, test.labels)
            final_ru = getattr(info, "final_resource_utilization", None)
            row = {
                "tpc": tpc_name,
                "avg_wbits_budget": avg,
                "weights_memory_budget_bytes": budget_bytes,
                "mct_weights_memory_bytes": None if final_ru is None else float(final_ru.weights_memory),
                "mct_top1": round(acc, 2),
                "mct_avg_wbits": round(bits, 3),
                "mct_seconds": round(seconds, 1),
                "fp32": round(fp32, 2),
                "bits": {n: b for n, _, b in layers},
                "mp_cfg": None if info is None else info.mixed_precision_cfg,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(
        f"\nMCT {mct.__version__}, torch {torch.__version__}, {MODEL}, fp32 {fp32:.2f}, "
        f"budget = {n_params} kernel params x avg bits / 8 bytes, activations 8 bits\n"
    )
    print(
        "| avg w bits budget | TPC (kernel bits) | MCT top-1 | MCT avg w bits | MCT wall s "
        "| ours: uniform | ours: best |"
    )
    print("|---|---|---|---|---|---|---|")
    choices = {"imx500": "IMX500 v1.0 {2,4,8}", "imx500-2to8": "IMX500 v1.0 rebuilt {2..8}"}
    for r in rows:
        uni, best = OURS.get(r["avg_wbits_budget"], ("-", "-"))
        print(
            f"| {r['avg_wbits_budget']:g} | {choices[r['tpc']]} | {r['mct_top1']:.2f} | {r['mct_avg_wbits']:.2f} "
            f"| {r['mct_seconds']:.1f} | {uni} | {best} |"
        )


if __name__ == "__main__":
    main()
