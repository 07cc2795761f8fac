"""PPO stage: an actor and a critic, a per-token KL penalty in the reward, GAE, clipped surrogate and value losses.

Single device:   python -m components.ppo --config ppo.yaml      (or: posttrain stage ppo --config ppo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.ppo --config ppo.yaml   (DeepSpeed ZeRO)

One round (a rollout): take `train.batch_size` prompts, sample one completion of each from the actor (π_old; its
per-token log-probs come from the rollout), score each with the reward functions (a trained reward model, a
verifier, or both: components/rewards), compute the reference's log-probs and the critic's values of every
completion token, then per token

    r_t = −β·(log π_old − log π_ref)_t   (+ the score on the last token)         InstructGPT's k1 penalty
    δ_t = r_t + γ·V_{t+1} − V_t,   Â_t = δ_t + γλ·Â_{t+1},   G_t = Â_t + V_t        GAE(γ, λ)

with Â whitened over the round's tokens. Then `ppo_epochs` passes over the round, each cut into
`num_minibatches` minibatches; each minibatch is one optimizer step of the actor (the clipped surrogate,
ε = cliprange) and one of the critic (½·max((V − G)², (clip(V, V_old ± cliprange_value) − G)²), weighted by
vf_coef). β is fixed or adaptive (Ziegler et al.: after each round β ← β·(1 + clip(KL/target − 1, ±0.2)·n /
horizon)). `preset: a2c` is one pass, one minibatch, no clipping (advantage actor-critic).

The critic is the causal LM's backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1),
initialized from the reward model (`critic_init: reward_model`, its head too; a reward model with head logprob has
none, so a new head at zero) or from the policy (a new head at zero). Its value at the position that predicts
completion token t is V(s_t).

Outputs in `output_dir`: model/ (the actor, Hugging Face, safetensors), critic/ (the value model), metrics.jsonl
(one line per optimizer step, TRL's metric names), samples.jsonl, summary.json, checkpoints/ (actor and critic,
both optimizers, the KL coefficient, the RNG).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from components import tracking
from components.config import positive_ints, require, stage_main
from components.models import ModelLoading, save_model
from components.models.lora import Adapter, load_policy, save_policy
from components.prompts import PromptSource
from components.reward_model.main import load_scalar_model
from components.training.batching import Example, PackedBatch, completion_values
from components.training.engines import HFEngine
from components.training.loop import Session, StepResult, TrainConfig, base_reference, step_indices
from components.training.objectives import (
    KL_CONTROLLERS,
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_k1,
    kl_penalized_rewards,
    whiten,
)
from components.training.rl import (
    check_round_checkpoints,
    completion_logprobs,
    minibatches,
    per_completion_token,
    prompts_and_rewards,
    reference_model,
    rollout_seed,
    write_samples,
)
from components.training.rollout import Sampling

log = logging.getLogger("components.ppo")

PRESETS = {"ppo": {"ppo_epochs": 4, "num_minibatches": 1, "cliprange": 0.2, "cliprange_value": 0.2},
           "a2c": {"ppo_epochs": 1, "num_minibatches": 1, "cliprange": None, "cliprange_value": None}}
"""What each preset sets among the keys left unset (null); a2c refuses them set: it is one on-policy step."""
CRITIC_INITS = ("auto", "reward_model", "policy")


@dataclass(kw_only=True)
class PPOConfig:
    """A PPO stage: the rewards, the critic, the KL penalty, GAE and the clipped losses, and the parts `train`,
    `prompts`, `sampling`, `loading` and `lora`."""

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
    vf_coef: float = 0.1
    """Weight of the value loss (it scales the critic's gradient: the critic has its own optimizer)."""
    critic_lr: float | None = None
    """Peak learning rate of the critic (default: train.lr); same schedule shape as the actor's."""
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
        for key in ("vf_coef", "kl_coef"):
            require(math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, key, getattr(self, key),
                    "a number ≥ 0")
        require(self.critic_lr is None or (math.isfinite(self.critic_lr) and self.critic_lr > 0), "critic_lr",
                self.critic_lr, "a positive number")
        require(0 <= self.gamma <= 1, "gamma", self.gamma, "a number in [0, 1]")
        require(0 <= self.lam <= 1, "lam", self.lam, "a number in [0, 1]")
        require(self.kl_controller in KL_CONTROLLERS, "kl_controller", self.kl_controller,
                f"one of {', '.join(KL_CONTROLLERS)}")
        require(self.kl_controller == "fixed" or self.kl_coef > 0, "kl_coef", self.kl_coef,
                "> 0 with kl_controller adaptive (it scales β)")
        require(self.kl_target > 0 and self.kl_horizon > 0, "kl_target", (self.kl_target, self.kl_horizon),
                "kl_target and kl_horizon: positive numbers")
        require(self.ref_model is None or self.kl_coef > 0, "ref_model", self.ref_model,
                "unset with kl_coef 0: only the KL penalty reads it")
        check_round_checkpoints(self.train, self.steps_per_round)

    @property
    def steps_per_round(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    @property
    def critic_train(self) -> TrainConfig:
        return replace(self.train, lr=self.critic_lr or self.train.lr)

    def reward_model_path(self) -> str | None:
        """The model of the first reward_model reward (the critic's start with critic_init reward_model)."""
        return next((r["uri"] for r in self.rewards if r.get("name") == "reward_model"), None)


@dataclass
class PPORound:
    """One round's samples on this rank, scored, with everything the round's optimizer steps read (per completion
    token: π_old's log-probs, the critic's values, the advantages and the returns)."""

    index: int
    rows: list[dict]
    completions: list[str]
    scores: list[float]
    examples: list[Example]
    old_logprobs: list[torch.Tensor]
    values: list[torch.Tensor]
    advantages: list[torch.Tensor]
    returns: list[torch.Tensor]
    metrics: dict
    seconds: float


def run(cfg: PPOConfig) -> dict:
    with tracking.stage_run("ppo", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def load_critic(cfg: PPOConfig, pad_token_id: int):
    """The value model: the reward model (critic_init reward_model) or the policy's weights with a value head at
    zero (critic_init policy), as a sequence-classification model with one output."""
    if cfg.critic_init == "reward_model":
        from components.rewards.reward_model import check_weights, local_dir, reward_head

        path = check_weights(local_dir(cfg.reward_model_path()))
        critic = load_scalar_model(cfg, str(path), pad_token_id)
        if reward_head(path) == "logprob":  # a log-prob reward model has no scalar head: its weights, a head at zero
            torch.nn.init.zeros_(critic.score.weight)
            critic.config.reward_head = "scalar"  # what the saved critic is
        return critic
    critic = load_scalar_model(cfg, cfg.model, pad_token_id)
    torch.nn.init.zeros_(critic.score.weight)
    return critic


def _run(cfg: PPOConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    prompt_rows, rewards = prompts_and_rewards(cfg)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    actor = load_policy(cfg.model, cfg.loading, cfg.lora, cfg.train.seed, cfg.train)
    critic = load_critic(cfg, tokenizer.pad_token_id)
    session = Session(cfg.train, actor, out, on_metrics=tracked.log_metrics, run_config=asdict(cfg),
                      companions={"critic": (critic, cfg.critic_train)})
    ref_model = reference_model(cfg, actor, session.device, cfg.kl_coef)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_controller, cfg.kl_target, cfg.kl_horizon)
    if "kl_coef" in session.resumed:
        kl_ctl.value = float(session.resumed["kl_coef"])
    dist, pad_id = session.dist, tokenizer.pad_token_id

    step = session.start_step
    while step < cfg.train.max_steps:
        rollout = ppo_rollout(cfg, session, actor, critic, ref_model, tokenizer, prompt_rows, rewards, kl_ctl,
                              round_index=step // cfg.steps_per_round)
        # β for the next round, from this one's KL (this round's rewards already hold the β they were made with)
        kl_ctl.update(rollout.metrics["objective/kl"], int(dist.all_reduce_sum(float(len(rollout.examples)))))
        if dist.rank == 0:
            write_samples(out / "samples.jsonl", rollout, cfg.samples_logged, lambda sample: {
                "score": rollout.scores[sample],
                "value": float(rollout.values[sample][0]) if len(rollout.values[sample]) else None})
        samples = list(range(len(rollout.examples)))
        steps = minibatches(samples, cfg.ppo_epochs, cfg.steps_per_round)[:cfg.train.max_steps - step]
        for position, minibatch in enumerate(steps):
            started = time.perf_counter()
            result, trained_tokens, extra = ppo_step(cfg, session, actor, critic, rollout, minibatch, pad_id)
            seconds = time.perf_counter() - started + (rollout.seconds if position == 0 else 0.0)
            lengths = [len(rollout.examples[sample]) for sample in minibatch]
            session.record(step, result, trained_tokens, lengths, seconds, extra={**rollout.metrics, **extra})
            session.maybe_checkpoint(step, {"kl_coef": kl_ctl.value})
            step += 1

    history = session.finish()
    summary = {"rounds": -(-len(history) // cfg.steps_per_round) if history else 0, "steps": len(history),
               "prompts": len(prompt_rows), "rewards": rewards.names, "final": history[-1] if history else None,
               "kl_coef": kl_ctl.value,
               "score_curve": [record["objective/scores"] for record in history[::cfg.steps_per_round]]}
    summary.update(save_policy(actor, tokenizer, out / "model", dist, cfg.lora, cfg.model, cfg.loading))
    save_model(critic, tokenizer, out / "critic", dist)
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s and %s", out / "model", out / "critic")
    return summary


def critic_values(critic, session: Session, micro_batch: PackedBatch) -> torch.Tensor:
    """V at every position of a packed micro-batch (shaped like its targets): the value head on the backbone."""
    with torch.autocast(micro_batch.input_ids.device.type, dtype=torch.bfloat16, enabled=session.autocast):
        hidden = critic.base_model(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids,
                                   use_cache=False).last_hidden_state
        return critic.score(hidden).float().squeeze(-1)


def _padded(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample token values as [N, T] (left-aligned) and their mask."""
    width = max([len(v) for v in values] + [1])
    grid, mask = torch.zeros(len(values), width), torch.zeros(len(values), width)
    for row, v in enumerate(values):
        grid[row, :len(v)], mask[row, :len(v)] = v.float(), 1.0
    return grid, mask


def ppo_rollout(cfg: PPOConfig, session: Session, actor, critic, ref_model, tokenizer, prompt_rows: list[dict],
                rewards, kl_ctl: KLController, *, round_index: int) -> PPORound:
    """Sample, score and prepare one round: this rank's share of the round's prompts, one completion of each, the
    scores, the reference's log-probs and the critic's values, the KL-penalized per-token rewards, GAE, and the
    round's metrics (over every rank)."""
    started = time.perf_counter()
    dist, pad_id = session.dist, tokenizer.pad_token_id
    indices = step_indices(len(prompt_rows), cfg.train.batch_size, round_index, cfg.train.seed)
    rows = [prompt_rows[index] for index in indices[dist.rank::dist.world]]
    sampled = cfg.sampling.sample(HFEngine(actor, tokenizer), [row["prompt"] for row in rows], n=1,
                                  seed=rollout_seed(cfg.train.seed, round_index, dist.rank))
    scores, per_fn = rewards.score([row["prompt"] for row in rows], sampled.texts, [row.get("answer") for row in rows],
                                   [row.get("task") for row in rows])
    examples = [Example(prompt + completion, len(prompt))
                for prompt, completion in zip(sampled.prompt_ids, sampled.completion_ids)]
    old_logprobs, mask = _padded(sampled.logprobs)
    kl = torch.zeros_like(old_logprobs)
    if ref_model is not None:
        with base_reference(actor) if ref_model is actor else nullcontext():
            ref_logprobs = completion_logprobs(session, ref_model, examples, pad_id, cfg.sampling.temperature)
        kl = kl_k1(old_logprobs, _padded(ref_logprobs)[0]) * mask
    critic.eval()
    with torch.no_grad():
        values = per_completion_token(session, examples, pad_id, lambda batch: critic_values(critic, session, batch))
    critic.train()
    values_grid = _padded(values)[0]
    token_rewards = kl_penalized_rewards(torch.tensor(scores), kl, mask, kl_ctl.value)
    advantages, returns = gae(token_rewards, values_grid, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, dist.all_reduce_sums)
    lengths = [len(v) for v in sampled.logprobs]
    kl_sum = kl.sum(dim=1)
    sums = dist.all_reduce_sums({
        "n": float(len(scores)), "scores": float(sum(scores)), "kl": float(kl_sum.sum()),
        "entropy": float(-(old_logprobs * mask).sum()), "length": float(sum(lengths)),
        "finished": float(sum(sampled.finished)), "scores_sq": float(sum(s * s for s in scores)),
        **{f"rewards/{name}/mean": float(sum(values)) for name, values in per_fn.items()}})
    n = max(sums.pop("n"), 1.0)
    mean_score, mean_kl = sums["scores"] / n, sums["kl"] / n
    seconds = time.perf_counter() - started
    metrics = {
        "objective/scores": mean_score, "objective/kl": mean_kl, "objective/entropy": sums["entropy"] / n,
        "objective/non_score_reward": -kl_ctl.value * mean_kl,
        "objective/rlhf_reward": mean_score - kl_ctl.value * mean_kl,
        "objective/kl_coef": kl_ctl.value, "reward": mean_score,
        "reward_std": math.sqrt(max(sums["scores_sq"] / n - mean_score ** 2, 0.0)),
        **{key: sums[key] / n for key in sums if key.startswith("rewards/")},
        "completions/mean_length": sums["length"] / n, "completions/clipped_ratio": 1.0 - sums["finished"] / n,
        "rollout_s": seconds, "round": round_index + 1}
    return PPORound(index=round_index, rows=rows, completions=sampled.texts, scores=scores, examples=examples,
                    old_logprobs=sampled.logprobs, values=values,
                    advantages=[advantages[i, :length] for i, length in enumerate(lengths)],
                    returns=[returns[i, :length] for i, length in enumerate(lengths)], metrics=metrics, seconds=seconds)


def ppo_step(cfg: PPOConfig, session: Session, actor, critic, rollout: PPORound, minibatch: list[int], pad_id: int,
             ) -> tuple[StepResult, float, dict]:
    """One optimizer step of the actor (clipped surrogate, a token mean over every rank's minibatch) and one of the
    critic (clipped value loss) on the round's samples `minibatch` (this rank's). Returns the actor's result (its
    sums hold the critic's too), the trained-token count over all ranks, and the critic's step numbers."""
    dist = session.dist
    examples = [rollout.examples[sample] for sample in minibatch]
    pick = lambda values: [values[sample] for sample in minibatch]  # noqa: E731
    old_logprobs, old_values = pick(rollout.old_logprobs), pick(rollout.values)
    advantages, returns = pick(rollout.advantages), pick(rollout.returns)
    batches = session.micro_batches(examples, pad_id)
    tokens = dist.all_reduce_sum(float(sum(len(values) for values in old_logprobs)))
    normalizer = max(tokens, 1.0)
    cliprange = cfg.cliprange if cfg.cliprange is not None else math.inf

    def actor_loss(index, micro_batch):
        logprobs, entropy = session.forward(actor, micro_batch, cfg.sampling.temperature)
        if micro_batch.num_tokens == 0 or not minibatch:  # an empty micro-batch only keeps the ranks in step
            return (logprobs * 0).sum(), {}
        mask = micro_batch.loss_mask
        old = completion_values(micro_batch, examples, old_logprobs)
        loss, metrics = clipped_policy_loss(logprobs, old, completion_values(micro_batch, examples, advantages), mask,
                                            normalizer, cliprange, cliprange)
        with torch.no_grad():
            metrics = {"policy/clipfrac": metrics["clip_ratio/low"] + metrics["clip_ratio/high"],
                       "policy/approxkl": (0.5 * (logprobs - old) ** 2 * mask).sum(),
                       "policy/entropy": (entropy * mask).sum(), "loss/policy": loss.detach()}
        return loss, metrics

    def value_loss(index, micro_batch):
        vpred = critic_values(critic, session, micro_batch)
        if micro_batch.num_tokens == 0 or not minibatch:
            return (vpred * 0).sum(), {}
        loss, metrics = clipped_value_loss(vpred, completion_values(micro_batch, examples, old_values),
                                           completion_values(micro_batch, examples, returns), micro_batch.loss_mask,
                                           normalizer, cliprange_value=cfg.cliprange_value)
        loss = cfg.vf_coef * loss
        metrics["loss/value"] = loss.detach()
        return loss, metrics

    result = session.optimize(batches, actor_loss)
    value_result = session.optimize(batches, value_loss, engine="critic")
    # loss/* are already means over the step: record divides every sum by the token count, so scale them back up
    for key, value_sums in (("loss/policy", result.sums), ("loss/value", value_result.sums)):
        value_sums[key] = value_sums.get(key, 0.0) * normalizer
    result.sums.update(value_result.sums)
    extra = {"val/grad_norm": value_result.grad_norm, "val/lr": value_result.lr}
    return result, tokens, extra


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, PPOConfig, run, argv)


if __name__ == "__main__":
    main()
