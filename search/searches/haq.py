"""HAQ: a DDPG agent picks bits layer by layer (Wang et al., CVPR 2019; REFERENCE.md section 5).

One step per layer for the weight bits, and a second step for the input-activation bits when
more than one activation width is allowed (HAQ's "linear environment"). The state is the
layer description [is_depthwise, c_in, c_out, stride, kernel, params, in_h*in_w, index,
previous action, weight/activation flag], min-max normalised across steps. The actor's action
a in [0, 1] maps to round(a*(b_max + 0.5 - (b_min - 0.5)) + b_min - 0.5), snapped to the nearest
allowed width. After an episode a config that breaks the budget is lowered one width at a time
at the layer whose modelled noise grows least per unit of cost saved (the original walks back
from the last layer). The reward, 0.1 * (top-1 - float top-1) on a fixed held-out slice of the
validation split (the original used training data), minus a moving-average baseline, goes to
every step of the episode.

DDPG as in the paper: actor and critic 300-300, Adam lr 1e-4 / 1e-3, tau 0.01, discount 1,
batch 64, replay 128 * steps per episode, warm-up episodes of random actions, truncated-normal
exploration noise sigma 0.5 decayed x0.99 per episode; the replay keeps the episodes in the
top 30% by reward (NNCF AutoQ). Episodes are scored in batches through `map_fn`, so a caller
can fan the scoring out to an executor.

Options (`params`): episodes (200), warmup (20), reward_samples (512), batch_episodes (1),
first_last_8bit (false).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterable

import torch
from torch import nn

from ..quant.activation import FLOAT_ACT_BITS
from .base import SearchContext

HIDDEN = 300
LR_ACTOR, LR_CRITIC = 1e-4, 1e-3
TAU, DISCOUNT, BATCH = 0.01, 1.0, 64
SIGMA, SIGMA_DECAY = 0.5, 0.99
TOP_FRACTION = 0.3


def _mlp(inputs: int, out_act: nn.Module | None) -> nn.Sequential:
    layers = [nn.Linear(inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)]
    return nn.Sequential(*layers, *([out_act] if out_act else []))


def _states(ctx: SearchContext, search_act: bool) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Per step: the layer features (previous action filled in at run time), and (layer, 'w'|'a')."""
    rows, steps = [], []
    for layer in ctx.model.layers:
        linear = layer.op == "linear"
        spatial = 1 if linear else math.prod(layer.in_shape[1:])
        features = [float(layer.is_depthwise), layer.c_in, layer.c_out, 0 if linear else layer.stride[0],
                    1 if linear else layer.kernel[0], layer.params, spatial, layer.index]
        for kind in ("w", "a") if search_act else ("w",):
            rows.append(features + [0.0, 1.0 if kind == "w" else 0.0])
            steps.append((layer.name, kind))
    s = torch.tensor(rows, dtype=torch.float32)
    lo, hi = s.min(0).values, s.max(0).values
    return (s - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), steps


def action_to_bits(a: float, choices: list[int]) -> int:
    lo, hi = min(choices), max(choices)
    bits = round(a * (hi + 0.5 - (lo - 0.5)) + lo - 0.5)
    return min(choices, key=lambda b: (abs(b - bits), -b))


def enforce_budget(ctx: SearchContext, w: dict[str, int], a: dict[str, int], noise) -> None:
    """Lower, one width at a time, the tensor whose noise grows least per unit of cost saved, until it fits."""
    metric = ctx.pareto_metric
    a_choices = [b for b in ctx.options.a_bits]
    while not ctx.fits(w, a):
        base = getattr(ctx.cost(w, a), metric)
        best, best_ratio = None, math.inf
        for name in ctx.layer_names:
            for kind, bits, choices in (("w", w, ctx.options.w_bits), ("a", a, a_choices)):
                i = choices.index(bits[name])
                if i == 0:
                    continue
                trial = dict(bits)
                trial[name] = choices[i - 1]
                tw, ta = (trial, a) if kind == "w" else (w, trial)
                saved = base - getattr(ctx.cost(tw, ta), metric)
                if saved <= 0:
                    continue
                ratio = (noise(name, kind, choices[i - 1]) - noise(name, kind, bits[name])) / saved
                if ratio < best_ratio:
                    best, best_ratio = (bits, name, choices[i - 1]), ratio
        if best is None:  # only metrics the lowering cannot reduce are violated
            return
        bits, name, value = best
        bits[name] = value


def evaluate_episodes(score: Callable[[tuple], float], configs: list[tuple], map_fn=map) -> list[float]:
    """Score a batch of configs; pass an executor's map to fan the work out."""
    return list(map_fn(score, configs))


def haq_search(ctx: SearchContext, map_fn: Callable[[Callable, Iterable], Iterable] = map) -> None:
    o = ctx.options
    episodes = o.param("episodes", 200)
    warmup = min(o.param("warmup", 20), episodes)
    batch_episodes = max(1, o.param("batch_episodes", 1))
    pin_ends = o.param("first_last_8bit", False)
    torch.manual_seed(o.seed)
    rng = random.Random(o.seed)
    gen = torch.Generator().manual_seed(o.seed)

    search_act = len(o.a_bits) > 1
    states, steps = _states(ctx, search_act)
    n_steps = len(steps)
    # Reward data: a fixed slice of the validation split after the images candidates are scored on.
    reward_samples = o.param("reward_samples", 512)
    val = ctx.splits.val
    reward_set = val.subset(slice(o.val_samples, o.val_samples + reward_samples)) if len(val) >= o.val_samples + \
        reward_samples else val.subset(slice(0, reward_samples))
    labelled = reward_set.labels is not None
    float_res = ctx.sim.evaluate(None, reward_set)
    fp_quality = float_res.top1 if labelled else None

    def quality(res) -> float:
        return res.top1 if labelled else min(res.sqnr_db, 100.0) / 100

    w_db: dict[tuple, float] = {}

    def noise(name: str, kind: str, bits: int) -> float:
        if kind == "a" and bits >= FLOAT_ACT_BITS:
            return 0.0
        key = (name, kind, bits)
        if key not in w_db:
            db = (ctx.sim.weight_sqnr_db(name, bits, o.scheme, o.clip) if kind == "w"
                  else ctx.sim.activation_sqnr_db(name, bits, o.act_calibration))
            w_db[key] = 10 ** (-db / 10)
        return w_db[key]

    cache: dict[tuple, float] = {}

    def score(key: tuple) -> float:
        if key not in cache:
            w = dict(zip(ctx.layer_names, key[0]))
            a = dict(zip(ctx.layer_names, key[1]))
            cache[key] = quality(ctx.sim.evaluate(ctx.config(w, a), reward_set))
        return cache[key]

    actor, critic = _mlp(states.shape[1], nn.Sigmoid()), _mlp(states.shape[1] + 1, None)
    actor_target, critic_target = _mlp(states.shape[1], nn.Sigmoid()), _mlp(states.shape[1] + 1, None)
    actor_target.load_state_dict(actor.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    opt_actor = torch.optim.Adam(actor.parameters(), LR_ACTOR)
    opt_critic = torch.optim.Adam(critic.parameters(), LR_CRITIC)
    replay: list[tuple[float, list[tuple]]] = []  # (episode reward, transitions)
    replay_cap = 128 * n_steps
    baseline = None
    sigma = SIGMA
    trials: dict[tuple, float] = {}  # config key -> reward quality

    def rollout(explore: bool, random_actions: bool):
        w = {n: max(o.w_bits) for n in ctx.layer_names}
        a = {n: max(o.a_bits) for n in ctx.layer_names}
        prev, transitions = 0.0, []
        for i, (name, kind) in enumerate(steps):
            s = states[i].clone()
            s[8] = prev
            if random_actions:
                action = rng.random()
            else:
                with torch.no_grad():
                    action = float(actor(s[None]))
                if explore:
                    # truncated normal around the policy's action, within [0, 1]
                    for _ in range(100):
                        trial = action + sigma * float(torch.randn((), generator=gen))
                        if 0.0 <= trial <= 1.0:
                            action = trial
                            break
                    else:
                        action = min(max(action, 0.0), 1.0)
            choices = o.w_bits if kind == "w" else o.a_bits
            bits = action_to_bits(action, choices)
            if pin_ends and kind == "w" and name in (ctx.layer_names[0], ctx.layer_names[-1]):
                bits = max(choices)
            (w if kind == "w" else a)[name] = bits
            transitions.append((s, action))
            prev = action
        enforce_budget(ctx, w, a, noise)
        return w, a, transitions

    def update() -> None:
        pool = [t for _, ts in replay for t in ts]
        if len(pool) < BATCH:
            return
        batch = [pool[rng.randrange(len(pool))] for _ in range(BATCH)]
        s = torch.stack([b[0] for b in batch])
        act = torch.tensor([[b[1]] for b in batch])
        r = torch.tensor([[b[2]] for b in batch])
        s2 = torch.stack([b[3] for b in batch])
        done = torch.tensor([[b[4]] for b in batch])
        with torch.no_grad():
            target = r + DISCOUNT * (1 - done) * critic_target(torch.cat([s2, actor_target(s2)], 1))
        critic_loss = nn.functional.mse_loss(critic(torch.cat([s, act], 1)), target)
        opt_critic.zero_grad()
        critic_loss.backward()
        opt_critic.step()
        actor_loss = -critic(torch.cat([s, actor(s)], 1)).mean()
        opt_actor.zero_grad()
        actor_loss.backward()
        opt_actor.step()
        with torch.no_grad():
            for net, tgt in ((actor, actor_target), (critic, critic_target)):
                for p, tp in zip(net.parameters(), tgt.parameters()):
                    tp.mul_(1 - TAU).add_(TAU * p)

    done_episodes = 0
    while done_episodes < episodes:
        batch = []
        for _ in range(min(batch_episodes, episodes - done_episodes)):
            batch.append(rollout(explore=True, random_actions=done_episodes + len(batch) < warmup))
        keys = [(tuple(w[n] for n in ctx.layer_names), tuple(a[n] for n in ctx.layer_names)) for w, a, _ in batch]
        qualities = evaluate_episodes(score, keys, map_fn)
        for (w, a, transitions), key, q in zip(batch, keys, qualities):
            trials[key] = q
            reward = 0.1 * (q - (fp_quality if fp_quality is not None else 0.0))
            baseline = reward if baseline is None else 0.5 * baseline + 0.5 * reward
            advantage = reward - baseline
            episode = []
            for i, (s, action) in enumerate(transitions):
                last = i == len(transitions) - 1
                s2 = s if last else transitions[i + 1][0]
                episode.append((s, action, advantage, s2, float(last)))
            replay.append((reward, episode))
            done_episodes += 1
            if done_episodes > warmup:
                # keep the best 30% of episodes (AutoQ), within the replay size
                replay.sort(key=lambda e: -e[0])
                keep = max(1, min(math.ceil(TOP_FRACTION * len(replay)), replay_cap // n_steps))
                del replay[keep:]
                for _ in range(n_steps):
                    update()
                sigma *= SIGMA_DECAY
            ctx.report(done_episodes, episodes + 1, "haq")

    w, a, _ = rollout(explore=False, random_actions=False)
    final = (tuple(w[n] for n in ctx.layer_names), tuple(a[n] for n in ctx.layer_names))
    trials.setdefault(final, score(final))
    # Candidates: the policy's final config and the ten best configs the episodes found.
    best = sorted(trials.items(), key=lambda kv: -kv[1])[:10]
    for key, q in [(final, trials[final])] + best:
        ctx.add_candidate(dict(zip(ctx.layer_names, key[0])), dict(zip(ctx.layer_names, key[1])), score=q,
                          reward_top1=q, final_policy=key == final)
    ctx.report(episodes + 1, episodes + 1, "haq")
