"""The off-policy correction's weights (objectives.importance_weights), per token and per sequence, truncated and
masked, on hand-computed cases; and its keys checked with the spec for grpo and ppo."""
import math

import pytest
import torch

from components.config import ConfigError, from_mapping
from components.grpo.config import GRPOConfig
from components.ppo.config import PPOConfig
from components.training.objectives import IS_METRICS, importance_weights

# π_old / π_rollout of each token: A [3, 0.25, 1], B [1.5, 1.6, padding], C [0.6, 0.6, padding]; the padding's
# log-ratio is large on purpose (it must count nowhere)
RATIOS = [[3.0, 0.25, 1.0], [1.5, 1.6, math.e ** 5], [0.6, 0.6, math.e ** 5]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
CAP = 2.0  # mask keeps [1/2, 2]

# products: A 0.75, B 2.4 (> 2), C 0.36 (< 1/2)
EXPECTED = {
    ("token", "truncate"): ([[2.0, 0.25, 1.0], [1.5, 1.6, 0.0], [0.6, 0.6, 0.0]], [[1, 0, 0], [0, 0, 0], [0, 0, 0]]),
    ("token", "mask"): ([[0.0, 0.0, 1.0], [1.5, 1.6, 0.0], [0.6, 0.6, 0.0]], [[1, 1, 0], [0, 0, 0], [0, 0, 0]]),
    ("sequence", "truncate"): ([[0.75] * 3, [2.0, 2.0, 0.0], [0.36, 0.36, 0.0]], [[0, 0, 0], [1, 1, 0], [0, 0, 0]]),
    ("sequence", "mask"): ([[0.75] * 3, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0, 0, 0], [1, 1, 0], [1, 1, 0]]),
}


def log_probs():
    """(π_old, π_rollout) log-probs with the ratios above; π_old requires a gradient, as the trainer's may."""
    rollout = -torch.rand(3, 3) - 0.5
    old = (rollout + torch.tensor(RATIOS).log()).requires_grad_()
    return old, rollout


@pytest.mark.parametrize("level, mode", list(EXPECTED))
def test_each_level_and_mode_on_hand_computed_ratios(level, mode):
    torch.manual_seed(0)
    old, rollout = log_probs()
    weights, bounded = importance_weights(old, rollout, MASK, cap=CAP, level=level, mode=mode)
    expected, hit = EXPECTED[level, mode]
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-5), weights
    assert torch.equal(bounded, torch.tensor(hit, dtype=torch.float32))
    assert not weights.requires_grad  # the weights change the measure, not the objective


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_a_sequence_level_weight_is_the_same_on_every_token_of_its_sequence(mode):
    torch.manual_seed(1)
    rollout = -torch.rand(4, 6)
    old = rollout + 0.3 * torch.randn(4, 6)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 2 + [0.0] * 4, [1.0] + [0.0] * 5])
    weights, _ = importance_weights(old, rollout, mask, cap=1.5, level="sequence", mode=mode)
    per_token, _ = importance_weights(old, rollout, mask, cap=math.inf, level="token", mode="truncate")
    for row in range(4):
        n = int(mask[row].sum())
        assert torch.all(weights[row, :n] == weights[row, 0]) and torch.all(weights[row, n:] == 0)
        product = float(torch.prod(per_token[row, :n]))  # the product of the sequence's token ratios
        expected = min(product, 1.5) if mode == "truncate" else (product if 1 / 1.5 <= product <= 1.5 else 0.0)
        assert float(weights[row, 0]) == pytest.approx(expected, rel=1e-5)


def test_equal_log_probs_weigh_every_token_one_and_bound_none():
    logp = -torch.rand(2, 5)
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            weights, bounded = importance_weights(logp, logp.clone(), torch.ones(2, 5), cap=1.0, level=level,
                                                  mode=mode)
            assert torch.equal(weights, torch.ones(2, 5)) and bounded.sum() == 0


def test_the_metric_names_are_verls():
    assert IS_METRICS == {"truncate": "rollout_corr/rollout_is_ratio_fraction_high",
                          "mask": "rollout_corr/rollout_rs_masked_fraction"}


BASE = {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"}, "rollout": {"engine": "vllm"}}
CONFIGS = {GRPOConfig: BASE, PPOConfig: {**BASE, "rewards": [{"name": "arithmetic"}]}}


@pytest.mark.parametrize("cls", list(CONFIGS))
@pytest.mark.parametrize("keys, message", [
    ({"tis_cap": 2.0, "tis_level": "seq"}, r"^config: tis_level: 'seq' is invalid: one of token, sequence"),
    ({"tis_cap": 2.0, "tis_mode": "clip"}, r"^config: tis_mode: 'clip' is invalid: one of truncate, mask"),
    ({"tis_level": "sequence"}, r"^config: tis_level: 'sequence' is invalid: token \(the default\) without tis_cap"),
    ({"tis_mode": "mask"}, r"^config: tis_mode: 'mask' is invalid: truncate \(the default\) without tis_cap"),
    ({"tis_cap": 0.5}, r"^config: tis_cap: 0.5 is invalid: null \(off\) or a number ≥ 1"),
    ({"tis_cap": True}, r"^config: tis_cap: True is invalid"),
    ({"tis_cap": 1.0, "tis_mode": "mask"}, r"^config: tis_cap: 1.0 is invalid: a number > 1 with tis_mode mask"),
])
def test_the_correction_keys_are_checked_with_the_spec(cls, keys, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(cls, {**CONFIGS[cls], **keys})
    cfg = from_mapping(cls, {**CONFIGS[cls], "tis_cap": 2.0, "tis_level": "sequence", "tis_mode": "mask"})
    assert (cfg.tis_cap, cfg.tis_level, cfg.tis_mode) == (2.0, "sequence", "mask")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_a_steps_weights_follow_the_configs_level_and_mode(level):
    """rl_loop.correction_weights (what grpo_step and ppo_step weigh the loss with) takes the round's π_old and engine
    log-probs of the step's samples, and cfg's tis_cap, tis_level and tis_mode: sample 2 (two tokens, ratios 1.5 and
    1.6) gets [1.5, 1.6] per token, 2.4 cut to 2 on both tokens per sequence; its bounded tokens are summed."""
    from types import SimpleNamespace

    from components.training.rl_loop import correction_weights

    old, rollout = log_probs()
    lengths = [3, 2, 2]
    rnd = SimpleNamespace(old_logprobs=[old[i, :n].detach() for i, n in enumerate(lengths)],
                          rollout_logprobs=[rollout[i, :n] for i, n in enumerate(lengths)])
    cfg = SimpleNamespace(tis_cap=CAP, tis_level=level, tis_mode="truncate")
    weights, sums = correction_weights(cfg, rnd, [1, 0])
    expected, bounded = EXPECTED[(level, "truncate")]
    assert [w.tolist() for w in weights] == [pytest.approx(expected[1][:2]), pytest.approx(expected[0])]
    assert sums == {IS_METRICS["truncate"]: float(sum(bounded[1]) + sum(bounded[0]))}
    assert correction_weights(SimpleNamespace(tis_cap=None), rnd, [0]) == (None, {})
