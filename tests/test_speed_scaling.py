"""Cost that grows sensibly with the model (issue 14, item 3): memory-sized batches, the streamed and chunked
sqnr damage measurement, the work budgets behind the sqnr, haq and validation defaults. The budgets are
exercised by lowering them on the tiny model, so each test takes seconds."""

from __future__ import annotations

import pytest
import torch
from conftest import export_model
from torch import nn

from search import measurement as measurement_module
from search.cost import Budget
from search.model import load_model
from search.searches import SearchContext, SearchOptions, run_search
from search.searches import haq as haq_module
from search.searches import sqnr as sqnr_module
from search.simulate import Simulator, SuffixRunner, batch_size_for


class Stem(nn.Module):
    """A ResNet stem on 224-px colour images: the first feature map is what bounds the batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _ctx(tiny_model, fmnist, tiny_sim, **params) -> SearchContext:
    options = SearchOptions(val_samples=500, params=params)
    return SearchContext("sqnr", tiny_model, fmnist, Budget(avg_wbits=3), options, simulator=tiny_sim)


def test_small_images_run_512_at_once_and_224_px_ones_in_memory_sized_batches(tmp_path, tiny_model):
    assert batch_size_for(tiny_model.gm) == 512
    model = load_model(export_model(Stem(), tmp_path / "stem.pt2", (torch.randn(2, 3, 224, 224),)))
    x = torch.randn(5, 3, 224, 224)
    sim = Simulator(model, x)
    # the first feature map is 64 x 112 x 112 floats, 3.2 MB an image: 41 of them fit 128 MB
    assert sim.batch_size == 41
    sim.batch_size = 2  # batches of 2, 2 and 1 give what one batch gives
    assert torch.allclose(sim.forward(x), Simulator(model, x).forward(x), atol=1e-6)


def test_the_damage_tables_are_the_same_measured_in_chunks(tiny_model, fmnist, tiny_sim, monkeypatch):
    ctx = _ctx(tiny_model, fmnist, tiny_sim)
    whole = sqnr_module.measure_noise(ctx)
    runner = SuffixRunner(tiny_sim, None, ctx.layer_names)
    per_sample = 4 * (runner.kept_elements() + sum(l.out_features for l in tiny_model.layers))
    monkeypatch.setattr(measurement_module, "MEASURE_BYTES", per_sample * 10)  # 64 images in 7 chunks
    chunked = sqnr_module.measure_noise(ctx)
    for n in ctx.layer_names:
        for b, v in whole.w_noise[n].items():
            assert chunked.w_noise[n][b] == pytest.approx(v, rel=1e-3, abs=1e-9)


def test_a_big_model_measures_fewer_images_then_fits_the_middle_widths(tiny_model, fmnist, tiny_sim, monkeypatch):
    ctx = _ctx(tiny_model, fmnist, tiny_sim)
    runner = SuffixRunner(tiny_sim, None, ctx.layer_names)
    assert sqnr_module.measurement_plan(ctx, runner) == (64, False)  # far within the budget
    monkeypatch.setattr(sqnr_module, "MEASURE_WORK", 1.0)
    assert sqnr_module.measurement_plan(ctx, runner) == (sqnr_module.MIN_SAMPLES, True)
    given = _ctx(tiny_model, fmnist, tiny_sim, propagation_samples=32, fitted_widths=False)
    assert sqnr_module.measurement_plan(given, runner) == (32, False)

    full = sqnr_module.measure_noise(_ctx(tiny_model, fmnist, tiny_sim, propagation_samples=8, fitted_widths=False))
    fitted = sqnr_module.measure_noise(_ctx(tiny_model, fmnist, tiny_sim, propagation_samples=8, fitted_widths=True))
    for n in ctx.layer_names:
        f, m = fitted.w_noise[n], full.w_noise[n]
        assert sorted(f) == sorted(m) == list(range(2, 9))
        for b in (2, 3, 4, 8):  # measured: as without the fit (where 8 images say a middle width is noisier than
            # a narrower one, the full table lifts the narrower one to it)
            assert f[b] <= m[b] * (1 + 1e-6) + 1e-12
        assert all(f[b] >= f[b + 1] for b in range(2, 8))  # a wider tensor is never noisier
        for b in (5, 6, 7):  # fitted: the measured damage's order of magnitude
            assert f[b] <= f[4] and (m[b] < 1e-9 or 0.1 < f[b] / m[b] < 10)


def test_the_sweep_on_a_big_model_is_scored_on_fewer_images_and_not_recommended_over_full_ones(
    tiny_model, fmnist, tiny_sim
):
    options = SearchOptions(val_samples=500, params={"sweep_points": 3, "relinearize": 0, "sweep_samples": 100})
    result = run_search("sqnr", tiny_model, fmnist, Budget(avg_wbits=3), options, simulator=tiny_sim)
    at_budget = [c for c in result.candidates if c.meta["limit"] == 3]
    below = [c for c in result.candidates if c.meta["limit"] < 3]
    assert at_budget and all("val_samples" not in c.meta for c in at_budget)
    assert below and all(c.meta["val_samples"] == 100 for c in below)
    assert "val_samples" not in result.recommended.meta


def test_haq_rewards_a_big_model_on_fewer_images(tiny_model, fmnist, tiny_sim, monkeypatch):
    def ctx(**params):
        options = SearchOptions(val_samples=500, params=params)
        return SearchContext("haq", tiny_model, fmnist, Budget(avg_wbits=3), options, simulator=tiny_sim)

    assert haq_module.reward_samples(ctx()) == 512
    assert len(haq_module.reward_data(ctx())) == 512
    monkeypatch.setattr(haq_module, "REWARD_WORK", 1.0)
    assert haq_module.reward_samples(ctx()) == haq_module.MIN_REWARD_SAMPLES
    assert haq_module.reward_samples(ctx(reward_samples=200)) == 200


def test_latency_timing_stops_early_once_its_budget_is_spent():
    from kernels.validate import timed_us

    calls = []
    assert len(timed_us(lambda: calls.append(1), 20, warmup=1, budget_s=0.0)) == 5
    assert len(timed_us(lambda: calls.append(1), 20, warmup=1)) == 20
    assert len(timed_us(lambda: calls.append(1), 20, warmup=1, budget_s=60.0)) == 20
