"""The reward_model stage's config, light: `python -m pipelines.spec check` builds it without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.config import require
from components.models.config import ModelLoading
from components.rewards.reward_model import HEADS
from components.training.config import TrainConfig, check_ranking

EVAL_METRICS = ("accuracy", "margin", "mean_reward", "std_reward", "loss")
"""What the held-out pairs' evaluation records, as eval/<name> (components/reward_model/main.py, evaluate)."""


@dataclass(kw_only=True)
class RewardModelConfig:
    """A reward-model stage: the pairs, the held-out share and the loss, and the parts `train` and `loading`."""

    model: str
    """Model to start from: a causal LM (the SFT policy) or a reward model, a Hugging Face directory (safetensors)."""
    head: str = "scalar"
    """How a sequence is scored: scalar (a new linear head on the last token's hidden state) or logprob (β times the
    sum of the causal LM's log-probs of the completion's tokens; no new weights)."""
    beta: float = 1.0
    """β of head logprob, r = β·Σ log π (larger: the loss dwells on the pairs still ranked wrong); scalar: 1 (the
    head learns its own scale)."""
    train_data: str
    """Preference JSONL: {"prompt", "chosen", "rejected"} rows (reward_scoring's pairs.jsonl, data_prep's rows)."""
    output_dir: str
    """Where model/, metrics.jsonl, summary.json and checkpoints/ go."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, max_steps=200))
    """Steps, batch (pairs per optimizer step), learning rate, checkpoints, ... (components/README.md)."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the model is loaded (components/README.md)."""
    margin: float = 0.0
    """m in −log σ(r_c − r_r − m): how far the chosen score must clear the rejected one."""
    center_rewards_coefficient: float = 0.0
    """c (TRL's name): adds c·(r_c + r_r)² per pair, pulling the scores toward mean 0 (e.g. 0.01)."""
    eval_fraction: float = 0.1
    """Share of the pairs held out (by a hash of the prompt) and scored for the eval/* metrics."""
    eval_every: int = 0
    """Also report the eval/* metrics every N steps (0: only at the end)."""
    max_length: int = 512
    """Most tokens of a sequence; longer ones are cut from the left, as the reward reads them."""
    max_bad_fraction: float = 0.0
    """Share of unusable rows tolerated (chosen == rejected, empty prompt, ...); each is reported by line."""

    def __post_init__(self):
        require(self.head in HEADS, "head", self.head, f"one of {', '.join(HEADS)}")
        require(math.isfinite(self.beta) and self.beta > 0 and (self.head == "logprob" or self.beta == 1), "beta",
                self.beta, "a positive number with head logprob; 1 with head scalar")
        require(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "a number in [0, 1)")
        require(math.isfinite(self.margin) and self.margin >= 0, "margin", self.margin, "a number ≥ 0")
        require(math.isfinite(self.center_rewards_coefficient) and self.center_rewards_coefficient >= 0,
                "center_rewards_coefficient", self.center_rewards_coefficient, "a number ≥ 0")
        require(self.eval_every >= 0, "eval_every", self.eval_every, "an integer ≥ 0")
        require(self.max_length >= 2, "max_length", self.max_length, "an integer ≥ 2")
        check_ranking(self.train, self.eval_every,
                      [f"eval/{name}" for name in EVAL_METRICS] if self.eval_fraction else [], where="eval_every")
