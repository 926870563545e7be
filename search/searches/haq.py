"""HAQ: a DDPG agent picks bits layer by layer (Wang et al., CVPR 2019; docs/methods.md#haq).

The method, as in the paper and its code (mit-han-lab/haq):

- One step per layer for the weight bits; when more than one activation width is allowed, a second
  step per layer for its input-activation bits (HAQ's "linear environment"). The state is the
  layer description [is_depthwise, c_in, c_out, stride, kernel, params, in_h*in_w, index,
  previous action, weight/activation flag], min-max normalised across steps; a linear layer reads
  as type 0, in/out features, stride 0, kernel 1.
- The actor's action a in [0, 1] maps to round(a*(b_max + 0.5 - (b_min - 0.5)) + b_min - 0.5).
- DDPG: actor and critic 300-300 (the critic adds the state and action projections, as in the
  original), Adam lr 1e-4 / 1e-3, tau 0.01, discount 1, batch 64, one update per step after the
  warm-up episodes of random actions, truncated-normal exploration noise sigma 0.5 decayed x0.99
  per episode, a moving-average baseline (alpha 0.5) subtracted from the sampled rewards.
- Reward 0.1 * (top-1 quantized - top-1 float), given to every step of the episode.

Where we differ, and why:

- Actions snap to the nearest allowed width, so choices may be non-contiguous (NNCF AutoQ).
- A config over budget is lowered one width at a time where the quantization noise (1/SQNR of the
  layer's weights or input) grows least per unit of cost saved, measured on the violated budget
  metrics; the original walks back from the last layer. First and last layers are pinned to
  8 bits only when `first_last_8bit` is set (the original always pins them).
- The reward is measured on a fixed held-out slice of the validation split, after the images the
  candidates are scored on (the original measures on training data). Without labels, the output
  SQNR in dB / 100 stands in for the accuracy.
- Fine-tuning before the reward (the original fine-tunes for one epoch) is optional and off by
  default: `SearchOptions.finetune` (epochs, or a number of minibatch steps) fine-tunes a fresh
  copy of the caller's weights under the episode's config with the straight-through estimator
  (search/finetune.py), and the reward is that fine-tuned network's accuracy on the reward images.
  Every episode starts from the caller's weights and draws the same minibatch order (the search's
  seed), so a config's reward does not depend on when it was reached and the per-config cache and
  the pluggable `map_fn` stay valid; the caller's model and the context's simulator are not touched.
- The replay holds 128 episodes; once full, a new episode replaces a random one from the lower 70%
  by reward, so the top 30% stay (NNCF AutoQ).
- Rewards are cached per config, and episodes are scored through `evaluate_episodes`, whose
  `map_fn` a caller can replace with an executor's map (see `batch_episodes`).
- Only the ten best configs found (by reward accuracy) and the final noise-free policy's config
  become candidates; scoring every episode on the validation split would cost more than the search.
  A candidate's `val_top1` is always the config on the CALLER's weights (post-training quantization,
  as for every method). With fine-tuning on, its `score` is the fine-tuned reward accuracy and
  `meta.finetuned_val_top1` the fine-tuned network's top-1 on the validation images (measured in the
  same call as the reward; it never feeds the agent); the fine-tuned weights are not returned.

Options (`params`): episodes (200), warmup (20), reward_samples (512, fewer on big models), batch_episodes (1: episodes
rolled out with the same policy and scored together), first_last_8bit (false); fine-tuning is the
shared `SearchOptions.finetune` block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from statistics import NormalDist

import torch
from pydantic import Field
from torch import nn

from ..cost import layer_costs, over_limit
from ..data import LabelledSet
from ..finetune import finetuned_simulator
from ..measurement import ScorePass, tensor_sha256
from ..quant.activation import FLOAT_ACT_BITS
from .base import MethodParams, SearchContext

HIDDEN = 300
LR_ACTOR, LR_CRITIC = 1e-4, 1e-3
TAU, DISCOUNT, BATCH = 0.01, 1.0, 64
SIGMA, SIGMA_DECAY = 0.5, 0.99
BASELINE_ALPHA = 0.5
REWARD_SCALE = 0.1
REPLAY_EPISODES = 128
KEEP_FRACTION = 0.3  # of the replay, by reward, never evicted
FINAL_LAYER_INIT = 3e-3  # the original's init_w: the first actions sit near 0.5
TOP_CANDIDATES = 10
# Scoring one episode (search.simulate.layer_work per image) may cost this much, about 5 s on 2 cores, before the
# default reward uses fewer images: a 224-px ResNet-18 scores 100 episodes on 170 images in about 10 minutes.
REWARD_WORK = 8e11
MIN_REWARD_SAMPLES = 64
MAX_SQNR_DB = 100.0  # unlabelled reward: SQNR / 100 dB, so a perfect output scores 1 like top-1 does

PREV_ACTION = 8  # column of the state that holds the previous action
Config = tuple[tuple[int, ...], tuple[int, ...]]  # (weight bits, activation bits) in layer order


# -- the environment: states, actions, budget -------------------------------------------------------


def layer_states(ctx: SearchContext, search_activations: bool) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """The normalised state of every step (previous action left at 0) and its (layer, 'w' | 'a')."""
    rows, steps = [], []
    for layer in ctx.model.layers:
        if layer.op == "linear":
            stride, kernel, positions = 0, 1, 1
        else:
            stride, kernel, positions = layer.stride[0], layer.kernel[0], math.prod(layer.in_shape[1:])
        features = [
            float(layer.is_depthwise),
            layer.c_in,
            layer.c_out,
            stride,
            kernel,
            layer.params,
            positions,
            layer.index,
        ]
        for kind in ("w", "a") if search_activations else ("w",):
            rows.append(features + [0.0, 1.0 if kind == "w" else 0.0])
            steps.append((layer.name, kind))
    s = torch.tensor(rows, dtype=torch.float64)
    lo, hi = s.min(0).values, s.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((s - lo) / span).float(), steps


def action_to_bits(action: float, choices: list[int]) -> int:
    """HAQ's linear map of [0, 1] onto [b_min, b_max], then the nearest allowed width (ties go up)."""
    lo, hi = min(choices), max(choices)
    bits = round(action * (hi + 0.5 - (lo - 0.5)) + lo - 0.5)
    return min(choices, key=lambda b: (abs(b - bits), -b))


def pinned_bits(choices: list[int]) -> int:
    """The original pins first and last layers to 8 bits: the widest choice up to 8."""
    return max((b for b in choices if b <= 8), default=max(choices))


class BudgetEnforcer:
    """Lowers an over-budget config where the added noise per unit of cost saved is least."""

    def __init__(self, ctx: SearchContext, pinned: set[tuple[str, str]]):
        self.ctx = ctx
        self.pinned = pinned
        self.limits = ctx.budget.limits()
        self.latency = ctx.latency if ctx.budget.latency_us is not None else None
        self._noise: dict[tuple, float] = {}
        self._shares: dict[tuple, dict[str, float]] = {}

    def noise(self, name: str, kind: str, bits: int) -> float:
        """1/gamma, the noise-to-signal power ratio of the layer's weights or input at these bits."""
        if kind == "a" and bits >= FLOAT_ACT_BITS:
            return 0.0
        key = (name, kind, bits)
        if key not in self._noise:
            o, sim = self.ctx.options, self.ctx.sim
            db = (
                sim.weight_sqnr_db(name, bits, o.scheme, o.clip)
                if kind == "w"
                else sim.activation_sqnr_db(name, bits, o.act_calibration)
            )
            self._noise[key] = 10 ** (-db / 10)
        return self._noise[key]

    def share(self, name: str, w_bits: int, a_bits: int) -> dict[str, float]:
        """One layer's part of each metric (cached: the cost model is pure Python over all layers)."""
        key = (name, w_bits, a_bits)
        if key not in self._shares:
            self._shares[key] = layer_costs(
                self.ctx.model, self.ctx.model.layer(name), w_bits, a_bits, self.ctx.options.scheme, self.latency
            )
        return self._shares[key]

    def saving(
        self, name: str, w: dict[str, int], a: dict[str, int], new_w: int, new_a: int, violated: dict[str, float]
    ) -> float:
        """Cost saved by the change, summed over the violated metrics as fractions of their limits."""
        old, new = self.share(name, w[name], a[name]), self.share(name, new_w, new_a)
        saved = 0.0
        for metric, value in violated.items():
            if metric == "act_bytes":  # the largest input, not a sum
                others = max((self.share(n, w[n], a[n])["act_bytes"] for n in w if n != name), default=0)
                after = max(others, new[metric])
            else:
                after = value - old[metric] + new[metric]
            saved += (value - after) / self.limits[metric]
        return saved

    def enforce(self, w: dict[str, int], a: dict[str, int]) -> None:
        ctx = self.ctx
        w_choices, a_choices = ctx.options.w_bits, ctx.options.a_bits
        while True:
            cost = ctx.cost(w, a)
            values = {m: getattr(cost, m) for m in self.limits}
            violated = {m: v for m, v in values.items() if over_limit(v, self.limits[m])}
            if not violated:
                return
            best, best_key = None, None
            for name in ctx.layer_names:
                for kind, bits, choices in (("w", w, w_choices), ("a", a, a_choices)):
                    i = choices.index(bits[name])
                    if i == 0:
                        continue
                    lower = choices[i - 1]
                    new_w, new_a = (lower, a[name]) if kind == "w" else (w[name], lower)
                    saved = self.saving(name, w, a, new_w, new_a, violated)
                    if saved <= 0:
                        continue
                    added = self.noise(name, kind, lower) - self.noise(name, kind, bits[name])
                    # pinned layers give way only when nothing else can
                    key = ((name, kind) in self.pinned, added / saved)
                    if best_key is None or key < best_key:
                        best, best_key = (bits, name, lower), key
            if best is None:  # cannot happen for a feasible budget; leave the config for the caller to drop
                return
            bits, name, lower = best
            bits[name] = lower


# -- scoring --------------------------------------------------------------------------------------


def reward_data(ctx: SearchContext) -> LabelledSet:
    """`reward_samples` validation images after those the candidates are scored on; if the split is
    too short for that, the first of the candidates' own images."""
    n = reward_samples(ctx)
    val, start = ctx.splits.val, ctx.options.val_samples
    if len(val) >= start + n:
        return val.subset(slice(start, start + n))
    return ctx.val.subset(slice(0, n))


def reward_samples(ctx: SearchContext) -> int:
    """The `reward_samples` param, or by default 512 images, fewer (at least MIN_REWARD_SAMPLES) where scoring
    one episode on them would cost over REWARD_WORK."""
    if ctx.params.reward_samples is not None:
        return ctx.params.reward_samples
    return max(MIN_REWARD_SAMPLES, min(512, int(REWARD_WORK // ctx.sim.work_per_sample)))


def quality(result) -> float:
    """Top-1 when there are labels, else the output SQNR in dB / 100."""
    if result.top1 is not None:
        return result.top1
    return min(result.sqnr_db, MAX_SQNR_DB) / 100


@dataclass(frozen=True)
class EpisodeScore:
    quality: float  # on the reward images: what the reward is made of
    finetuned_val_top1: float | None = None  # with fine-tuning: the fine-tuned network on the validation images


def _config_score(
    ctx: SearchContext, data: LabelledSet, config: Config, on_batch: Callable[[], None] | None = None
) -> EpisodeScore:
    w, a = (dict(zip(ctx.layer_names, bits)) for bits in config)
    qc = ctx.config(w, a)
    o = ctx.options
    if not o.finetune.enabled:
        return EpisodeScore(quality(ctx.sim.evaluate(qc, data)))
    # A private copy of the caller's weights, fine-tuned under this config, with the search's calibration.
    sim, _ = finetuned_simulator(ctx.model, ctx.sim.stats, ctx.finetune_set(), o.finetune, o.seed, qc, on_batch)
    return EpisodeScore(quality(sim.evaluate(qc, data)), sim.evaluate(qc, ctx.val).top1)


def score_episodes(
    ctx: SearchContext,
    configs: list[Config],
    map_fn: Callable = map,
    data: LabelledSet | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[EpisodeScore]:
    """Each config's scores on `data` (default: the reward images), after fine-tuning when it is on.

    `map_fn` may be an executor's map. Without fine-tuning the context's simulator swaps weights in
    place, so workers must not share one simulator (threads need one at a time, processes their own
    context); with fine-tuning each call builds its own and only reads the context's calibration.
    """
    data = data if data is not None else reward_data(ctx)
    return list(map_fn(partial(_config_score, ctx, data, on_batch=on_batch), configs))


def score_identity(ctx: SearchContext, data: LabelledSet) -> dict:
    """What an episode's score depends on besides its config (search/measurement.py ScorePass): the model, the
    calibration, the reward images and labels, and with fine-tuning its options, seed and data."""
    o = ctx.options
    identity = {
        **ctx.measurement_identity(),
        "reward_inputs": tensor_sha256(data.inputs),
        "reward_labels": None if data.labels is None else tensor_sha256(data.labels),
        "finetune": None,
    }
    if o.finetune.enabled:
        identity["finetune"] = {
            "options": o.finetune.model_dump(mode="json"),
            "seed": o.seed,
            "train": tensor_sha256(ctx.finetune_set().inputs),
            "val": tensor_sha256(ctx.val.inputs),
        }
    return identity


class EpisodeScorer:
    """Computes the chunks of a ScorePass: each config's EpisodeScore on the reward images."""

    def __init__(self, ctx: SearchContext, data: LabelledSet, on_batch: Callable[[], None] | None = None):
        self.ctx, self.data, self.on_batch = ctx, data, on_batch

    def measure(self, p: ScorePass, index: int) -> dict:
        scores = []
        for i in p.chunks[index]:
            w, a = p.configs[i]
            s = _config_score(self.ctx, self.data, (tuple(w), tuple(a)), self.on_batch)
            scores.append([s.quality, s.finetuned_val_top1])
        return {"scores": scores}

    def release(self) -> None:
        self.ctx.sim.set_float()


def score_through_measurements(
    ctx: SearchContext,
    configs: list[Config],
    data: LabelledSet,
    identity: dict,
    on_batch: Callable[[], None] | None = None,
) -> list[EpisodeScore]:
    """Score `configs` as one ScorePass (one config a chunk) through ctx.measurements: in the service, a batch of
    episodes is spread over the workers, and a retried job finds the episodes scored before it died.
    `identity` is score_identity(ctx, data), made once per search: it hashes the reward (and training) images."""
    p = ScorePass(
        identity=identity,
        configs=[[list(w), list(a)] for w, a in configs],
        chunks=[[i] for i in range(len(configs))],
    )
    results = ctx.measurements.run(p, EpisodeScorer(ctx, data, on_batch))
    return [EpisodeScore(*score) for r in results for score in r["scores"]]


def evaluate_episodes(
    ctx: SearchContext, configs: list[Config], map_fn: Callable = map, data: LabelledSet | None = None
) -> list[float]:
    """The reward accuracy of each config (see score_episodes)."""
    return [s.quality for s in score_episodes(ctx, configs, map_fn, data)]


# -- the agent ------------------------------------------------------------------------------------


class Actor(nn.Module):
    def __init__(self, state_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, 1),
            nn.Sigmoid(),
        )
        nn.init.uniform_(self.net[4].weight, -FINAL_LAYER_INIT, FINAL_LAYER_INIT)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class Critic(nn.Module):
    """Q(s, a): the state and action projections are added, as in the original."""

    def __init__(self, state_dim: int):
        super().__init__()
        self.state_in = nn.Linear(state_dim, HIDDEN)
        self.action_in = nn.Linear(1, HIDDEN)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)
        nn.init.uniform_(self.out.weight, -FINAL_LAYER_INIT, FINAL_LAYER_INIT)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.state_in(state) + self.action_in(action))
        return self.out(torch.relu(self.hidden(h)))


class EpisodeReplay:
    """Whole episodes, every step sharing the episode's reward. Once full, a new episode replaces a
    random one from the lower 70% by reward: the best 30% are kept (NNCF AutoQ)."""

    def __init__(self, episodes: int, steps: int, state_dim: int, gen: torch.Generator):
        self.states = torch.zeros(episodes, steps, state_dim)
        self.actions = torch.zeros(episodes, steps)
        self.rewards = torch.zeros(episodes)
        self.size = 0
        self.gen = gen

    def add(self, states: torch.Tensor, actions: torch.Tensor, reward: float) -> None:
        capacity = len(self.rewards)
        if self.size < capacity:
            slot = self.size
            self.size += 1
        else:
            lower = torch.argsort(self.rewards, stable=True)[: max(1, int(capacity * (1 - KEEP_FRACTION)))]
            slot = int(lower[torch.randint(len(lower), (1,), generator=self.gen)])
        self.states[slot], self.actions[slot], self.rewards[slot] = states, actions, reward

    def sample(self, batch: int):
        steps = self.states.shape[1]
        flat = torch.randint(self.size * steps, (batch,), generator=self.gen)
        episode, step = flat // steps, flat % steps
        done = step == steps - 1
        next_state = self.states[episode, torch.clamp(step + 1, max=steps - 1)]  # unused where done
        return (
            self.states[episode, step],
            self.actions[episode, step, None],
            self.rewards[episode, None],
            next_state,
            done.float()[:, None],
        )


class DDPGAgent:
    def __init__(self, state_dim: int, steps: int, gen: torch.Generator):
        self.actor, self.critic = Actor(state_dim), Critic(state_dim)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), LR_ACTOR)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), LR_CRITIC)
        self.replay = EpisodeReplay(REPLAY_EPISODES, steps, state_dim, gen)
        self.baseline: float | None = None
        self.gen = gen

    @torch.no_grad()
    def act(self, state: torch.Tensor, sigma: float) -> float:
        """The policy's action, perturbed by normal noise truncated to [0, 1] (sampled by inverse CDF)."""
        mu = float(self.actor(state[None]))
        if sigma <= 0:
            return mu
        noise = NormalDist(mu, sigma)
        lo, hi = noise.cdf(0.0), noise.cdf(1.0)
        u = lo + (hi - lo) * float(torch.rand((), generator=self.gen, dtype=torch.float64))
        action = noise.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
        return min(max(action, 0.0), 1.0)

    def update(self) -> None:
        state, action, reward, next_state, done = self.replay.sample(BATCH)
        # the original's baseline: a moving average of the sampled rewards' mean
        mean = float(reward.mean())
        self.baseline = mean if self.baseline is None else self.baseline + BASELINE_ALPHA * (mean - self.baseline)
        reward = reward - self.baseline
        with torch.no_grad():
            target = reward + DISCOUNT * (1 - done) * self.critic_target(next_state, self.actor_target(next_state))
        critic_loss = nn.functional.mse_loss(self.critic(state, action), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(state, self.actor(state)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target_net in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, tp in zip(net.parameters(), target_net.parameters()):
                    tp.mul_(1 - TAU).add_(p, alpha=TAU)


# -- the search -----------------------------------------------------------------------------------


@dataclass
class Episode:
    w: dict[str, int]
    a: dict[str, int]
    states: torch.Tensor  # (steps, state_dim) as the actor saw them
    actions: torch.Tensor  # (steps,) before the mapping to bits

    def key(self, names: list[str]) -> Config:
        return tuple(self.w[n] for n in names), tuple(self.a[n] for n in names)


class HaqParams(MethodParams):
    episodes: int = Field(default=200, ge=1, description="episodes the agent plays (the paper: 600)")
    warmup: int = Field(default=20, ge=0, description="episodes of random actions before the agent learns")
    batch_episodes: int = Field(default=1, ge=1, description="episodes played with one policy, scored together")
    first_last_8bit: bool = Field(
        default=False,
        description="keep the first and last layers at the widest "
        "allowed width up to 8 (budget enforcement may still lower them)",
    )
    reward_samples: int | None = Field(
        default=None,
        ge=1,
        description="validation images an episode's reward uses; default 512, fewer (at least "
        f"{MIN_REWARD_SAMPLES}) where one reward would cost over {REWARD_WORK:.0e} MACs",
    )


def haq_search(ctx: SearchContext, map_fn: Callable[[Callable, Iterable], Iterable] = map) -> None:
    params: HaqParams = ctx.params
    episodes, warmup, batch_episodes, pin_ends = (
        params.episodes,
        params.warmup,
        params.batch_episodes,
        params.first_last_8bit,
    )
    data = reward_data(ctx)
    # A private RNG stream: the same seed gives the same search, and the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.options.seed)
        _search(ctx, episodes, warmup, batch_episodes, pin_ends, data, map_fn)


def _search(
    ctx: SearchContext,
    episodes: int,
    warmup: int,
    batch_episodes: int,
    pin_ends: bool,
    data: LabelledSet,
    map_fn: Callable,
) -> None:
    o, names = ctx.options, ctx.layer_names
    gen = torch.Generator().manual_seed(o.seed)
    search_activations = len(o.a_bits) > 1
    states, steps = layer_states(ctx, search_activations)
    pinned: dict[tuple[str, str], int] = {}
    if pin_ends:
        for name in (names[0], names[-1]):
            pinned[(name, "w")] = pinned_bits(o.w_bits)
            pinned[(name, "a")] = pinned_bits(o.a_bits)
    enforcer = BudgetEnforcer(ctx, set(pinned))
    agent = DDPGAgent(states.shape[1], len(steps), gen)

    # The float accuracy is measured once; the simulator keeps these float logits as its reference.
    fp_logits = ctx.sim.float_logits(data.inputs)
    fp_quality = float((fp_logits.argmax(1) == data.labels).float().mean()) if data.labels is not None else 1.0

    def rollout(sigma: float, random_actions: bool) -> Episode:
        w = {n: pinned.get((n, "w"), o.w_bits[-1]) for n in names}
        a = {n: pinned.get((n, "a"), o.a_bits[-1]) for n in names}
        seen, actions, prev = [], [], 0.0
        for i, (name, kind) in enumerate(steps):
            s = states[i].clone()
            s[PREV_ACTION] = prev
            action = float(torch.rand((), generator=gen)) if random_actions else agent.act(s, sigma)
            bits = w if kind == "w" else a
            bits[name] = pinned.get((name, kind), action_to_bits(action, o.w_bits if kind == "w" else o.a_bits))
            seen.append(s)
            actions.append(action)
            prev = action
        enforcer.enforce(w, a)
        return Episode(w, a, torch.stack(seen), torch.tensor(actions))

    cache: dict[Config, EpisodeScore] = {}  # scores per config: repeated configs are not re-run
    identity: dict | None = None  # score_identity(ctx, data), made at the first scoring through the measurements
    # progress from inside a long fine-tune, only where it runs in this thread
    tick = (lambda: ctx.tick(episodes, "haq: fine-tune")) if o.finetune.enabled else None

    def score(batch: list[Config], fn: Callable = map_fn) -> None:
        nonlocal identity
        todo = list(dict.fromkeys(k for k in batch if k not in cache))
        if not todo:
            return
        if fn is map:  # the default: through the context's measurements (spread over workers in the service)
            if identity is None:
                identity = score_identity(ctx, data)
            cache.update(zip(todo, score_through_measurements(ctx, todo, data, identity, tick)))
        else:
            cache.update(zip(todo, score_episodes(ctx, todo, fn, data)))

    found: dict[Config, int] = {}  # config -> first episode that reached it
    done = 0
    while done < episodes:
        batch = []
        for i in range(done, min(done + batch_episodes, episodes)):
            sigma = SIGMA * SIGMA_DECAY ** max(0, i - warmup)
            batch.append(rollout(sigma, random_actions=i < warmup))
        keys = [e.key(names) for e in batch]
        score(keys)
        for episode, key in zip(batch, keys):
            reward = REWARD_SCALE * (cache[key].quality - fp_quality)
            agent.replay.add(episode.states, episode.actions, reward)
            found.setdefault(key, done)
            if done >= warmup - 1:  # train from the last warm-up episode on, one update per step
                for _ in range(len(steps)):
                    agent.update()
            done += 1
            ctx.report(done, episodes, "haq")

    final = rollout(0.0, random_actions=False).key(names)
    score([final], map)  # a single config: nothing to fan out
    found.setdefault(final, episodes)

    def meta(key: Config) -> dict:
        tuned = cache[key].finetuned_val_top1
        return {} if tuned is None else {"finetuned_val_top1": tuned}

    # Candidates: the best configs the episodes reached, then the trained policy's own.
    ranked = sorted((k for k in found if k != final), key=lambda k: (-cache[k].quality, found[k]))
    added = 0
    for key in ranked:
        if added == TOP_CANDIDATES:
            break
        w, a = (dict(zip(names, bits)) for bits in key)
        if ctx.add_candidate(w, a, score=cache[key].quality, episode=found[key], **meta(key)) is not None:
            added += 1
    w, a = (dict(zip(names, bits)) for bits in final)
    ctx.add_candidate(w, a, score=cache[final].quality, episode=found[final], final_policy=True, **meta(final))
    ctx.report(episodes, episodes, "haq")
