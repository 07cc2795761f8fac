"""The advantage-estimator registry of the RL loop: a name is registered once, an unknown name is refused (by the
registry, and by a grpo config before anything loads), and GAE reads the critic's values."""

import pytest
import torch

from components.config import ConfigError, from_mapping
from components.grpo.config import GRPOConfig
from components.training.advantages import ADV_ESTIMATOR_REGISTRY, Scores, get_adv_estimator, register_adv_est
from components.training.objectives import gae, kl_penalized_rewards, whiten


def scores(**extra) -> Scores:
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.1, -0.2, 0.3], [0.05, 0.0, 0.0], [0.2, 0.1, 0.0], [-0.1, 0.0, 0.4]])
    return Scores(rewards=rewards, gathered=rewards, start=0, group_size=2, kl=kl, mask=mask,
                  reduce=lambda sums: sums, **extra)


def test_a_second_estimator_under_a_taken_name_is_refused():
    before = dict(ADV_ESTIMATOR_REGISTRY)
    with pytest.raises(ValueError, match="advantage estimator 'grpo' is already registered"):
        register_adv_est("grpo")(lambda scores: (scores.mask, None))
    register_adv_est("gae")(ADV_ESTIMATOR_REGISTRY["gae"])  # the same function again (a re-import) is no clash
    assert ADV_ESTIMATOR_REGISTRY == before


def test_an_unknown_estimator_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'vtrace': one of grpo, rloo, reinforce_pp, gae"):
        get_adv_estimator("vtrace")


@pytest.mark.parametrize("name", ["vtrace", "gae"])  # gae needs a critic: grpo has none
def test_a_grpo_config_refuses_an_estimator_it_cannot_run_in_one_line(name):
    with pytest.raises(ConfigError) as error:
        from_mapping(GRPOConfig, {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"},
                                  "advantage": name})
    assert str(error.value).count("\n") == 0
    assert f"advantage: {name!r} is invalid: one of grpo, rloo, reinforce_pp" in str(error.value)


def test_gae_reads_the_critic_s_values_and_whitens_on_request():
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.0, 0.0], [0.1, 0.9, 0.0], [0.3, 0.3, 0.3]])
    with pytest.raises(ValueError, match="'gae' needs the critic's values"):
        get_adv_estimator("gae")(scores(kl_coef=0.1, options={"gamma": 1.0, "lam": 0.95}))
    base = scores(kl_coef=0.1, values=values, options={"gamma": 0.9, "lam": 0.8})
    token_rewards = kl_penalized_rewards(base.rewards, base.kl, base.mask, 0.1)
    expect_adv, expect_ret = gae(token_rewards, values, base.mask, gamma=0.9, lam=0.8)
    advantages, returns = get_adv_estimator("gae")(base)
    torch.testing.assert_close(advantages, expect_adv)
    torch.testing.assert_close(returns, expect_ret)
    whitened, _ = get_adv_estimator("gae")(scores(kl_coef=0.1, values=values,
                                                  options={"gamma": 0.9, "lam": 0.8, "whiten": True}))
    torch.testing.assert_close(whitened, whiten(expect_adv, base.mask))
    assert not torch.allclose(whitened, advantages)


def test_group_estimators_see_every_rank_s_rewards():
    """A rank's samples get the advantages of their place in the round, whatever the other ranks hold."""
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 3.0])
    whole = Scores(rewards=rewards, gathered=rewards, start=0, group_size=2, kl=torch.zeros(6, 1),
                   mask=torch.ones(6, 1), reduce=lambda sums: sums, options={"scale": "batch"})
    for name in ("grpo", "rloo"):
        one = get_adv_estimator(name)(whole)[0]
        second_rank = Scores(rewards=rewards[2:], gathered=rewards, start=2, group_size=2, kl=torch.zeros(4, 1),
                             mask=torch.ones(4, 1), reduce=lambda sums: sums, options={"scale": "batch"})
        torch.testing.assert_close(get_adv_estimator(name)(second_rank)[0], one[2:])
