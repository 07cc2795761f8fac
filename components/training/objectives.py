"""Objectives: pure functions of per-token log-probabilities and masks.

Every objective has the same shape, `loss(logp, mask, ..., normalizer) -> (loss, metrics)`:
- `logp`: log π_θ(a_t | s_t) of the trained tokens, any shape, differentiable;
- `mask`: 1.0 where a token counts, 0.0 elsewhere (prompt, padding, sequence ends);
- `normalizer`: the number of counted tokens in the whole optimizer step (over all micro-batches and
  ranks), so that summing the losses of the micro-batches gives the token-mean of the step exactly,
  whatever the packing.

The returned metrics are sums over counted tokens (divide by the same normalizer to report them), so they
too add up exactly over micro-batches.

SFT is a policy gradient with advantage 1 on dataset tokens; PSFT adds the PPO-style clipped ratio
against a frozen π_old; SFT-KL adds β·KL to a reference. `clipped_policy_loss` is shared with GRPO.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from components.training.async_keys import TIS_LEVELS, TIS_MODES
from components.training.config import DPO_LOSSES, LOSS_AGGREGATIONS, SCALE_REWARDS


def sft_loss(logp: Tensor, mask: Tensor, normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood, token-mean over the step: −Σ_t m_t log π_θ(a_t) / N."""
    nll = -(logp * mask).sum()
    return nll / normalizer, {"nll": nll.detach()}


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor | float, mask: Tensor,
                        normalizer: float, epsilon_low: float, epsilon_high: float, count_mask: Tensor | None = None,
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate: −Σ_t m_t min(r_t Â_t, clip(r_t, 1−ε_low, 1+ε_high) Â_t) / N, r_t = π_θ/π_old.

    A token whose ratio is already past the clip in the direction its advantage pushes gets no gradient.
    Metrics as TRL's GRPOTrainer counts and names them (clip_ratio/low_mean, clip_ratio/high_mean): a token is
    clipped low when r < 1−ε_low and Â < 0, high when r > 1+ε_high and Â > 0.
    They are sums over `count_mask` (default: `mask`; pass the 0/1 token mask when `mask` holds weights).
    """
    count = mask if count_mask is None else count_mask
    adv = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(count.dtype) * count
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(count.dtype) * count
        kl_old = (kl_k3(logp.detach(), old_logp) * count).sum()
    return (per_token * mask).sum() / normalizer, {
        "clip_ratio/low_mean": low.sum(), "clip_ratio/high_mean": high.sum(), "kl_old": kl_old,
        "nll": -(logp.detach() * count).sum(),
    }


def psft_loss(logp: Tensor, old_logp: Tensor, mask: Tensor, normalizer: float, *,
              epsilon_low: float = 0.2, epsilon_high: float = 0.28) -> tuple[Tensor, dict[str, Tensor]]:
    """Proximal SFT: the clipped surrogate with advantage 1 on dataset tokens.

    With one update per batch π_old = π_θ, r = 1 and ∇r = ∇log π_θ, so the gradient equals SFT's;
    across several updates the clip stops tokens whose probability already rose by more than ε_high.
    """
    return clipped_policy_loss(logp, old_logp, 1.0, mask, normalizer, epsilon_low, epsilon_high)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π_θ‖π_ref) per token: exp(δ) − δ − 1 with δ = log π_ref − log π_θ.

    Unbiased for tokens sampled from π_θ, always ≥ 0, and 0 exactly where the two agree.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def sft_kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, normalizer: float, *,
                beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT plus β·KL to a reference model, the KL estimated by k3 on the trained tokens."""
    kl = kl_k3(logp, ref_logp.detach()) * mask
    nll = -(logp * mask).sum()
    return (nll + beta * kl.sum()) / normalizer, {"nll": nll.detach(), "kl": kl.sum().detach()}


# ----------------------------------------------------------------------------------------------------
# GRPO: group-normalized advantages, aggregation weights, and the clipped loss with an optional k3 KL.

def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Â_i = (R_i − mean_G R) / (std R + eps), rewards in prompt-major order ([P·G]).

    scale: "group" divides by each group's std, "batch" by the std of the whole batch (the mean stays the
    group's), "none" only centers (Dr. GRPO). std is the unbiased one, as in TRL. A group whose rewards are
    all equal gets Â = 0: it carries no signal.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale!r} is invalid: one of {', '.join(SCALE_REWARDS)}")
    r = rewards.float().reshape(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centered = centered / (std + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps if r.numel() > 1 else eps)
    return centered.reshape(-1)


def aggregation_weights(completion_lengths: Tensor, mode: str, max_completion_length: int, *,
                        total_tokens: float | None = None, total_sequences: float | None = None) -> Tensor:
    """Per-token weight of each sequence's tokens in one optimizer step's loss (Σ over tokens of the step).

    token (DAPO, default): 1 / Σ_i |o_i| — every token counts the same;
    sequence (original GRPO): 1 / (S·|o_i|) — mean over tokens, then over sequences;
    constant (Dr. GRPO): 1 / (S·max_completion_length) — no length bias.

    With the step's sequences spread over ranks, pass the step's totals over all ranks (Σ_i max(|o_i|, 1) and
    S): each rank's weights are then its share of the one global mean, not a mean of its own.
    """
    lengths = completion_lengths.float().clamp(min=1)
    s = float(lengths.numel()) if total_sequences is None else float(total_sequences)
    if mode == "token":
        return torch.full_like(lengths, 1.0 / (float(lengths.sum()) if total_tokens is None else float(total_tokens)))
    if mode == "sequence":
        return 1.0 / (s * lengths)
    if mode == "constant":
        return torch.full_like(lengths, 1.0 / (s * max_completion_length))
    raise ValueError(f"loss_aggregation={mode!r} is invalid: one of {', '.join(LOSS_AGGREGATIONS)}")


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, weights: Tensor, *,
              epsilon_low: float, epsilon_high: float, ref_logp: Tensor | None = None, beta: float = 0.0,
              is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_t w_t [−ρ_t·min(r_t Â_t, clip(r_t, 1−ε_low, 1+ε_high) Â_t) + β·KL_k3(π_θ‖π_ref)_t].

    advantages and weights are per token (a sequence's value repeated over its tokens); `mask` marks the
    completion tokens; metric sums count tokens (divide by the step's token count to report them).
    is_weights ρ_t (default 1): importance weights π_old / π_rollout (`importance_weights`). They weigh the
    policy-gradient term only, as in TRL's GRPOTrainer and verl's compute_policy_loss: they correct for the tokens
    having been sampled by the rollout engine, which the surrogate's gradient assumes came from π_old; the KL term is
    an estimate of KL(π_θ‖π_ref) that the weights would only rescale per token.
    """
    w = weights * mask
    pg_w = w if is_weights is None else w * is_weights.detach()
    loss, m = clipped_policy_loss(logp, old_logp, advantages, pg_w, 1.0, epsilon_low, epsilon_high, count_mask=mask)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = kl_k3(logp, ref_logp.detach())
        loss = loss + beta * (kl * w).sum()
        m["kl"] = (kl.detach() * mask).sum()
    return loss, m


IS_METRICS = {"truncate": "rollout_corr/rollout_is_ratio_fraction_high",
              "mask": "rollout_corr/rollout_rs_masked_fraction"}
"""The metric of each tis_mode: the fraction of the step's tokens whose weight was cut to the cap, or set to 0 (verl's
names, verl/trainer/ppo/rollout_corr_helper.py; TRL logs no such fraction)."""


def importance_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, cap: float, level: str = "token",
                       mode: str = "truncate") -> tuple[Tensor, Tensor]:
    """The off-policy correction's weight of each completion token, and where it bounded the weight (1.0: the
    token's weight was truncated or masked).

    old_logp, rollout_logp, mask: [N, T], the trainer's π_old, the rollout engine's log-probs and 1 on completion
    tokens. ρ = π_old / π_rollout: per token (level token), or per sequence (level sequence: exp of the sum of the
    sequence's log-ratios, the product of its tokens' ρ, on each of its tokens). mode truncate: min(ρ, cap) (TIS);
    mode mask: ρ where 1/cap ≤ ρ ≤ cap, else 0 (masked IS: verl's rollout_is weights with its rejection mask
    rollout_rs at the same threshold, whose lower bound defaults to 1/upper in the ratio-based version of
    verl/trainer/ppo/rollout_corr_helper.py; TRL's vllm_importance_sampling_mode token_mask / sequence_mask,
    trl/trainer/grpo_trainer.py, masks the same way but below no lower bound by default). A masked token keeps its
    place in the step's normalizer, as in TRL (verl drops it from the response mask). The weights are detached:
    they change the measure, not the objective. The ratio is formed in float32 without verl's ±20 clamp of the
    log-ratio: exp overflows to inf, which truncate cuts to cap and mask sets to 0, and underflows to 0.
    """
    log_ratio = torch.where(mask > 0, old_logp.detach().float() - rollout_logp.float(), 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
    elif level != "token":
        raise ValueError(f"tis_level={level!r} is invalid: one of {', '.join(TIS_LEVELS)}")
    ratio = torch.exp(log_ratio)
    if mode == "truncate":
        bounded = ratio > cap
        weights = ratio.clamp(max=cap)
    elif mode == "mask":
        bounded = (ratio > cap) | (ratio < 1.0 / cap)
        weights = torch.where(bounded, torch.zeros_like(ratio), ratio)
    else:
        raise ValueError(f"tis_mode={mode!r} is invalid: one of {', '.join(TIS_MODES)}")
    return weights * mask, bounded.to(mask.dtype) * mask


# ----------------------------------------------------------------------------------------------------
# Critic-free advantages (the estimators by name: components/training/advantages.py).

def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: Â_i = R_i − mean_{j≠i} R_j, the baseline the mean of the other G − 1 samples of the group (not
    scaled). Equal to G/(G−1) · (R_i − mean_G R)."""
    r = rewards.float().reshape(-1, group_size)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def whiten(values: Tensor, mask: Tensor, reduce: Callable[[dict], dict] | None = None, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries, var the unbiased one (verl's masked_whiten); 0 where
    mask is 0. `reduce` (a sum over ranks of a dict of floats, e.g. Dist.all_reduce_sums) makes the mean and
    variance those of every rank's entries.

    The sums, the centering and the scaling are float64: var = E[x²] − mean² cancels catastrophically in float32
    once mean/std is large (at mean 1e3, std 1, a few thousand entries, the whitened values were off by 0.1 to 0.3),
    so only the result is cast back to values' dtype."""
    x, m = values.double(), mask.double()
    sums = {"n": float(m.sum()), "x": float((x * m).sum()), "xx": float((x * x * m).sum())}
    if reduce is not None:
        sums = reduce(sums)
    n = max(sums["n"], 1.0)
    mean = sums["x"] / n
    var = max(sums["xx"] / n - mean ** 2, 0.0) * (n / (n - 1) if n > 1 else 1.0)
    return ((x - mean) / math.sqrt(var + eps) * m).to(values.dtype)


def reinforce_pp_advantages(rewards: Tensor, kl: Tensor, mask: Tensor, *, beta: float,
                            reduce: Callable[[dict], dict] | None = None) -> Tensor:
    """REINFORCE++: per-token rewards r_t = −β·kl_t, plus R on the last completion token; returns
    G_t = Σ_{s≥t} r_s (γ = 1); advantages G_t whitened over every token of the round (`reduce`: of every rank).

    rewards [N]; kl [N, T] the k1 estimate log π_old − log π_ref per completion token; mask [N, T] 1 on completion
    tokens (left-aligned: padding at the end).
    """
    mask = mask.float()
    token_rewards = -beta * kl.float() * mask
    lengths = mask.sum(dim=1).long()
    rows = torch.nonzero(lengths > 0).reshape(-1)
    token_rewards[rows, lengths[rows] - 1] += rewards.float()[rows]
    returns = torch.flip(torch.cumsum(torch.flip(token_rewards, dims=[1]), dim=1), dims=[1]) * mask
    return whiten(returns, mask, reduce)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k1 estimator of KL(π‖π_ref) per token: log π − log π_ref (InstructGPT's penalty in the reward)."""
    return logp - ref_logp


# ----------------------------------------------------------------------------------------------------
# DPO: a function of per-sequence log-prob sums of the policy and the reference.

def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO losses (a [P] tensor; the caller averages) and reward metrics (per pair).

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    sigmoid −log σ(βh) (with label smoothing ε: −(1−ε) log σ(βh) − ε log σ(−βh)); ipo (h − 1/(2β))²
    (pass length-averaged log-probs, as IPO defines it); hinge max(0, 1 − βh); robust, the unbiased
    noisy-label loss (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε).
    """
    chosen_ratio = chosen - ref_chosen.detach()
    rejected_ratio = rejected - ref_rejected.detach()
    h = chosen_ratio - rejected_ratio
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * logsig(beta * h) + label_smoothing * logsig(-beta * h)) \
            / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"loss_type={loss_type!r} is invalid: one of {', '.join(DPO_LOSSES)}")
    with torch.no_grad():
        rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        metrics = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).float(),
                   "rewards/margins": rc - rr}
    return losses, metrics


# ----------------------------------------------------------------------------------------------------
# Reward model: Bradley–Terry on the scalar scores of a pair's chosen and rejected sequences.

def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *, margin: Tensor | float = 0.0,
                       center_rewards_coefficient: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses −log σ(r_c − r_r − m) + c·(r_c + r_r)² (a [P] tensor; the caller averages) and per-pair
    metrics: accuracy (r_c > r_r), margin (r_c − r_r), mean_reward ((r_c + r_r) / 2).

    m: a margin the chosen score must clear (a float or per pair); c: TRL's center_rewards_coefficient, which
    pulls the scores toward mean 0 (Eisenstein et al. 2023).
    """
    diff = chosen - rejected
    losses = -torch.nn.functional.logsigmoid(diff - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float(), "margin": diff.detach(),
                   "mean_reward": (chosen.detach() + rejected.detach()) / 2}
    return losses, metrics


# ----------------------------------------------------------------------------------------------------
# PPO with a critic: per-token rewards with a k1 KL penalty, GAE, the clipped value loss, the KL controllers.

def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """InstructGPT's per-token reward: r_t = −kl_coef·kl_t on every completion token, plus the sequence's score on
    its last one. scores [N]; kl [N, T] (k1: log π_old − log π_ref); mask [N, T] (left-aligned completions)."""
    mask = mask.float()
    rewards = -kl_coef * kl.float() * mask
    lengths = mask.sum(dim=1).long()
    rows = torch.nonzero(lengths > 0).reshape(-1)
    rewards[rows, lengths[rows] - 1] += scores.float()[rows]
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over completion tokens: δ_t = r_t + γ·V_{t+1} − V_t (V = 0 after the last
    token: the episode ends there), Â_t = δ_t + γλ·Â_{t+1}; returns (Â, Â + V), 0 on padding.

    rewards, values, mask: [N, T], the completions left-aligned (padding at the end).
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def clipped_value_loss(vpred: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, normalizer: float, *,
                       cliprange_value: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's value loss: ½·Σ_t m_t max((V_t − G_t)², (clip(V_t, V_old ± ε_v) − G_t)²) / N (ε_v None: no clip).

    Metrics are sums over counted tokens: val/clipfrac_avg (TRL's name: the clipped term is the larger), val/vpred,
    val/error ((V_t − G_t)²).
    """
    unclipped = (vpred - returns) ** 2
    if cliprange_value is None:
        per_token, clipped_more = unclipped, torch.zeros_like(unclipped)
    else:
        clipped = (torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value) - returns) ** 2
        per_token, clipped_more = torch.maximum(unclipped, clipped), (clipped > unclipped).float()
    loss = 0.5 * (per_token * mask).sum() / normalizer
    with torch.no_grad():
        metrics = {"val/clipfrac_avg": (clipped_more * mask).sum(), "val/vpred": (vpred.detach() * mask).sum(),
                   "val/error": (unclipped.detach() * mask).sum()}
    return loss, metrics


@dataclass
class KLController:
    """The KL penalty's coefficient β: fixed, or adaptive (Ziegler et al. 2019): after each rollout of n samples
    with mean KL per sequence kl, e = clip(kl / target − 1, −0.2, 0.2) and β ← β·(1 + e·n / horizon).

    The multiplier is > 0 for every e only while n / horizon < 5 (verl's and OpenRLHF's controllers, the same
    formula, do not check): past that a KL below target would make β ≤ 0, so update refuses such an n."""

    value: float
    kind: str = "fixed"
    target: float = 6.0
    horizon: float = 10000.0

    def update(self, kl: float, n_steps: int) -> float:
        if self.kind == "adaptive":
            if n_steps >= 5 * self.horizon:
                raise ValueError(f"kl_horizon={self.horizon:g} is invalid for {n_steps} samples per update: > "
                                 f"{n_steps / 5:g} (β·(1 + e·n/kl_horizon) with e down to −0.2 would be ≤ 0)")
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
