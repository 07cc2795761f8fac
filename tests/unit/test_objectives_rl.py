"""GRPO and DPO objectives against hand-computed values."""
import math

import pytest
import torch

from components.training.objectives import aggregation_weights, dpo_loss, group_advantages, grpo_loss, kl_k3


def test_group_advantages_each_scale():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    s_group = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    s_batch = math.sqrt((6 * 0.25**2 + 2 * 0.75**2) / 7)  # unbiased std of all 8 rewards
    for scale, denom in (("group", s_group + 1e-4), ("batch", s_batch + 1e-4), ("none", 1.0)):
        a = group_advantages(r, 4, scale)
        expect = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / denom
        torch.testing.assert_close(a, expect, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scale_rewards='bogus'.*group, batch, none"):
        group_advantages(r, 4, "bogus")


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
def test_aggregation_weights_with_global_totals_are_the_single_process_weights(mode):
    """Sequences of one step split over two ranks: with the step's totals, each rank's weights are its part of
    the weights one process computes for all of them (one global mean, not a mean of per-rank means)."""
    lengths = torch.tensor([3, 1, 6, 2, 5])
    whole = aggregation_weights(lengths, mode, 8)
    totals = dict(total_tokens=float(lengths.sum()), total_sequences=float(len(lengths)))
    parts = [aggregation_weights(lengths[:2], mode, 8, **totals), aggregation_weights(lengths[2:], mode, 8, **totals)]
    torch.testing.assert_close(torch.cat(parts), whole)
    per_token = whole.repeat_interleave(lengths)
    assert float(per_token.sum()) == pytest.approx({"token": 1.0, "sequence": 1.0, "constant": 17 / 40}[mode])


def test_aggregation_weights_each_mode():
    lengths = torch.tensor([2, 4])
    torch.testing.assert_close(aggregation_weights(lengths, "token", 8), torch.tensor([1 / 6, 1 / 6]))
    torch.testing.assert_close(aggregation_weights(lengths, "sequence", 8), torch.tensor([1 / 4, 1 / 8]))
    torch.testing.assert_close(aggregation_weights(lengths, "constant", 8), torch.tensor([1 / 16, 1 / 16]))


@pytest.mark.parametrize("mode,seq_w", [("token", [1 / 6, 1 / 6]), ("sequence", [1 / 4, 1 / 8]),
                                        ("constant", [1 / 16, 1 / 16])])
def test_grpo_loss_each_aggregation(mode, seq_w):
    # two sequences of 2 and 4 tokens laid out in one row of 6; r = 1 everywhere (π_θ = π_old)
    logp = torch.log(torch.tensor([0.5, 0.25, 0.1, 0.2, 0.4, 0.8])).requires_grad_()
    adv_seq, lengths = torch.tensor([1.5, -0.5]), torch.tensor([2, 4])
    adv = adv_seq.repeat_interleave(lengths)
    w = aggregation_weights(lengths, mode, 8).repeat_interleave(lengths)
    loss, m = grpo_loss(logp, logp.detach(), adv, torch.ones(6), w, epsilon_low=0.2, epsilon_high=0.28)
    expect = -(2 * seq_w[0] * 1.5 + 4 * seq_w[1] * -0.5)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    loss.backward()  # d/dlogp of −r·Â·w at r = 1 is −Â·w
    torch.testing.assert_close(logp.grad, -(adv * w))
    assert float(m["clip_ratio/high_mean"]) == 0 and float(m["kl_old"]) == pytest.approx(0, abs=1e-7)


def test_grpo_clip_and_kl():
    old = torch.log(torch.tensor([0.5, 0.5]))
    logp = torch.log(torch.tensor([0.8, 0.2])).requires_grad_()  # r = 1.6 (clipped high for Â>0), 0.4 (low for Â<0)
    adv, w = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5])
    ref = torch.log(torch.tensor([0.6, 0.3]))
    loss, m = grpo_loss(logp, old, adv, torch.ones(2), w, epsilon_low=0.2, epsilon_high=0.28, ref_logp=ref, beta=0.1)
    kl = [0.6 / 0.8 - math.log(0.6 / 0.8) - 1, 0.3 / 0.2 - math.log(0.3 / 0.2) - 1]
    # both surrogates clipped: −min(1.6, 1.28), −min(−0.4, −0.8)
    expect = 0.5 * (-1.28) + 0.5 * (0.8) + 0.1 * 0.5 * sum(kl)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    assert float(m["clip_ratio/high_mean"]) == 1 and float(m["clip_ratio/low_mean"]) == 1
    assert float(m["kl"]) == pytest.approx(sum(kl), rel=1e-6)
    loss.backward()  # clipped tokens get gradient only from the KL term
    dkl = torch.tensor([1 - 0.6 / 0.8, 1 - 0.3 / 0.2])  # d/dlogp of exp(ref−logp) − (ref−logp) − 1
    torch.testing.assert_close(logp.grad, 0.1 * 0.5 * dkl)
    with pytest.raises(ValueError, match="beta > 0 needs reference"):
        grpo_loss(logp, old, adv, torch.ones(2), w, epsilon_low=0.2, epsilon_high=0.28, beta=0.1)


def test_equal_rewards_give_zero_policy_gradient():
    logp = torch.randn(8).requires_grad_()
    adv = group_advantages(torch.full((8,), 0.7), 4, "group")
    loss, _ = grpo_loss(logp, logp.detach() + 0.05, adv, torch.ones(8), torch.full((8,), 1 / 8),
                        epsilon_low=0.2, epsilon_high=0.28)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(8))


def test_k3_nonnegative_and_zero_when_equal():
    a, b = torch.randn(1000), torch.randn(1000)
    assert bool((kl_k3(a, b) >= 0).all())
    assert torch.equal(kl_k3(a, a), torch.zeros(1000))


def test_dpo_each_loss_type():
    c, r, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))  # h = 1 − (−1) = 2
    lsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log σ(x)
    cases = {"sigmoid": (0.0, -lsig(0.2)), "ipo": (0.0, (2 - 1 / 0.2) ** 2), "hinge": (0.0, 1 - 0.2),
             "robust": (0.1, (-0.9 * lsig(0.2) + 0.1 * lsig(-0.2)) / 0.8)}
    for loss_type, (eps, expect) in cases.items():
        losses, m = dpo_loss(c, r, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps)
        assert float(losses) == pytest.approx(expect, rel=1e-6), loss_type
    assert float(m["rewards/chosen"]) == pytest.approx(0.1) and float(m["rewards/rejected"]) == pytest.approx(-0.1)
    assert float(m["rewards/accuracies"]) == 1 and float(m["rewards/margins"]) == pytest.approx(0.2)
    smoothed, _ = dpo_loss(c, r, rc, rr, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(-0.9 * lsig(0.2) - 0.1 * lsig(-0.2), rel=1e-6)
    with pytest.raises(ValueError, match="loss_type='x'.*sigmoid, ipo, hinge, robust"):
        dpo_loss(c, r, rc, rr, beta=0.1, loss_type="x")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_round_stats_over_ranks_are_the_single_process_stats(scale):
    from components.grpo.main import round_stats
    from components.training.advantages import Scores, get_adv_estimator

    g = torch.Generator().manual_seed(0)
    G, groups = 4, 6
    total = torch.randint(0, 3, (groups * G,), generator=g).float().tolist()
    total[:G] = [1.0] * G  # one group with no variance
    whole = {"total": total, "per_fn": {"task": [x / 2 for x in total]},
             "lengths": torch.randint(1, 9, (groups * G,), generator=g).tolist(),
             "finished": [i % 3 != 0 for i in range(groups * G)]}
    def advantages(ranks, rank):  # the grpo estimator's, one per sample (the first of its tokens)
        start = sum(len(part["total"]) for part in ranks[:rank])
        mine = torch.tensor(ranks[rank]["total"])
        grid, _ = get_adv_estimator("grpo")(Scores(
            rewards=mine, gathered=torch.tensor([x for part in ranks for x in part["total"]]), start=start,
            group_size=G, kl=torch.zeros(len(mine), 1), mask=torch.ones(len(mine), 1), reduce=lambda sums: sums,
            options={"scale": scale}))
        return grid[:, 0]

    one_std, one_metrics = round_stats([whole], 0, G)
    one_adv = advantages([whole], 0)
    # the same round sampled by two ranks: 2 and 4 groups
    cut = 2 * G
    ranks = [{k: (v[:cut] if isinstance(v, list) else {n: x[:cut] for n, x in v.items()}) for k, v in whole.items()},
             {k: (v[cut:] if isinstance(v, list) else {n: x[cut:] for n, x in v.items()}) for k, v in whole.items()}]
    parts = [(advantages(ranks, r), *round_stats(ranks, r, G)) for r in (0, 1)]
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), one_adv)
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), one_std)
    assert parts[0][2] == parts[1][2] == one_metrics
    assert (one_metrics["frac_reward_zero_std"] >= 1 / groups
            and one_metrics["completions/clipped_ratio"] == pytest.approx(1 / 3))
    if scale == "batch":  # one rank's own std would give other advantages
        assert not torch.allclose(parts[1][0], group_advantages(torch.tensor(total[cut:]), G, "batch"))


def test_rollout_seed_is_fixed_per_round():
    from components.training.rl import rollout_seed
    # the seeds runs have sampled with: changing them changes every GRPO run's numbers
    assert rollout_seed(0, 0) == 0 and rollout_seed(3, 5) == 3 * 1_000_003 + 5 * 97
    assert len({rollout_seed(7, round_index) for round_index in range(50)}) == 50


def test_minibatches_cut_the_passes_over_the_kept_samples():
    from components.training.rl import minibatches
    assert minibatches([0, 1, 2, 3], 2, 4) == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert minibatches([0, 2, 5], 2, 4) == [[0], [2], [5], [0, 2, 5]]  # the last step takes the rest
    assert minibatches([], 2, 3) == [[], [], []]  # nothing kept: the steps are still taken


def test_rloo_baseline_leaves_each_sample_out():
    from components.training.advantages import Scores, get_adv_estimator
    from components.training.objectives import rloo_advantages

    r = torch.tensor([1.0, 0, 0, 1, 3, 1, 2, 2])
    # group 1 [1, 0, 0, 1]: baselines (0+0+1)/3, (1+0+1)/3, (1+0+1)/3, (1+0+0)/3 = 1/3, 2/3, 2/3, 1/3
    #   → Â = 1 − 1/3, 0 − 2/3, 0 − 2/3, 1 − 1/3 = 2/3, −2/3, −2/3, 2/3
    # group 2 [3, 1, 2, 2]: baselines (1+2+2)/3, (3+2+2)/3, (3+1+2)/3, (3+1+2)/3 = 5/3, 7/3, 2, 2
    #   → Â = 4/3, −4/3, 0, 0
    expect = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0, 0])
    torch.testing.assert_close(rloo_advantages(r, 4), expect)
    # the registry's estimators lay each sample's advantage on its tokens; GRPO's stays group_advantages
    scores = Scores(rewards=r, gathered=r, start=0, group_size=4, kl=torch.zeros(8, 2), mask=torch.ones(8, 2),
                    reduce=lambda sums: sums, options={"scale": "batch"})
    torch.testing.assert_close(get_adv_estimator("rloo")(scores)[0], expect[:, None].expand(8, 2))
    grpo = group_advantages(r, 4, "batch")
    torch.testing.assert_close(get_adv_estimator("grpo")(scores)[0], grpo[:, None].expand(8, 2))


def test_reinforce_pp_whitens_over_every_token_of_the_round():
    from components.training.objectives import reinforce_pp_advantages

    # two samples, R = 1 (2 tokens) and R = 0 (1 token), β = 0: returns are R on every token: 1, 1 | 0
    # mean over the 3 tokens 2/3; unbiased var ((1/3)² + (1/3)² + (2/3)²) / 2 = 1/3; std 1/√3
    # → Â = (1 − 2/3)·√3 = √3/3 on the two tokens of sample 1, (0 − 2/3)·√3 = −2√3/3 on sample 2, 0 on padding
    rewards, mask = torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, torch.zeros(2, 2), mask, beta=0.0)
    s3 = math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([[s3 / 3, s3 / 3], [-2 * s3 / 3, 0.0]]))

    # the same round split over two ranks: each rank's sums are added to the other's, so each rank's tokens
    # are whitened by the round's mean and std, as one process does
    other = {0: {"n": 1.0, "x": 0.0, "xx": 0.0}, 1: {"n": 2.0, "x": 2.0, "xx": 2.0}}  # sample 2's, sample 1's
    parts = [reinforce_pp_advantages(rewards[i:i + 1], torch.zeros(1, 2), mask[i:i + 1], beta=0.0,
                                     reduce=lambda d, i=i: {k: d[k] + other[i][k] for k in d}) for i in (0, 1)]
    torch.testing.assert_close(torch.cat(parts), adv)


def test_reinforce_pp_folds_the_k1_kl_into_the_reward():
    from components.training.objectives import kl_k1, reinforce_pp_advantages

    # one sample of 3 tokens, R = 1, β = 0.5, k1 = log π_old − log π_ref = 0.2, −0.4, 0.6
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.2, -1.6, -1.1]])
    kl = kl_k1(old, ref)
    torch.testing.assert_close(kl, torch.tensor([[0.2, -0.4, 0.6]]))
    # token rewards −β·kl + R on the last token: −0.1, 0.2, −0.3 + 1 = 0.7
    # returns (γ = 1, sums to the end): 0.8, 0.9, 0.7; mean 0.8, unbiased var (0 + 0.01 + 0.01) / 2 = 0.01, std 0.1
    # → Â = (0.8 − 0.8) / 0.1, (0.9 − 0.8) / 0.1, (0.7 − 0.8) / 0.1 = 0, 1, −1
    adv = reinforce_pp_advantages(torch.tensor([1.0]), kl, torch.ones(1, 3), beta=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.0, -1.0]]), atol=1e-5, rtol=1e-5)


def test_grpo_config_advantage_setting():
    from components.config import ConfigError, from_mapping
    from components.grpo.config import GRPOConfig

    base = {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"}, "train": {"batch_size": 8}}
    assert from_mapping(GRPOConfig, base).advantage == "grpo"
    cfg = from_mapping(GRPOConfig, {**base, "advantage": "reinforce_pp", "beta": 0.1})
    assert cfg.loss_beta == 0.0 and from_mapping(GRPOConfig, {**base, "beta": 0.1}).loss_beta == 0.1
    with pytest.raises(ConfigError, match="advantage.*grpo, rloo, reinforce_pp"):
        from_mapping(GRPOConfig, {**base, "advantage": "ppo"})


def test_bradley_terry_with_and_without_margin():
    from components.training.objectives import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # r_c − r_r = 1, −1: −log σ(1) = log(1 + e^−1) = 0.313262, −log σ(−1) = log(1 + e) = 1.313262
    losses, m = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(losses, torch.tensor([0.313262, 1.313262]), rtol=0, atol=1e-6)
    assert m["accuracy"].tolist() == [1.0, 0.0] and m["margin"].tolist() == [1.0, -1.0]
    assert m["mean_reward"].tolist() == [1.5, 0.5]
    # margin 1: −log σ(1 − 1) = log 2 = 0.693147, −log σ(−1 − 1) = log(1 + e²) = 2.126928
    losses, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    torch.testing.assert_close(losses, torch.tensor([0.693147, 2.126928]), rtol=0, atol=1e-6)
    # per-pair margins 0 and 2: −log σ(1) = 0.313262, −log σ(−1 − 2) = log(1 + e³) = 3.048587; centering
    # c = 0.1 adds 0.1·(2 + 1)² = 0.9 and 0.1·(0 + 1)² = 0.1 → 1.213262, 3.148587
    losses, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.0, 2.0]), center_rewards_coefficient=0.1)
    torch.testing.assert_close(losses, torch.tensor([1.213262, 3.148587]), rtol=0, atol=1e-6)


def test_gae_on_a_five_token_trajectory():
    from components.training.objectives import gae

    # γ = 1, λ = 0.95; values V = 0.5, 0.4, 0.6, 0.3, 0.2; the reward only on the last token: r = 0, 0, 0, 0, 1
    # δ_t = r_t + γ·V_{t+1} − V_t (V_5 = 0: the episode ends):
    #   δ_4 = 1 + 0 − 0.2 = 0.8, δ_3 = 0.2 − 0.3 = −0.1, δ_2 = 0.3 − 0.6 = −0.3, δ_1 = 0.6 − 0.4 = 0.2,
    #   δ_0 = 0.4 − 0.5 = −0.1
    # Â_t = δ_t + γλ·Â_{t+1}: Â_4 = 0.8, Â_3 = −0.1 + 0.95·0.8 = 0.66, Â_2 = −0.3 + 0.95·0.66 = 0.327,
    #   Â_1 = 0.2 + 0.95·0.327 = 0.51065, Â_0 = −0.1 + 0.95·0.51065 = 0.3851175
    # returns G = Â + V: 0.8851175, 0.91065, 0.927, 0.96, 1.0
    # a second, 2-token trajectory padded to 5: r = 0, 2; V = 1, 0.5 → δ_1 = 2 − 0.5 = 1.5, δ_0 = 0.5 − 1 = −0.5;
    #   Â_1 = 1.5, Â_0 = −0.5 + 0.95·1.5 = 0.925; G = 1.925, 2.0; 0 on the padding (whatever is there)
    rewards = torch.tensor([[0.0, 0, 0, 0, 1], [0, 2, 9, 9, 9]])
    values = torch.tensor([[0.5, 0.4, 0.6, 0.3, 0.2], [1.0, 0.5, 9, 9, 9]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.3851175, 0.51065, 0.327, 0.66, 0.8],
                                                  [0.925, 1.5, 0, 0, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.8851175, 0.91065, 0.927, 0.96, 1.0], [1.925, 2.0, 0, 0, 0]]))


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    from components.training.objectives import kl_penalized_rewards

    # β = 0.5, k1 = 0.2, −0.4, 0.6 | 0.4 (one token, then padding); scores 1 and −1
    # r = −0.1, 0.2, −0.3 + 1 = 0.7 | −0.2 − 1 = −1.2, 0, 0
    kl = torch.tensor([[0.2, -0.4, 0.6], [0.4, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    rewards = kl_penalized_rewards(torch.tensor([1.0, -1.0]), kl, mask, 0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.2, 0.7], [-1.2, 0, 0]]))


def test_clipped_value_loss():
    from components.training.objectives import clipped_value_loss

    # ε_v = 0.2, V_old = 0.5 everywhere, so clip(V) ∈ [0.3, 0.7]; three tokens:
    #   V = 1.0, G = 2: (1 − 2)² = 1, clipped (0.7 − 2)² = 1.69 → max 1.69 (clipped)
    #   V = 0.0, G = 0: 0, clipped (0.3 − 0)² = 0.09 → 0.09 (clipped)
    #   V = 0.5, G = 0: 0.25, clip leaves 0.5 → 0.25 (not clipped)
    # loss = ½·(1.69 + 0.09 + 0.25) / 3 = 0.3383333; clipfrac sum 2; vpred sum 1.5; error sum 1.25
    vpred = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    old, returns, mask = torch.full((3,), 0.5), torch.tensor([2.0, 0.0, 0.0]), torch.ones(3)
    loss, m = clipped_value_loss(vpred, old, returns, mask, 3.0, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.3383333))
    assert (float(m["val/clipfrac_avg"]), float(m["val/vpred"]), float(m["val/error"])) == (2.0, 1.5, 1.25)
    # the clipped tokens give no gradient (the clipped term is constant in V there); the third: (V − G)/3 = 1/6
    loss.backward()
    torch.testing.assert_close(vpred.grad, torch.tensor([0.0, 0.0, 0.5 / 3]))
    # no clip (A2C): ½·(1 + 0 + 0.25) / 3 = 0.2083333
    loss, m = clipped_value_loss(vpred.detach(), old, returns, mask, 3.0, cliprange_value=None)
    torch.testing.assert_close(loss, torch.tensor(0.2083333))
    assert float(m["val/clipfrac_avg"]) == 0.0


def test_adaptive_kl_controller_one_update():
    from components.training.objectives import KLController

    # β = 0.1, target 6, horizon 10000, a rollout of n = 256 samples:
    # KL 9: e = clip(9/6 − 1 = 0.5, −0.2, 0.2) = 0.2 → β·(1 + 0.2·256/10000) = 0.1·1.00512 = 0.100512
    ctl = KLController(0.1, "adaptive", target=6.0, horizon=10000.0)
    assert ctl.update(9.0, 256) == pytest.approx(0.100512, rel=1e-12)
    # KL 5.4: e = 5.4/6 − 1 = −0.1 → 0.100512·(1 − 0.1·256/10000) = 0.100512·0.99744 = 0.10025468928
    assert ctl.update(5.4, 256) == pytest.approx(0.10025468928, rel=1e-9)
    fixed = KLController(0.1, "fixed")
    assert fixed.update(9.0, 256) == 0.1


def test_grpo_tis_weights_the_policy_gradient_and_not_the_kl():
    # as TRL's GRPOTrainer and verl: ρ = min(π_old / π_rollout, C) multiplies the surrogate; β·KL is added after
    old = torch.log(torch.tensor([0.5, 0.5]))
    logp = torch.log(torch.tensor([0.55, 0.45])).requires_grad_()  # r = 1.1, 0.9: inside the clip range
    adv, w = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5])
    ref = torch.log(torch.tensor([0.6, 0.3]))
    rho = torch.tensor([2.0, 0.25])
    loss, _ = grpo_loss(logp, old, adv, torch.ones(2), w, epsilon_low=0.2, epsilon_high=0.28, ref_logp=ref,
                        beta=0.1, is_weights=rho)
    kl = [0.6 / 0.55 - math.log(0.6 / 0.55) - 1, 0.3 / 0.45 - math.log(0.3 / 0.45) - 1]
    # −ρ·r·Â per token: −2·1.1·1, −0.25·0.9·(−1); the KL weighed by w only
    expect = 0.5 * (-2 * 1.1) + 0.5 * (0.25 * 0.9) + 0.1 * 0.5 * sum(kl)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # d/dlogp: −w·ρ·Â·r (the surrogate) + β·w·(1 − π_ref/π_θ) (the KL)
    grad = -0.5 * rho * adv * torch.tensor([1.1, 0.9]) + 0.1 * 0.5 * torch.tensor([1 - 0.6 / 0.55, 1 - 0.3 / 0.45])
    torch.testing.assert_close(logp.grad, grad)


def test_whiten_is_exact_when_the_mean_dwarfs_the_std():
    from components.training.objectives import whiten

    # mean 1e3, std 1: E[x²] − mean² in float32 cancels to noise (the float32 sums were off by 0.1 here)
    values = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) + 1e3
    mask = torch.ones_like(values)
    mask[:, 24:] = 0  # padding counts nowhere
    x = values.double()[:, :24]
    reference = (x - x.mean()) / torch.sqrt(x.var() + 1e-8)
    out = whiten(values, mask)
    assert out.dtype == torch.float32 and bool((out[:, 24:] == 0).all())
    assert float((out[:, :24].double() - reference).abs().max()) < 1e-5


def test_adaptive_kl_coefficient_never_turns_negative():
    from components.config import ConfigError, from_mapping
    from components.ppo.config import PPOConfig
    from components.training.objectives import KLController

    # one update from β = 0.1 with horizon 100 and a round of 640 samples, KL at 0.821875 of its target:
    # 1 + (0.821875 − 1)·640/100 = −0.14, so the unchecked update gave β = −0.014
    ctl = KLController(0.1, "adaptive", target=1.0, horizon=100.0)
    with pytest.raises(ValueError, match="kl_horizon=100 is invalid for 640 samples per update: > 128"):
        ctl.update(0.821875, 640)
    assert ctl.value == 0.1
    # n / horizon just under 5: the lowest multiplier 1 − 0.2·4.99 = 0.002 keeps β positive
    assert KLController(0.1, "adaptive", target=1.0, horizon=100.0).update(0.0, 499) == pytest.approx(2e-4)
    base = {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"}, "rewards": [{"name": "arithmetic"}],
            "kl_coef": 0.1, "kl_controller": "adaptive", "kl_horizon": 100}
    with pytest.raises(ConfigError, match=r"^config: kl_horizon: 100.0 is invalid: > train.batch_size / 5 = 128 "):
        from_mapping(PPOConfig, {**base, "train": {"batch_size": 640}})
    assert from_mapping(PPOConfig, {**base, "train": {"batch_size": 499}}).kl_horizon == 100
    assert from_mapping(PPOConfig, {**base, "kl_controller": "fixed", "train": {"batch_size": 640}})  # β never moves


def test_vf_coef_is_refused_a_loss_scale_only_moved_the_critic_clip():
    from components.config import ConfigError, from_mapping
    from components.ppo.config import PPOConfig
    from components.training.config import TrainConfig
    from components.training.distributed import Dist, make_engine

    # the critic's own engine (as Session builds it: AdamW, then gradient-norm clipping) steps the same on c·L
    # clipped at C as on L clipped at C / c: a weight on the value loss is only a clip threshold in disguise
    def critic_after_steps(scale, clip):
        torch.manual_seed(0)
        critic = torch.nn.Linear(8, 1)
        engine = make_engine(critic, TrainConfig(lr=1e-2, grad_clip=clip, weight_decay=0.1), lambda step: 1.0, Dist())
        data = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(5):
            x, target = torch.randn(16, 8, generator=data), torch.randn(16, 1, generator=data)
            engine.backward(scale * 0.5 * ((critic(x) - target) ** 2).mean(), last=True)
            norms.append(engine.step())
        return torch.cat([p.detach().reshape(-1) for p in critic.parameters()]), norms

    plain, norms = critic_after_steps(1.0, 0.0)
    clipped = critic_after_steps(1.0, 1.0)[0]
    assert min(norms) < 1.0 < max(norms) and float((plain - clipped).abs().max()) > 1e-3  # clip 1 acts on some steps
    torch.testing.assert_close(critic_after_steps(100.0, 0.0)[0], plain, rtol=1e-5, atol=1e-6)  # no clip: no effect
    torch.testing.assert_close(critic_after_steps(100.0, 100.0)[0], clipped, rtol=1e-5, atol=1e-6)
    assert float((critic_after_steps(100.0, 1.0)[0] - clipped).abs().max()) > 1e-3  # the same clip: another critic
    base = {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"}, "rewards": [{"name": "arithmetic"}]}
    with pytest.raises(ConfigError, match=r"^config: vf_coef: removed: the critic has its own AdamW.* set "
                                          r"critic_grad_clip \(and critic_lr\) instead$"):
        from_mapping(PPOConfig, {**base, "vf_coef": 0.1})
    cfg = from_mapping(PPOConfig, {**base, "train": {"grad_clip": 2.0}})
    assert cfg.critic_train.grad_clip == 2.0  # the critic clips as the actor unless told otherwise
    assert from_mapping(PPOConfig, {**base, "critic_grad_clip": 10.0}).critic_train.grad_clip == 10.0


def test_minibatches_shuffle_each_pass_from_the_seed_round_and_pass():
    import random

    from components.training.rl import minibatches

    kept = list(range(8))
    state = random.getstate(), torch.get_rng_state()
    steps = minibatches(kept, 3, 6, shuffle=(7, 2))
    assert (random.getstate(), torch.get_rng_state().tolist()) == (state[0], state[1].tolist())  # global RNGs untouched
    assert [len(s) for s in steps] == [4] * 6
    passes = [steps[0] + steps[1], steps[2] + steps[3], steps[4] + steps[5]]
    assert all(sorted(p) == kept for p in passes)  # each pass is every sample once
    assert len({tuple(p) for p in passes} | {tuple(kept)}) == 4  # in an order of its own, none the unshuffled one
    assert minibatches(kept, 3, 6, shuffle=(7, 2)) == steps  # a resume cuts the round the same way
    assert minibatches(kept, 3, 6, shuffle=(7, 3)) != steps and minibatches(kept, 3, 6, shuffle=(8, 2)) != steps
    assert minibatches([], 2, 4, shuffle=(7, 2)) == [[], [], [], []]
    # a pass that does not split evenly: each pass is cut on its own, so no minibatch holds a sample twice
    for seed in range(50):
        uneven = minibatches(list(range(5)), 2, 4, shuffle=(seed, 0))
        assert all(len(set(m)) == len(m) for m in uneven) and sorted(sum(uneven, [])) == sorted(list(range(5)) * 2)
