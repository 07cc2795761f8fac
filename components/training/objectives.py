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

import torch
from torch import Tensor


def sft_loss(logp: Tensor, mask: Tensor, normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood, token-mean over the step: −Σ_t m_t log π_θ(a_t) / N."""
    nll = -(logp * mask).sum()
    return nll / normalizer, {"nll": nll.detach()}


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor | float, mask: Tensor,
                        normalizer: float, epsilon_low: float, epsilon_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate: −Σ_t m_t min(r_t Â_t, clip(r_t, 1−ε_low, 1+ε_high) Â_t) / N, r_t = π_θ/π_old.

    A token whose ratio is already past the clip in the direction its advantage pushes gets no gradient.
    Metrics follow TRL: a token is clipped low when r < 1−ε_low and Â < 0, high when r > 1+ε_high and Â > 0.
    """
    adv = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype) * mask
        kl_old = (kl_k3(logp.detach(), old_logp) * mask).sum()
    return (per_token * mask).sum() / normalizer, {
        "clip_ratio/low": low.sum(), "clip_ratio/high": high.sum(), "kl_old": kl_old,
        "nll": -(logp.detach() * mask).sum(),
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
