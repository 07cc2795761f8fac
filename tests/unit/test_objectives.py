"""Objectives against hand-computed values on small tensors."""

import math

import torch

from components.training.objectives import kl_k3, psft_loss, sft_kl_loss, sft_loss


def test_sft_loss_is_token_mean_nll():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    loss, m = sft_loss(logp, mask, normalizer=4)
    # (1 + 2 + 4 + 1.5) / 4
    assert math.isclose(loss.item(), 8.5 / 4)
    assert math.isclose(m["nll"].item(), 8.5)


def test_psft_values_and_clip_at_high_ratio():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new_p = torch.tensor([0.5, 0.6, 0.7, 0.2])  # ratios 1.0, 1.2, 1.4, 0.4
    logp = torch.log(new_p).requires_grad_()
    mask = torch.ones(4)
    loss, m = psft_loss(logp, old, mask, normalizer=4, epsilon_low=0.2, epsilon_high=0.28)
    # min(r, clip(r, 0.8, 1.28)) = 1.0, 1.2, 1.28, 0.4 (A = 1 > 0: only the top clips)
    assert math.isclose(loss.item(), -(1.0 + 1.2 + 1.28 + 0.4) / 4, rel_tol=1e-6)
    loss.backward()
    # d/dlogp of -r/N is -r/N; the clipped token (r = 1.4 > 1.28) gets none
    expected = torch.tensor([-1.0, -1.2, 0.0, -0.4]) / 4
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert math.isclose(m["clip_ratio/high_mean"].item(), 1.0)
    assert m["clip_ratio/low_mean"].item() == 0.0  # advantage 1: no low clipping, as TRL counts it


def test_psft_with_one_update_per_batch_has_sft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    mask = (torch.rand(3, 5) > 0.3).float()
    n = float(mask.sum())

    def logp_of(x):
        return torch.log_softmax(x, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    sft, _ = sft_loss(logp_of(logits), mask, n)
    (g_sft,) = torch.autograd.grad(sft, logits)
    lp = logp_of(logits)
    psft, _ = psft_loss(lp, lp.detach(), mask, n)  # π_old = π_θ: one update per batch
    (g_psft,) = torch.autograd.grad(psft, logits)
    assert torch.allclose(g_sft, g_psft, atol=1e-7)


def test_k3_nonnegative_and_zero_when_equal():
    a = torch.randn(1000)
    b = torch.randn(1000)
    assert (kl_k3(a, b) >= 0).all()
    assert torch.equal(kl_k3(a, a), torch.zeros(1000))
    # hand value: δ = log π_ref − log π_θ = 1 → e − 2
    assert math.isclose(kl_k3(torch.tensor(0.0), torch.tensor(1.0)).item(), math.e - 2, rel_tol=1e-6)


def test_sft_kl_adds_beta_times_k3():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-2.0, -2.0])
    mask = torch.ones(2)
    loss, m = sft_kl_loss(logp, ref, mask, normalizer=2, beta=0.5)
    k3 = math.exp(-1) + 1 - 1  # δ = −1: e^−1 − (−1) − 1
    assert math.isclose(loss.item(), (3.0 + 0.5 * k3) / 2, rel_tol=1e-6)
    assert math.isclose(m["kl"].item(), k3, rel_tol=1e-6)
