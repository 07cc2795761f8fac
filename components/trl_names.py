"""The metrics our stages log under TRL's names, and the TRL trainer that logs each.

A stage's README says "with TRL's names" of exactly its names here; every other metric it logs is ours (`kl_old`,
`rollout_s`, `tokens_per_s`, ...) and is not claimed to be TRL's. tests/unit/test_metric_names.py keeps this true:
the keys a tiny run of each stage logs, the READMEs, and each name's presence in its trainer's source in the
installed TRL (`TRL_VERSION`, the `bench` extra's pin).

TRL 1.16 has no PPO trainer (trl.experimental.ppo was removed): the PPO names are those of
trl.experimental.ppo.PPOTrainer in `PPO_TRL_VERSION`. TRL logs them once per rollout, its `_avg` being means over
the rollout's minibatches; the ppo stage logs them per optimizer step, as means over the step's tokens.
`<fn>` stands for a reward function's name.
"""

from __future__ import annotations

TRL_VERSION = "1.16.0"
PPO_TRL_VERSION = "1.9.0"

# trainer → its source file in the trl package
TRL_TRAINERS = {
    "GRPOTrainer": "trl/trainer/grpo_trainer.py",
    "SFTTrainer": "trl/trainer/sft_trainer.py",
    "DPOTrainer": "trl/trainer/dpo_trainer.py",
    "RewardTrainer": "trl/trainer/reward_trainer.py",
    "PPOTrainer": "trl/experimental/ppo/ppo_trainer.py",
}

_GRPO_REWARDS = ("reward", "reward_std", "rewards/<fn>/mean")
_CLIP_RATIOS = ("clip_ratio/low_mean", "clip_ratio/high_mean")

# stage → {metric: the TRL trainer that logs it under that name}
TRL_NAMES: dict[str, dict[str, str]] = {
    "grpo": dict.fromkeys((*_GRPO_REWARDS, "rewards/<fn>/std", "frac_reward_zero_std", "completions/mean_length",
                           "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                           "entropy", "kl", *_CLIP_RATIOS, "sampling/sampling_logp_difference/mean",
                           "sampling/sampling_logp_difference/max"), "GRPOTrainer"),
    "sft": {"entropy": "SFTTrainer"},
    "psft": {"entropy": "SFTTrainer", **dict.fromkeys(_CLIP_RATIOS, "GRPOTrainer")},
    "sft_kl": {"entropy": "SFTTrainer"},
    "ppo": {**dict.fromkeys(("objective/kl", "objective/entropy", "objective/non_score_reward",
                             "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
                             "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg",
                             "val/clipfrac_avg", "lr"), "PPOTrainer"),
            **dict.fromkeys((*_GRPO_REWARDS, "completions/mean_length", "completions/clipped_ratio"),
                            "GRPOTrainer")},
    "dpo": dict.fromkeys(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "entropy"),
                         "DPOTrainer"),
    "reward_model": dict.fromkeys(("accuracy", "margin", "mean_reward"), "RewardTrainer"),
}
