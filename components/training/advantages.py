"""Advantage estimators by name (verl's register_adv_est): what sets the RL stages apart in the one loop
(components/training/rl_loop.py), with whether a stage has a critic.

Every estimator reads a round's `Scores` and returns per-token advantages [N, T] of this rank's samples (0 on
padding) and, where it has them, the returns the critic regresses to. grpo's `advantage` setting picks one of
grpo, rloo and reinforce_pp (components.training.config.KL_IN_REWARD, read without torch); ppo uses gae, whose
values are its critic's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from components.training.objectives import (
    gae,
    group_advantages,
    kl_penalized_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)


@dataclass
class Scores:
    """What an estimator reads of a round: this rank's samples, and every rank's rewards where a group spans
    them (the statistics of a round split over ranks are those of one process)."""

    rewards: Tensor
    """[N] this rank's total rewards (float32)."""
    gathered: Tensor
    """Every rank's total rewards in rank order (float32); this rank's are gathered[start:start + N]."""
    start: int
    group_size: int
    """Samples per prompt, contiguous: a group."""
    kl: Tensor
    """[N, T] k1 log π_old − log π_ref of each completion token (0 without a reference)."""
    mask: Tensor
    """[N, T] 1 on completion tokens (left-aligned: padding at the end)."""
    reduce: Callable[[dict], dict]
    """A sum over ranks of a dict of floats (Dist.all_reduce_sums)."""
    kl_coef: float = 0.0
    """β of a KL folded into the reward (reinforce_pp, gae)."""
    values: Tensor | None = None
    """[N, T] the critic's V(s_t) of each completion token: what gae needs."""
    options: dict = field(default_factory=dict)
    """The stage's settings an estimator reads: scale (grpo), gamma, lam, whiten (gae)."""


Estimate = tuple[Tensor, Tensor | None]
"""Per-token advantages [N, T] and returns [N, T] (None: the estimator has none; no critic reads them)."""

ADV_ESTIMATOR_REGISTRY: dict[str, Callable[[Scores], Estimate]] = {}


def register_adv_est(name: str):
    """Register an advantage estimator under `name`; a second estimator under a taken name is refused."""
    def add(fn: Callable[[Scores], Estimate]):
        if name in ADV_ESTIMATOR_REGISTRY and ADV_ESTIMATOR_REGISTRY[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered: {ADV_ESTIMATOR_REGISTRY[name]}")
        ADV_ESTIMATOR_REGISTRY[name] = fn
        return fn
    return add


def get_adv_estimator(name: str) -> Callable[[Scores], Estimate]:
    if name not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"unknown advantage estimator {name!r}: one of {', '.join(ADV_ESTIMATOR_REGISTRY)}")
    return ADV_ESTIMATOR_REGISTRY[name]


def _per_token(sequence: Tensor, mask: Tensor) -> Tensor:
    """One advantage per sample laid on each of its completion tokens."""
    return sequence[:, None] * mask


def _mine(scores: Scores, advantages: Tensor) -> Tensor:
    return advantages[scores.start:scores.start + len(scores.rewards)]


@register_adv_est("grpo")
def grpo_estimator(scores: Scores) -> Estimate:
    """GRPO: (R_i − mean_G R) / (std + 1e-4), the std the group's, the round's or none (options["scale"])."""
    advantages = group_advantages(scores.gathered, scores.group_size, scores.options.get("scale", "group"))
    return _per_token(_mine(scores, advantages), scores.mask), None


@register_adv_est("rloo")
def rloo_estimator(scores: Scores) -> Estimate:
    """RLOO: R_i − the mean of the other G − 1 rewards of the group (objectives.rloo_advantages)."""
    return _per_token(_mine(scores, rloo_advantages(scores.gathered, scores.group_size)), scores.mask), None


@register_adv_est("reinforce_pp")
def reinforce_pp_estimator(scores: Scores) -> Estimate:
    """REINFORCE++: returns of −β·kl per token plus R on the last, whitened over every rank's tokens."""
    return reinforce_pp_advantages(scores.rewards, scores.kl, scores.mask, beta=scores.kl_coef,
                                   reduce=scores.reduce), None


@register_adv_est("gae")
def gae_estimator(scores: Scores) -> Estimate:
    """GAE(γ, λ) over the critic's values of the KL-penalized per-token rewards; Â whitened over every rank's
    tokens with options["whiten"]. Needs a critic: Scores.values."""
    if scores.values is None:
        raise ValueError("advantage estimator 'gae' needs the critic's values")
    token_rewards = kl_penalized_rewards(scores.rewards, scores.kl, scores.mask, scores.kl_coef)
    advantages, returns = gae(token_rewards, scores.values, scores.mask, gamma=scores.options["gamma"],
                              lam=scores.options["lam"])
    if scores.options.get("whiten", False):
        advantages = whiten(advantages, scores.mask, scores.reduce)
    return advantages, returns


def padded(values: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-sample token values as [N, T] (left-aligned, float32) and their mask."""
    width = max([len(v) for v in values] + [1])
    grid, mask = torch.zeros(len(values), width), torch.zeros(len(values), width)
    for row, v in enumerate(values):
        grid[row, :len(v)], mask[row, :len(v)] = v.float(), 1.0
    return grid, mask
