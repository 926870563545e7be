"""Graphs exported at a fixed batch size (usually 1, as users export) run batched after loading."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import MODELS, reference_model
from torch import nn

from kernels.validate import validate
from search.config import QuantConfig
from search.cost import Budget
from search.model import load_model
from search.searches import run_search
from search.searches.base import SearchOptions
from search.simulate import Simulator

sys.path.insert(0, str(MODELS))
from architectures import ARCHITECTURES

REFERENCES = ["resnet20-fmnist", "mobilenetv2-fmnist", "mixer-fmnist"]


def export_at(model: nn.Module, example: torch.Tensor, path) -> str:
    """The way the torch docs show it: the example's batch size is fixed in the graph."""
    torch.export.save(torch.export.export(model.eval(), (example,)), str(path))
    return str(path)


def batch1_reference(name: str, path) -> str:
    """The committed reference's weights, exported again at batch 1."""
    module = ARCHITECTURES[name]()
    ep = torch.export.load(str(reference_model(name)))  # our own file: the trusted loader is fine here
    module.load_state_dict({**ep.state_dict, **ep.constants}, strict=False)
    return export_at(module, torch.randn(1, 1, 28, 28), path)


class ViT(nn.Module):
    """A class token expanded to the batch, and nn.MultiheadAttention, which folds the batch into its heads."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 7, 7)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.head(x[:, 0])


class TinyLM(nn.Module):
    """Token ids in, heads split with view(B, T, H, -1), causal attention, logits per token."""

    def __init__(self, vocab=64, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(64, d)
        self.qkv, self.proj, self.lm_head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, ids):
        b, t = ids.shape
        x = self.tokens(ids) + self.positions(torch.arange(t))
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(x.shape[-1], -1))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.lm_head(x + self.proj(a.transpose(1, 2).reshape(b, t, -1)))


class ViewByBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, 2)
        self.fc = nn.Linear(8 * 13 * 13, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1) + torch.zeros(x.shape[0], 8 * 13 * 13))


class SqueezeAll(nn.Module):
    """squeeze() at batch 1 also drops the batch: no batched graph can do what this export does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)).squeeze()).unsqueeze(0)


@pytest.mark.parametrize(
    "model, example",
    [
        (ViT(), torch.randn(1, 1, 28, 28)),
        (TinyLM(), torch.randint(0, 64, (1, 16))),
        (ViewByBatch(), torch.randn(1, 1, 28, 28)),
        (ViT(), torch.randn(4, 1, 28, 28)),  # a fixed batch other than 1
    ],
    ids=["vit-mha", "lm", "view-by-batch", "vit-batch4"],
)
def test_fixed_batch_exports_run_at_any_batch_size(model, example, tmp_path):
    torch.manual_seed(0)
    loaded = load_model(export_at(model, example, tmp_path / "m.pt2"))
    assert loaded.static_batch is None and loaded.exported_batch == example.shape[0], loaded.batch_note
    assert "rewritten to run at any batch size" in loaded.batch_summary
    x = torch.randint(0, 64, (7, 16)) if example.dtype == torch.int64 else torch.randn(7, *example.shape[1:])
    with torch.no_grad():
        # the module is called at the batch size it was exported with, one sample each
        one_by_one = torch.cat([model(x[i : i + 1].expand(example.shape[0], *x.shape[1:]))[:1] for i in range(7)])
        assert torch.allclose(loaded.gm(x), one_by_one, atol=1e-5)
        assert torch.allclose(loaded.gm(x[:1]), one_by_one[:1], atol=1e-5)


def test_a_graph_that_cannot_run_batched_keeps_its_batch_and_says_why(tmp_path):
    model = SqueezeAll()
    loaded = load_model(export_at(model, torch.randn(1, 1, 8, 8), tmp_path / "m.pt2"))
    assert loaded.static_batch == 1
    assert "squeeze" in loaded.batch_note and "'squeeze'" in loaded.batch_note
    assert "runs 1 sample(s) per call" in loaded.batch_summary
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.forward(x), torch.cat([model(x[i : i + 1]) for i in range(3)]), atol=1e-5)


@pytest.mark.parametrize("name", REFERENCES)
def test_batch1_reference_simulates_and_validates_like_the_dynamic_export(name, fmnist, tmp_path):
    dynamic = load_model(reference_model(name))
    fixed = load_model(batch1_reference(name, tmp_path / "b1.pt2"))
    assert fixed.static_batch is None and fixed.exported_batch == 1, fixed.batch_note
    assert [l.name for l in fixed.layers] == [l.name for l in dynamic.layers]
    calib, test = fmnist.calib.inputs[:128], fmnist.test.subset(slice(0, 300))
    g = torch.Generator().manual_seed(0)
    w_bits = {l.name: int(torch.randint(2, 9, (1,), generator=g)) for l in dynamic.layers}
    outputs = []
    for model in (dynamic, fixed):
        sim = Simulator(model, calib)
        sim.apply(QuantConfig.from_bits(model, w_bits, {l.name: 8 for l in model.layers}))
        outputs.append(sim.forward(test.inputs))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)
    r = validate(
        fixed,
        QuantConfig.from_bits(fixed, w_bits, {l.name: 8 for l in fixed.layers}),
        test.inputs,
        test.labels,
        calib,
        batch_sizes=(1, 8),
        repeats=2,
    )
    assert abs(r.top1 - r.sim_top1) <= 0.004, r


@pytest.mark.parametrize("name", REFERENCES)
def test_imprinting_runs_on_a_batch1_export(name, fmnist, tmp_path):
    model = load_model(batch1_reference(name, tmp_path / "b1.pt2"))
    result = run_search(
        "imprinting",
        model,
        fmnist,
        Budget(avg_wbits=4),
        SearchOptions(val_samples=300, params={"patience": 2}),
    )
    assert result.recommended is not None and result.recommended.cost.avg_wbits <= 4
