"""Each stage's config class lives in its light config.py, and the names a config validates against are those the
engine implements."""

from __future__ import annotations

import pytest

from components.stages import STAGES


@pytest.mark.parametrize("stage", [s for s in STAGES.values() if not s.package], ids=lambda s: s.name)
def test_a_stage_s_config_class_is_in_its_config_module(stage):
    cls = stage.config_class()
    assert cls.__module__ == f"components.{stage.module}.config"
    assert cls.__name__ == stage.config


def test_the_advantage_names_a_config_accepts_are_the_estimators_the_engine_has():
    from components.training.advantages import ADV_ESTIMATOR_REGISTRY
    from components.training.config import KL_IN_REWARD

    # grpo selects every estimator but gae, which needs a critic (ppo's)
    assert set(ADV_ESTIMATOR_REGISTRY) == set(KL_IN_REWARD) | {"gae"}
    assert {name for name, kl_in_reward in KL_IN_REWARD.items() if kl_in_reward} == {"reinforce_pp"}
