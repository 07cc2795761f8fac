"""The ppo stage's config, light: `python -m pipelines.spec check` builds it without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

from components.config import positive_ints, require
from components.evaluation.suites import TrainingEval
from components.models.config import ModelLoading
from components.prompts import PromptSource
from components.training.async_keys import AsyncKeys, check_async
from components.training.config import (
    KL_CONTROLLERS,
    Adapter,
    RolloutEngine,
    Sampling,
    TrainConfig,
    check_round_checkpoints,
)

PRESETS = {"ppo": {"ppo_epochs": 4, "num_minibatches": 1, "cliprange": 0.2, "cliprange_value": 0.2},
           "a2c": {"ppo_epochs": 1, "num_minibatches": 1, "cliprange": None, "cliprange_value": None}}
"""What each preset sets among the keys left unset (null); a2c refuses them set: it is one on-policy step."""
CRITIC_INITS = ("auto", "reward_model", "policy")


@dataclass(kw_only=True)
class PPOConfig(AsyncKeys):
    """A PPO stage: the rewards, the critic, the KL penalty, GAE and the clipped losses, and the parts `train`,
    `prompts`, `sampling`, `loading` and `lora`; the keys of asynchronous RL and the off-policy correction it shares
    with grpo (AsyncKeys)."""

    REMOVED: ClassVar[dict[str, str]] = {
        "vf_coef": "removed: the critic has its own AdamW, whose steps ignore a constant scale on its loss, so "
                   "vf_coef only moved the critic's gradient clip to train.grad_clip / vf_coef; set critic_grad_clip "
                   "(and critic_lr) instead"}
    """Keys a spec may still set from an older version, and why each is refused (components/config.py)."""

    model: str
    """Policy (actor) to start from: a Hugging Face directory with safetensors weights."""
    output_dir: str
    """Where model/, critic/, metrics.jsonl, samples.jsonl, summary.json and checkpoints/ go."""
    prompts: PromptSource
    """The prompts sampled from: a JSONL (`path`) or a bundled task (components/prompts.py)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, lr=1e-5))
    """Steps (optimizer steps of the actor; the critic takes as many), batch (prompts per rollout, one
    completion each: TRL's batch_size), learning rate, checkpoints, ... (components/README.md)."""
    sampling: Sampling = field(default_factory=Sampling)
    """Temperature, top_p, max_new_tokens of the rollout (components/README.md)."""
    rollout: RolloutEngine = field(default_factory=RolloutEngine)
    """The rollout engine that samples: hf (the actor itself) or vllm (one colocated engine per rank, or with
    rollout_worker one in a process of its own; the actor's weights synced after each round's optimizer steps;
    components/README.md)."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the models are loaded (components/README.md)."""
    lora: Adapter = field(default_factory=Adapter)
    """LoRA/QLoRA adapters on the actor (the critic trains every weight); the reference is then the actor's base
    with the adapter disabled (components/README.md)."""
    rewards: list[dict] = field(default_factory=list)
    """Reward functions and weights (components/rewards): the spec's `rewards`, or set here to give PPO its own,
    e.g. [{name: reward_model, uri: stage:reward_model}] (the model the reward_model stage of the run trained)."""
    preset: str = "ppo"
    """ppo, or a2c: one pass over each rollout in one minibatch, no clipping (advantage actor-critic)."""
    ppo_epochs: int | None = None
    """Passes over each rollout (preset ppo: 4)."""
    num_minibatches: int | None = None
    """Optimizer steps per pass; each takes train.batch_size / num_minibatches sequences (preset ppo: 1)."""
    cliprange: float | None = None
    """ε of the actor's clipped surrogate (preset ppo: 0.2)."""
    cliprange_value: float | None = None
    """ε_v of the critic's clipped value loss (preset ppo: 0.2)."""
    critic_lr: float | None = None
    """Peak learning rate of the critic (default: train.lr); same schedule shape as the actor's."""
    critic_grad_clip: float | None = None
    """Clip of the critic's gradient norm (default: train.grad_clip; 0 disables). The critic has its own AdamW,
    so this and critic_lr are what set how it learns (there is no weight on its loss: AdamW ignores one)."""
    critic_init: str = "auto"
    """reward_model (the critic starts as the first reward_model reward's model, head included; at zero for a
    reward model with head logprob), policy (the actor's weights and a new value head at zero), or auto
    (reward_model when a reward is one, else policy)."""
    gamma: float = 1.0
    """γ: discount of GAE."""
    lam: float = 0.95
    """λ: GAE's bias-variance trade-off."""
    whiten_advantages: bool = True
    """Whiten Â over the round's tokens (all ranks): zero mean, unit variance."""
    kl_coef: float = 0.05
    """β: the initial coefficient of the per-token k1 KL penalty to the reference in the reward (0: no reference)."""
    kl_controller: str = "fixed"
    """fixed (β stays kl_coef) or adaptive (Ziegler et al.: β moves to keep the KL near kl_target)."""
    kl_target: float = 6.0
    """adaptive: the KL per sequence (nats, summed over tokens) β steers toward."""
    kl_horizon: float = 10000.0
    """adaptive: how many samples β takes to correct a KL error (larger: slower)."""
    ref_model: str | None = None
    """The reference of the KL penalty (default: the starting policy; with LoRA, the base with the adapter
    disabled)."""
    samples_logged: int = 4
    """Scored completions written to samples.jsonl per round."""
    eval: TrainingEval = field(default_factory=TrainingEval)
    """Evaluation by generation every `eval.every` optimizer steps: suites, sampling, pass@k (off by default;
    components/README.md); beside the training reward, a reward-hacking warning (docs/tracking.md)."""

    def __post_init__(self):
        require(self.preset in PRESETS, "preset", self.preset, f"one of {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if self.preset == "a2c":
                require(getattr(self, key) is None, key, getattr(self, key), "unset with preset a2c (it fixes it)")
            if getattr(self, key) is None:
                setattr(self, key, value)
        positive_ints(self, "ppo_epochs", "num_minibatches")
        require(self.train.batch_size % self.num_minibatches == 0, "train.batch_size", self.train.batch_size,
                f"a multiple of num_minibatches = {self.num_minibatches}")
        for key in ("cliprange", "cliprange_value"):
            value = getattr(self, key)
            require(value is None or (math.isfinite(value) and value > 0), key, value, "a positive number")
        require(self.cliprange is None or self.cliprange < 1, "cliprange", self.cliprange, "a number in (0, 1)")
        require(self.rewards != [], "rewards", self.rewards,
                "a non-empty list: ppo needs a reward to maximize; give the spec's `rewards` or the stage's own, "
                "e.g. rewards: [{name: reward_model, uri: stage:reward_model}] or [{name: arithmetic}]")
        require(self.critic_init in CRITIC_INITS, "critic_init", self.critic_init, f"one of {', '.join(CRITIC_INITS)}")
        has_model = any(isinstance(r, dict) and r.get("name") == "reward_model" for r in self.rewards)
        if self.critic_init == "auto":
            self.critic_init = "reward_model" if has_model else "policy"
        require(self.critic_init != "reward_model" or has_model, "critic_init", self.critic_init,
                "policy or auto when no reward is a reward_model (or add one)")
        require(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", self.kl_coef, "a number ≥ 0")
        require(self.critic_lr is None or (math.isfinite(self.critic_lr) and self.critic_lr > 0), "critic_lr",
                self.critic_lr, "a positive number")
        require(self.critic_grad_clip is None or (math.isfinite(self.critic_grad_clip) and self.critic_grad_clip >= 0),
                "critic_grad_clip", self.critic_grad_clip, "a number ≥ 0, or null (train.grad_clip)")
        require(0 <= self.gamma <= 1, "gamma", self.gamma, "a number in [0, 1]")
        require(0 <= self.lam <= 1, "lam", self.lam, "a number in [0, 1]")
        require(self.kl_controller in KL_CONTROLLERS, "kl_controller", self.kl_controller,
                f"one of {', '.join(KL_CONTROLLERS)}")
        require(self.kl_controller == "fixed" or self.kl_coef > 0, "kl_coef", self.kl_coef,
                "> 0 with kl_controller adaptive (it scales β)")
        require(self.kl_target > 0 and self.kl_horizon > 0, "kl_target", (self.kl_target, self.kl_horizon),
                "kl_target and kl_horizon: positive numbers")
        # a round of n = train.batch_size samples multiplies β by 1 + e·n / kl_horizon with e down to −0.2: at
        # n / kl_horizon ≥ 5 that is ≤ 0, and β would turn negative (a bonus for leaving the reference) or stick at 0
        require(self.kl_controller == "fixed" or self.train.batch_size < 5 * self.kl_horizon, "kl_horizon",
                self.kl_horizon, f"> train.batch_size / 5 = {self.train.batch_size / 5:g} with kl_controller "
                "adaptive (a round multiplies β by 1 + clip(KL/kl_target − 1, ±0.2)·train.batch_size/kl_horizon)")
        require(self.ref_model is None or self.kl_coef > 0, "ref_model", self.ref_model,
                "unset with kl_coef 0: only the KL penalty reads it")
        require(not (self.rollout.engine == "vllm" and self.lora.quantize != "none"), "rollout.engine",
                self.rollout.engine, "hf with lora.quantize (the vllm engine takes the base with the adapters merged "
                "in, and a 4- or 8-bit base is not merged)")
        require(self.rollout.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
                self.rollout.tensor_parallel_size, "1 in ppo (each rank's rollout engine is colocated with its "
                "trainer; tensor parallelism is for evaluate and reward_scoring)")
        check_round_checkpoints(self.train, self.steps_per_round)
        check_async(self)

    @property
    def steps_per_round(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    @property
    def critic_train(self) -> TrainConfig:
        return replace(self.train, lr=self.critic_lr or self.train.lr,
                       grad_clip=self.train.grad_clip if self.critic_grad_clip is None else self.critic_grad_clip)

    def reward_model_path(self) -> str | None:
        """The model of the first reward_model reward (the critic's start with critic_init reward_model)."""
        return next((r["uri"] for r in self.rewards if r.get("name") == "reward_model"), None)
