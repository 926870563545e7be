"""The bit-allocation searches on a real (tiny) model, and imprinting on the reference ResNet-20."""

from __future__ import annotations

import math

import pytest
from conftest import reference_model

from search.cost import Budget, BudgetError
from search.searches import SearchContext, SearchError, SearchOptions, run_search
from search.searches.sqnr import _solve_analytic, measure_noise, solve_exact

FAST = {
    "uniform": {},
    "random": {"count": 6},
    "sqnr": {"mode": "exact", "sweep_points": 3},
    "sqnr-analytic": {"mode": "analytic", "sweep_points": 3},
    "sqnr-measured": {"mode": "exact", "sweep_points": 3, "propagation": "measured"},
    "imprinting": {"variant": "faithful", "patience": 4},
    "imprinting-cost": {"variant": "cost_aware", "patience": 4},
    "imprinting-noise": {"variant": "noise_aware", "patience": 4},
    "haq": {"episodes": 12, "warmup": 4, "reward_samples": 256},
}


def _run(method_key, tiny_model, fmnist, sim, budget, seed=0, progress=None):
    method = method_key.split("-")[0]
    options = SearchOptions(seed=seed, val_samples=500, params=FAST[method_key])
    return run_search(method, tiny_model, fmnist, budget, options, progress, simulator=sim)


@pytest.mark.parametrize("method_key", list(FAST))
def test_every_candidate_fits_and_the_best_is_recommended(method_key, tiny_model, fmnist, tiny_sim):
    budget = Budget(avg_wbits=4, weight_bytes=16000)
    steps = []
    result = _run(method_key, tiny_model, fmnist, tiny_sim, budget, progress=steps.append)
    assert result.candidates, "no candidate"
    for c in result.candidates:
        assert budget.fits(c.cost) and c.cost.avg_wbits <= 4 and c.cost.weight_bytes <= 16000
        assert set(c.config.w_bits().values()) <= set(range(2, 9)) and set(c.config.a_bits().values()) == {8}
    assert result.recommended.val_top1 == max(c.val_top1 for c in result.candidates)
    assert result.pareto and result.recommended.pareto
    # progress: monotone, ends at its total
    assert [p.step for p in steps] == sorted(p.step for p in steps)
    assert steps[-1].step == steps[-1].total


@pytest.mark.parametrize("method_key", ["random", "sqnr", "imprinting", "haq"])
def test_same_seed_same_result(method_key, tiny_model, fmnist, tiny_sim):
    def configs():
        result = _run(method_key, tiny_model, fmnist, tiny_sim, Budget(avg_wbits=3.5), seed=7)
        return [(c.config.w_bits(), c.config.a_bits(), c.val_top1) for c in result.candidates]

    assert configs() == configs()


def test_searches_beat_uniform_at_the_same_budget(tiny_model, fmnist, tiny_sim):
    budget = Budget(avg_wbits=2.5)
    uniform = _run("uniform", tiny_model, fmnist, tiny_sim, budget).recommended.val_top1
    for method_key in ("sqnr", "imprinting-noise"):
        assert _run(method_key, tiny_model, fmnist, tiny_sim, budget).recommended.val_top1 > uniform, method_key


@pytest.mark.parametrize(
    "method,params,bitops,avg_wbits",
    [
        ("sqnr", {"sweep_points": 2}, 4_000_000, None),
        ("haq", {"episodes": 12, "warmup": 4, "reward_samples": 256}, 4_000_000, None),
        # imprinting never lowers the first and last layer: at 8/8 bits they alone cost 3.6 M BitOPs here
        ("imprinting", {"variant": "noise_aware", "patience": 4}, 6_000_000, None),
        # avg_wbits is the budget's main metric but BitOPs is the limit that binds
        ("imprinting", {"variant": "noise_aware", "patience": 4}, 6_000_000, 7.0),
    ],
)
def test_activation_bits_can_be_searched(method, params, bitops, avg_wbits, tiny_model, fmnist, tiny_sim):
    options = SearchOptions(a_bits=[4, 6, 8], val_samples=500, params=params)
    budget = Budget(bitops=bitops, avg_wbits=avg_wbits)
    result = run_search(method, tiny_model, fmnist, budget, options, simulator=tiny_sim)
    used = {b for c in result.candidates for b in c.config.a_bits().values()}
    assert used <= {4, 6, 8} and len(used) > 1
    assert all(c.cost.bitops <= bitops for c in result.candidates)


def test_haq_episodes_can_be_scored_through_an_executor(tiny_model, fmnist, tiny_sim):
    from concurrent.futures import ThreadPoolExecutor

    from search.searches.haq import haq_search

    options = SearchOptions(
        val_samples=500, params={"episodes": 8, "warmup": 4, "batch_episodes": 4, "reward_samples": 256}
    )
    calls = []
    with ThreadPoolExecutor(max_workers=1) as pool:

        def tracked_map(fn, items):
            items = list(items)
            calls.append(len(items))
            return pool.map(fn, items)

        ctx = SearchContext("haq", tiny_model, fmnist, Budget(avg_wbits=4), options, simulator=tiny_sim)
        haq_search(ctx, map_fn=tracked_map)
    assert calls == [4, 4] and ctx.result().recommended is not None


def test_infeasible_budget_fails_before_the_search(tiny_model, fmnist, tiny_sim):
    with pytest.raises(BudgetError, match="avg_wbits <= 1 is infeasible; the smallest feasible value is 2"):
        run_search("sqnr", tiny_model, fmnist, Budget(avg_wbits=1), SearchOptions(), simulator=tiny_sim)


def test_unknown_method_and_bad_options_are_refused(tiny_model, fmnist, tiny_sim):
    with pytest.raises(SearchError, match="unknown search method 'annealing'"):
        run_search("annealing", tiny_model, fmnist, Budget(avg_wbits=4), simulator=tiny_sim)
    for params, message in [
        ({"mode": "greedy"}, "sqnr option mode: Input should be 'exact' or 'analytic'"),
        ({"propagation_samples": 0}, "sqnr option propagation_samples: .*greater than or equal to 1"),
        ({"propagation": "x"}, "sqnr option propagation: Input should be 'features', 'measured'"),
        ({"relinearise": 3}, "unknown sqnr option.*'relinearise'; sqnr takes: .*relinearize"),
        ({"output_weight": "2"}, "sqnr option output_weight: Input should be a valid number"),
    ]:
        with pytest.raises(SearchError, match=message):
            run_search(
                "sqnr", tiny_model, fmnist, Budget(avg_wbits=4), SearchOptions(params=params), simulator=tiny_sim
            )
    for method, params in [
        ("haq", {"episode": 10}),
        ("imprinting", {"patients": 3}),
        ("uniform", {"count": 3}),
        ("random", {"counts": 3}),
    ]:
        with pytest.raises(SearchError, match=f"unknown {method} option"):
            run_search(
                method, tiny_model, fmnist, Budget(avg_wbits=4), SearchOptions(params=params), simulator=tiny_sim
            )
    with pytest.raises(ValueError, match="w_bits choices"):
        SearchOptions(w_bits=[0, 4])


@pytest.mark.parametrize("avg_wbits", [2.25, 2.5, 3.0, 4.0, 6.0])
def test_exact_sqnr_never_models_less_output_sqnr_than_analytic(avg_wbits, tiny_model, fmnist, tiny_sim):
    ctx = SearchContext(
        "sqnr", tiny_model, fmnist, Budget(avg_wbits=avg_wbits), SearchOptions(val_samples=500), simulator=tiny_sim
    )
    noise = measure_noise(ctx)
    limits = ctx.budget.limits()
    exact, analytic = solve_exact(ctx, noise, limits), _solve_analytic(ctx, noise, limits)
    assert ctx.fits(*exact) and ctx.fits(*analytic)
    assert noise.output_sqnr_db(*exact) >= noise.output_sqnr_db(*analytic) - 1e-9


def test_sqnr_damage_table_matches_a_whole_forward(tiny_model, fmnist, tiny_sim):
    """measure_damage recomputes only the layers downstream of the one it changes; the entries must
    equal what running the whole network under each config gives."""
    from search.searches.sqnr import _nmse, measure_damage

    ctx = SearchContext(
        "sqnr",
        tiny_model,
        fmnist,
        Budget(avg_wbits=3),
        SearchOptions(w_bits=[2, 3], val_samples=500),
        simulator=tiny_sim,
    )
    names = ctx.layer_names
    base_w, base_a = ctx.uniform_bits(3), ctx.uniform_bits(8)
    table = measure_damage(ctx, base_w, base_a)
    x = fmnist.calib.inputs[:64]

    def damage(w_bits):
        tiny_sim.set_float()
        runner = tiny_sim.incremental(x)
        runner.run()
        ref = {n: runner.layer_output(n).clone() for n in names}
        ref_out = runner.output().clone()
        for n in names:
            tiny_sim.set_layer(n, w_bits[n], 8)
        runner.run()
        features = sum(_nmse(runner.layer_output(n), ref[n]) for n in names) / len(names)
        out = features + 2.0 * _nmse(runner.output(), ref_out)
        tiny_sim.set_float()
        return out

    base = damage(base_w)
    for n in names:
        assert table.w_noise[n][2] - table.w_noise[n][3] == pytest.approx(damage({**base_w, n: 2}) - base, rel=1e-4)


def test_sqnr_relinearizes_around_its_allocation_and_spends_the_budget(tiny_model, fmnist, tiny_sim):
    budget = Budget(avg_wbits=2.25)  # the tiny model's fc1 holds most weights: a tight budget moves the others
    result = _run("sqnr", tiny_model, fmnist, tiny_sim, budget)
    rounds = [c for c in result.candidates if c.meta.get("relinearized")]
    assert rounds and all(c.fits and c.meta["limit"] == 2.25 for c in rounds)
    assert all(math.isfinite(c.score) for c in result.candidates)
    ctx = SearchContext("sqnr", tiny_model, fmnist, budget, SearchOptions(val_samples=500), simulator=tiny_sim)
    for c in result.candidates:  # refilled: no layer can take the next width within the candidate's limit
        w, a = c.config.w_bits(), c.config.a_bits()
        limits = {"avg_wbits": c.meta["limit"]}
        for n, b in w.items():
            if b < 8:
                assert ctx.cost({**w, n: b + 1}, a).avg_wbits > limits["avg_wbits"] * (1 + 1e-9)


@pytest.mark.slow
def test_imprinting_accuracy_rises_with_depth_and_ends_near_the_true_accuracy(fmnist):
    from scipy.stats import spearmanr

    from search.config import QuantConfig
    from search.model import load_model
    from search.searches.imprinting import LayerAccuracy
    from search.simulate import Simulator, evaluate_float

    model = load_model(reference_model("resnet20-fmnist"))
    from search.data import fashion_mnist_splits

    splits = fashion_mnist_splits(calib_size=1024)
    ctx = SearchContext(
        "imprinting",
        model,
        splits,
        Budget(avg_wbits=8),
        SearchOptions(val_samples=100),
        simulator=Simulator(model, splits.calib.inputs),
    )
    ctx.sim.apply(QuantConfig.uniform(model, 8, 8))
    acc = LayerAccuracy(ctx, 256).update(None)
    assert spearmanr(range(len(acc)), acc).statistic > 0.8, acc
    assert sum(acc[-5:]) / 5 > sum(acc[:5]) / 5 + 0.1
    true_acc = evaluate_float(model, splits.test)
    assert abs(acc[-1] - true_acc) < 0.05, (acc[-1], true_acc)


def test_refill_gives_the_leftover_budget_back_until_no_raise_fits(tiny_model, fmnist, tiny_sim):
    from search.searches.widen import refill

    budget = Budget(avg_wbits=4.5)
    ctx = SearchContext("imprinting", tiny_model, fmnist, budget, SearchOptions(val_samples=500), simulator=tiny_sim)
    names = ctx.layer_names
    w_bits, a_bits = ctx.uniform_bits(3), ctx.uniform_bits(8)
    noise = lambda name, bits: 10 ** (-tiny_sim.weight_sqnr_db(name, bits) / 10)  # noqa: E731
    inner = {n: 1.0 for n in names[1:-1]}
    wb, ab = refill(ctx, w_bits, a_bits, inner, {"w": noise})
    assert ab == a_bits and ctx.fits(wb, ab)
    assert ctx.cost(wb, ab).avg_wbits > ctx.cost(w_bits, a_bits).avg_wbits
    assert wb[names[0]] == 3 and wb[names[-1]] == 3  # the first and last layer are not Algorithm 2's to change
    for n in inner:  # no inner layer can take one more bit
        if wb[n] < 8:
            assert not ctx.fits({**wb, n: wb[n] + 1}, ab)
