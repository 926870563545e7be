"""STE fine-tuning (search/finetune.py) and the searches that use it: imprinting (Liu 2021 Algorithm 1)
and HAQ (a fine-tune per episode), on the tiny CNN with small subsets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search.config import QuantConfig
from search.cost import Budget
from search.data import DataSplits
from search.finetune import FineTuneOptions, STEFineTuner, ste_weight, training_set
from search.searches import SearchError, SearchOptions, run_search

FT = FineTuneOptions(epochs=1, samples=256, batch_size=64, lr=1e-3)
PARAMS = {"imprinting": {"patience": 4}, "haq": {"episodes": 8, "warmup": 4, "reward_samples": 256}}
BUDGET = Budget(avg_wbits=4, weight_bytes=16000)


def _snapshot(model, sim):
    """Every float tensor of the caller's model and of the shared simulator's float weights."""
    tensors = {f"model:{k}": v.detach().clone() for k, v in model.used_tensors().items()}
    tensors.update({f"sim:{k}": v.clone() for k, v in sim._float_weights.items()})
    tensors.update({f"sim-bias:{k}": v.clone() for k, v in sim._float_biases.items()})
    return tensors


def _cross_entropy(sim, config, data) -> float:
    sim.apply(config)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(sim.forward(data.inputs), data.labels))


def test_ste_weight_is_the_quantized_weight_with_a_clipped_identity_gradient():
    from search.finetune import clip_threshold
    from search.quant.weight import quantize_weight

    torch.manual_seed(0)
    w = torch.randn(4, 200, requires_grad=True)
    value, w_q = ste_weight(w, 2, "uniform", "mse")
    q = quantize_weight(w.detach(), 2, "uniform", "mse")
    assert torch.equal(value.detach(), q.dequantize()) and torch.equal(w_q, value.detach())
    value.sum().backward()
    inside = w.detach().abs() <= clip_threshold(q)[:, None]
    assert inside.any() and not inside.all()  # ternary MSE clipping cuts the tails
    assert torch.equal(w.grad, inside.float())  # identity inside the clip range, zero outside
    b = torch.randn(3, 8, requires_grad=True)
    value, _ = ste_weight(b, 1, "uniform", "mse")  # binary: no clip, identity everywhere
    value.sum().backward()
    assert (b.grad == 1).all()


@pytest.mark.parametrize("scheme", ["uniform", "apot"])
def test_the_training_forward_is_the_simulation(scheme, tiny_model, fmnist, tiny_sim):
    """Before any step, the STE forward computes exactly what the simulator computes for the config."""
    config = QuantConfig.from_bits(
        tiny_model,
        {"conv1": 8, "dw": 3, "grouped": 2, "pw": 4, "fc1": 2, "fc2": 6},
        {"conv1": 8, "dw": 6, "grouped": 8, "pw": 4, "fc1": 8, "fc2": 16},
        scheme=scheme,
    )
    tuner = STEFineTuner(tiny_model, tiny_sim.stats, training_set(fmnist.train, FT, 0), FT, 0)
    x = fmnist.val.inputs[:64]
    sim = tuner.simulator()
    sim.apply(config)  # what fit() does first: the activation quantizers' ranges
    with torch.no_grad():
        trained = tuner._forward(sim, config, x)
    tiny_sim.apply(config)
    assert torch.allclose(trained, tiny_sim.forward(x), atol=1e-5)


def test_ste_finetuning_recovers_a_badly_quantized_model(tiny_model, fmnist, tiny_sim):
    config = QuantConfig.uniform(tiny_model, 2, 8)
    val = fmnist.val.subset(slice(0, 1000))
    options = FineTuneOptions(epochs=2, samples=1024, lr=1e-3)
    train = training_set(fmnist.train, options, 0)
    before = _snapshot(tiny_model, tiny_sim)
    ptq_top1 = tiny_sim.evaluate(config, val).top1
    ptq_loss = _cross_entropy(tiny_sim, config, train)

    tuner = STEFineTuner(tiny_model, tiny_sim.stats, train, options, 0)
    report = tuner.fit(config)
    tuned = tuner.simulator()
    tuned_top1 = tuned.evaluate(config, val).top1
    tuned_loss = _cross_entropy(tuned, config, train)

    assert report.batches == 2 * 8 and len(report.epoch_losses) == 2
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert tuned_loss < ptq_loss - 0.2, (ptq_loss, tuned_loss)  # the quantized network's training loss fell
    assert tuned_top1 > ptq_top1 + 0.05, (ptq_top1, tuned_top1)  # and its held-out accuracy rose
    after = _snapshot(tiny_model, tiny_sim)
    assert all(torch.equal(before[k], after[k]) for k in before), "fine-tuning changed the caller's weights"
    # the same seed gives the same weights
    again = STEFineTuner(tiny_model, tiny_sim.stats, train, options, 0)
    again.fit(config)
    assert all(torch.equal(again.weights[n], tuner.weights[n]) for n in tuner.weights)


@pytest.mark.parametrize("method", ["imprinting", "haq"])
def test_searches_with_finetuning_fit_the_budget_and_repeat_for_a_seed(method, tiny_model, fmnist, tiny_sim):
    before = _snapshot(tiny_model, tiny_sim)
    ptq_reference = tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 3, 8), fmnist.val.subset(slice(0, 500))).top1

    def search(finetune=FT):
        steps = []
        options = SearchOptions(seed=3, val_samples=500, params=PARAMS[method], finetune=finetune)
        result = run_search(method, tiny_model, fmnist, BUDGET, options, steps.append, simulator=tiny_sim)
        return result, steps

    result, steps = search()
    assert result.candidates
    for c in result.candidates:
        assert c.fits and BUDGET.fits(c.cost) and c.cost.avg_wbits <= 4 and c.cost.weight_bytes <= 16000
        assert 0 <= c.meta["finetuned_val_top1"] <= 1
    assert result.recommended.val_top1 == max(c.val_top1 for c in result.candidates)
    assert result.pareto and result.recommended.pareto
    assert [p.step for p in steps] == sorted(p.step for p in steps) and steps[-1].step == steps[-1].total
    assert any("fine-tune" in p.phase for p in steps)
    # val_top1 is the config on the caller's weights: the shared simulator gives the same number
    for c in result.candidates:
        assert tiny_sim.evaluate(c.config, fmnist.val.subset(slice(0, 500))).top1 == c.val_top1
    # at these widths fine-tuning recovers accuracy
    tuned = [c.meta["finetuned_val_top1"] for c in result.candidates]
    assert sum(tuned) / len(tuned) > sum(c.val_top1 for c in result.candidates) / len(tuned)

    again, _ = search()

    def key(r):
        return [(c.config.w_bits(), c.config.a_bits(), c.val_top1, c.score, c.meta) for c in r.candidates]

    assert key(again) == key(result)
    # the search really fine-tuned: its scores differ from the search without it
    plain, _ = search(FineTuneOptions())
    assert all("finetuned_val_top1" not in c.meta for c in plain.candidates)
    assert [c.score for c in plain.candidates] != [c.score for c in result.candidates]

    after = _snapshot(tiny_model, tiny_sim)
    assert all(torch.equal(before[k], after[k]) for k in before), "the search changed the caller's weights"
    assert (
        tiny_sim.evaluate(QuantConfig.uniform(tiny_model, 3, 8), fmnist.val.subset(slice(0, 500))).top1 == ptq_reference
    )


def test_haq_finetuned_rewards_are_the_same_through_an_executor(tiny_model, fmnist, tiny_sim):
    from concurrent.futures import ThreadPoolExecutor

    from search.searches import SearchContext
    from search.searches.haq import score_episodes

    options = SearchOptions(val_samples=500, params={"reward_samples": 256}, finetune=FT)
    ctx = SearchContext("haq", tiny_model, fmnist, BUDGET, options, simulator=tiny_sim)
    configs = [((8, 3, 2, 4, 2, 8), (8,) * 6), ((2,) * 6, (8,) * 6)]
    serial = score_episodes(ctx, configs)
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert score_episodes(ctx, configs, pool.map) == serial
    assert all(s.finetuned_val_top1 is not None for s in serial)
    plain = SearchContext(
        "haq",
        tiny_model,
        fmnist,
        BUDGET,
        SearchOptions(val_samples=500, params={"reward_samples": 256}),
        simulator=tiny_sim,
    )
    # fine-tuning raises the reward of the all-2-bit config
    assert serial[1].quality > score_episodes(plain, configs[1:])[0].quality


def test_finetuning_is_refused_where_it_cannot_run(tiny_model, fmnist, tiny_sim):
    options = SearchOptions(val_samples=500, finetune=FT)
    with pytest.raises(SearchError, match="method 'sqnr' does not fine-tune"):
        run_search("sqnr", tiny_model, fmnist, BUDGET, options, simulator=tiny_sim)
    no_train = DataSplits("file", fmnist.calib, fmnist.val)
    with pytest.raises(SearchError, match="needs a labelled training set"):
        run_search("imprinting", tiny_model, no_train, BUDGET, options, simulator=tiny_sim)
    with pytest.raises(ValueError):
        SearchOptions(finetune={"epochs": -1})
    assert not SearchOptions().finetune.enabled  # off by default
    assert SearchOptions(finetune={"steps": 3}).finetune.enabled


def test_cli_search_with_finetune_epochs(tiny_model_path, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # a table too wide to wrap
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "bitsearch"),
            "search",
            str(tiny_model_path),
            "--data",
            "fashion-mnist",
            "--method",
            "imprinting",
            "--budget",
            "avg_wbits=4",
            "--calib-size",
            "256",
            "--val-samples",
            "200",
            "--params",
            json.dumps({"patience": 2}),
            "--finetune-epochs",
            "1",
            "--finetune-samples",
            "256",
            "--finetune-lr",
            "0.001",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["candidates"] and all(c["cost"]["avg_wbits"] <= 4 for c in result["candidates"])
    assert all("finetuned_val_top1" in c["meta"] for c in result["candidates"])
    assert "fine-tuned top-1" in proc.stdout and "recommended" in proc.stdout
    bad = subprocess.run(
        [
            str(Path(sys.executable).parent / "bitsearch"),
            "search",
            str(tiny_model_path),
            "--data",
            "fashion-mnist",
            "--method",
            "sqnr",
            "--budget",
            "avg_wbits=4",
            "--finetune-epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert bad.returncode == 2 and "does not fine-tune" in bad.stderr
