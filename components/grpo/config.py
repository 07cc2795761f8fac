"""The grpo stage's config, light: `python -m pipelines.spec check` builds it without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.config import positive_ints, require
from components.evaluation.suites import TrainingEval
from components.models.config import ModelLoading
from components.prompts import PromptSource
from components.training.async_keys import AsyncKeys, check_async
from components.training.config import (
    KL_IN_REWARD,
    LOSS_AGGREGATIONS,
    SCALE_REWARDS,
    Adapter,
    RolloutEngine,
    Sampling,
    TrainConfig,
    check_clip_range,
    check_round_checkpoints,
)


@dataclass(kw_only=True)
class GRPOConfig(AsyncKeys):
    """A GRPO stage: the rewards and the objective's settings, and the parts `train`, `prompts`, `sampling` and
    `loading`; the keys of asynchronous RL and the off-policy correction it shares with ppo (AsyncKeys)."""

    model: str
    """Policy to start from: a Hugging Face directory with safetensors weights."""
    output_dir: str
    """Where model/, metrics.jsonl, samples.jsonl, summary.json and checkpoints/ go."""
    prompts: PromptSource
    """The prompts sampled from: a JSONL (`path`) or a bundled task (components/prompts.py)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=128))
    """Steps, batch (sequences per optimizer step; prompts_per_round × num_generations must be a multiple of
    it), learning rate, checkpoints, ... (components/README.md)."""
    sampling: Sampling = field(default_factory=Sampling)
    """Temperature, top_p, max_new_tokens of the rollout (components/README.md)."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the models are loaded (components/README.md)."""
    lora: Adapter = field(default_factory=Adapter)
    """LoRA/QLoRA adapters instead of full fine-tuning (off by default; components/README.md)."""
    rollout: RolloutEngine = field(default_factory=RolloutEngine)
    """The rollout engine that samples: hf or vllm, its weights synced after the optimizer steps
    (components/README.md)."""
    rewards: list[dict] = field(default_factory=lambda: [{"name": "task"}])
    """Reward functions and weights, e.g. [{name: task}, {name: format, weight: 0.1}] (components/rewards)."""
    num_generations: int = 8
    """G: completions sampled per prompt (a group)."""
    prompts_per_round: int = 16
    """Prompts sampled per round; a round yields prompts_per_round × G sequences."""
    num_iterations: int = 1
    """μ: passes over a round's samples (μ > 1 makes the clip matter)."""
    advantage: str = "grpo"
    """Advantage estimator: grpo (group-normalized), rloo (leave-one-out baseline R_i − mean_{j≠i} R_j) or
    reinforce_pp (REINFORCE++: a k1 KL to the reference, weighted by beta, folded into the reward, and the
    returns whitened over every token of the round)."""
    scale_rewards: str = "group"
    """Advantage scaling of advantage grpo: group (std of each group), batch (std of the round), none (Dr.
    GRPO)."""
    loss_aggregation: str = "token"
    """token (token-mean over a step, DAPO), sequence (mean per sequence, then over sequences: original
    GRPO) or constant (divide by sequences × max_new_tokens: Dr. GRPO)."""
    filter_zero_std: bool = False
    """Drop groups whose rewards are all equal (they carry no gradient) before training."""
    epsilon_low: float = 0.2
    """Lower clip range ε_low."""
    epsilon_high: float = 0.28
    """Upper clip range ε_high."""
    beta: float = 0.0
    """Weight of the KL to the reference model (0: no reference model is loaded): a KL_k3 term of the loss, or
    with advantage reinforce_pp a k1 penalty in the reward."""
    ref_model: str | None = None
    """β > 0: the reference model of the KL term (default: the starting policy; with LoRA, the base with the
    adapter disabled)."""
    samples_logged: int = 4
    """Scored completions written to samples.jsonl per round."""
    eval: TrainingEval = field(default_factory=TrainingEval)
    """Evaluation by generation every `eval.every` optimizer steps: suites, sampling, pass@k (off by default;
    components/README.md); beside the training reward, a reward-hacking warning
    (docs/tracking.md)."""

    def __post_init__(self):
        positive_ints(self, "num_generations", "prompts_per_round", "num_iterations")
        require(self.num_generations >= 2, "num_generations", self.num_generations,
                "≥ 2 (advantages compare a group)")
        round_size = self.prompts_per_round * self.num_generations
        require(round_size % self.train.batch_size == 0, "train.batch_size", self.train.batch_size,
                f"a divisor of prompts_per_round × num_generations = {round_size}")
        require(self.advantage in KL_IN_REWARD, "advantage", self.advantage, f"one of {', '.join(KL_IN_REWARD)}")
        require(self.scale_rewards in SCALE_REWARDS, "scale_rewards", self.scale_rewards,
                f"one of {', '.join(SCALE_REWARDS)}")
        require(self.loss_aggregation in LOSS_AGGREGATIONS, "loss_aggregation", self.loss_aggregation,
                f"one of {', '.join(LOSS_AGGREGATIONS)}")
        check_clip_range(self.epsilon_low, self.epsilon_high)
        require(math.isfinite(self.beta) and self.beta >= 0, "beta", self.beta, "a number ≥ 0")
        require(not (self.rollout.engine == "vllm" and self.lora.quantize != "none"), "rollout.engine",
                self.rollout.engine, "hf with lora.quantize (the vllm engine takes the base with the adapters merged "
                "in, and a 4- or 8-bit base is not merged)")
        tp = self.rollout.tensor_parallel_size
        require(tp == 1, "rollout.tensor_parallel_size", tp,
                "1 in grpo (each rank's rollout engine is colocated with its trainer; tensor parallelism is for "
                "evaluate and reward_scoring)")
        require(self.ref_model is None or self.beta > 0, "ref_model", self.ref_model,
                "unset with beta 0: only the KL term (beta > 0) reads it")
        check_round_checkpoints(self.train, self.steps_per_round)
        check_async(self)

    @property
    def loss_beta(self) -> float:
        """β of the loss's KL_k3 term: 0 when the estimator folds the KL into the reward instead."""
        return 0.0 if KL_IN_REWARD[self.advantage] else self.beta

    @property
    def steps_per_round(self) -> int:
        return self.num_iterations * self.prompts_per_round * self.num_generations // self.train.batch_size
