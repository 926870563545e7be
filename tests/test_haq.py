"""HAQ on the tiny CNN: budget, recommendation, reproducibility, progress, activation bits."""

from __future__ import annotations

import pytest

from search.cost import Budget
from search.searches import SearchContext, SearchOptions, run_search
from search.searches.haq import BudgetEnforcer, action_to_bits, evaluate_episodes, reward_data

FAST = {"episodes": 30, "warmup": 10, "reward_samples": 256}


def _haq(tiny_model, fmnist, sim, budget=Budget(avg_wbits=4), seed=0, progress=None, **options):
    options = SearchOptions(seed=seed, val_samples=500, params=FAST, **options)
    return run_search("haq", tiny_model, fmnist, budget, options, progress, simulator=sim)


@pytest.fixture(scope="module")
def search(tiny_model, fmnist, tiny_sim):
    steps = []
    return _haq(tiny_model, fmnist, tiny_sim, progress=steps.append), steps


def test_candidates_fit_and_the_most_accurate_is_recommended(search):
    result, _ = search
    assert result.candidates
    assert all(result.budget.fits(c.cost) and c.cost.avg_wbits <= 4 for c in result.candidates)
    assert result.recommended.val_top1 == max(c.val_top1 for c in result.candidates)
    # the ten best episode configs and the trained policy's own, each once
    assert len(result.candidates) <= 11
    assert sum(c.meta.get("final_policy", False) for c in result.candidates) <= 1


def test_progress_is_monotone_and_ends_at_the_total(search):
    _, steps = search
    assert [p.step for p in steps] == sorted(p.step for p in steps)
    assert steps[-1].step == steps[-1].total == FAST["episodes"]
    assert steps[-1].best is not None


def test_same_seed_same_configs(search, tiny_model, fmnist, tiny_sim):
    def configs(result):
        return [(c.config.w_bits(), c.config.a_bits()) for c in result.candidates]

    first, _ = search
    assert configs(_haq(tiny_model, fmnist, tiny_sim)) == configs(first)


def test_activation_bits_come_from_the_choices(tiny_model, fmnist, tiny_sim):
    budget = Budget(bitops=4_000_000)
    result = _haq(tiny_model, fmnist, tiny_sim, budget=budget, a_bits=[4, 8])
    used = {b for c in result.candidates for b in c.config.a_bits().values()}
    assert result.candidates and used <= {4, 8} and len(used) > 1
    assert all(c.cost.bitops <= 4_000_000 for c in result.candidates)


def test_actions_snap_to_non_contiguous_choices():
    choices = [2, 4, 8]
    assert [action_to_bits(a, choices) for a in (0.0, 0.3, 0.45, 0.75, 1.0)] == [2, 4, 4, 8, 8]
    assert action_to_bits(0.5, [3]) == 3


def test_reward_images_are_held_out_from_the_candidates_images(tiny_model, fmnist, tiny_sim):
    options = SearchOptions(val_samples=500, params={"reward_samples": 256})
    ctx = SearchContext("haq", tiny_model, fmnist, Budget(avg_wbits=4), options, simulator=tiny_sim)
    data = reward_data(ctx)
    assert len(data) == 256
    assert data.inputs.data_ptr() == fmnist.val.inputs[500:].data_ptr()  # right after the scoring images
    # a batch scored through another map gives the same rewards
    configs = [((8,) * 6, (8,) * 6), ((2,) * 6, (8,) * 6)]
    calls = []

    def tracked_map(fn, items):
        calls.append(len(items))
        return [fn(item) for item in items]

    rewards = evaluate_episodes(ctx, configs, tracked_map, data)
    assert calls == [2] and rewards == evaluate_episodes(ctx, configs, data=data)
    assert rewards[0] > rewards[1]


def test_budget_enforcement_lowers_until_it_fits_and_spares_pinned_layers(tiny_model, fmnist, tiny_sim):
    ctx = SearchContext(
        "haq",
        tiny_model,
        fmnist,
        Budget(avg_wbits=4, act_bytes=3200),
        SearchOptions(a_bits=[4, 8], val_samples=500),
        simulator=tiny_sim,
    )
    names = ctx.layer_names
    ends = {(names[0], "w"), (names[-1], "w"), (names[0], "a"), (names[-1], "a")}
    w, a = ctx.uniform_bits(8), ctx.uniform_bits(8)
    BudgetEnforcer(ctx, ends).enforce(w, a)
    assert ctx.fits(w, a)
    assert w[names[0]] == w[names[-1]] == 8 and a[names[0]] == a[names[-1]] == 8
    # only the depthwise conv's input (6272 bytes at 8 bits) breaks act_bytes: only it is lowered
    assert min(w.values()) < 8 and a == {**ctx.uniform_bits(8), "dw": 4}
