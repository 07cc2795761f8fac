"""PPO stage: an actor and a critic, a per-token KL penalty in the reward, GAE, clipped surrogate and value losses.

Single device:   python -m components.ppo --config ppo.yaml      (or: posttrain stage ppo --config ppo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.ppo --config ppo.yaml   (DeepSpeed ZeRO)

One round (a rollout): take `train.batch_size` prompts, sample one completion of each from the actor (π_old; its
per-token log-probs come from the rollout, or are recomputed by the actor when an engine samples; with
`rollout_worker` the round comes from a vLLM engine in a process of its own, up to `max_staleness` versions behind,
and `tis_cap` weighs the actor's loss by π_old / π_rollout: docs/rl.md), score each with the reward functions (a
trained reward model, a verifier, or both: components/rewards), compute the reference's log-probs and the critic's
values of every completion token, then per token

    r_t = −β·(log π_old − log π_ref)_t   (+ the score on the last token)         InstructGPT's k1 penalty
    δ_t = r_t + γ·V_{t+1} − V_t,   Â_t = δ_t + γλ·Â_{t+1},   G_t = Â_t + V_t        GAE(γ, λ)

with Â whitened over the round's tokens. Then `ppo_epochs` passes over the round, each in an order of its own
(drawn from the seed, the round and the pass) and cut into `num_minibatches` minibatches; each minibatch is one
optimizer step of the actor (the clipped surrogate, ε = cliprange) and one of the critic, with its own optimizer
(½·max((V − G)², (clip(V, V_old ± cliprange_value) − G)²)). β is fixed or adaptive (Ziegler et al.: after each
round β ← β·(1 + clip(KL/target − 1, ±0.2)·n / horizon)). `preset: a2c` is one pass, one minibatch, no clipping
(advantage actor-critic).

The critic is the causal LM's backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1),
initialized from the reward model (`critic_init: reward_model`, its head too; a reward model with head logprob has
none, so a new head at zero) or from the policy (a new head at zero). Its value at the position that predicts
completion token t is V(s_t).

In code, the round is components/training/rl_loop.py's (rollout → score → advantages → minibatch updates →
sync → record → checkpoint); this stage gives it `PPO`: the critic (what the gae estimator needs), the KL
controller, the round's metrics and its optimizer step (`ppo_step`: the actor's, then the critic's).

Outputs in `output_dir`: model/ (the actor, Hugging Face, safetensors), critic/ (the value model), metrics.jsonl
(one line per optimizer step; TRL's names where components/trl_names.py lists them), samples.jsonl, summary.json,
checkpoints/ (actor and critic, both optimizers, the KL coefficient, the RNG).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.evaluation.during_training import attach as attach_eval
from components.ppo.config import PPOConfig
from components.prompts import prompts_and_rewards
from components.training.advantages import padded
from components.training.batching import Example, PackedBatch, completion_values
from components.training.distributed import save_model
from components.training.loop import Session, StepResult
from components.training.lora import load_policy, save_policy
from components.training.objectives import KLController, clipped_policy_loss, clipped_value_loss
from components.training.rl import per_completion_token, reference_model
from components.training.rl_loop import RLStage, Round, correction_weights, train
from components.training.rollout_worker import build_engine

log = logging.getLogger("components.ppo")


def load_critic(cfg: PPOConfig, pad_token_id: int):
    """The value model: the reward model (critic_init reward_model) or the policy's weights with a value head at
    zero (critic_init policy), as a sequence-classification model with one output."""
    if cfg.critic_init == "reward_model":
        from components.rewards.reward_model import check_weights, local_dir, reward_head

        path = check_weights(local_dir(cfg.reward_model_path()))
        critic = cfg.loading.load_scalar_model(path, pad_token_id)
        if reward_head(path) == "logprob":  # a log-prob reward model has no scalar head: its weights, a head at zero
            torch.nn.init.zeros_(critic.score.weight)
            critic.config.reward_head = "scalar"  # what the saved critic is
        return critic
    critic = cfg.loading.load_scalar_model(cfg.model, pad_token_id)
    torch.nn.init.zeros_(critic.score.weight)
    return critic


def critic_values(critic, session: Session, micro_batch: PackedBatch) -> torch.Tensor:
    """V at every position of a packed micro-batch (shaped like its targets): the value head on the backbone."""
    with torch.autocast(micro_batch.input_ids.device.type, dtype=torch.bfloat16, enabled=session.autocast):
        hidden = critic.base_model(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids,
                                   use_cache=False).last_hidden_state
        return critic.score(hidden).float().squeeze(-1)


class PPO(RLStage):
    """PPO in the RL loop: one completion per prompt, a critic whose values GAE reads, a KL penalty in the reward
    (β fixed or adaptive), and per minibatch a step of the actor and one of the critic."""

    estimator = "gae"
    group_size = 1
    shuffle = True  # each epoch in an order of its own, as TRL's PPOTrainer

    def __init__(self, cfg: PPOConfig, actor, ref_model, tokenizer, critic, kl_ctl: KLController):
        super().__init__(cfg, actor, ref_model, tokenizer)
        self.critic, self.kl_ctl = critic, kl_ctl
        self.prompts_per_round, self.passes, self.steps_per_round = cfg.train.batch_size, cfg.ppo_epochs, \
            cfg.steps_per_round
        # π_old and the KL are the actor's own log-probs: an engine's differ (its kernels, bf16, top-p
        # renormalisation; a rollout worker's are up to max_staleness versions old), so with one they are computed
        # again, as verl does, and the gap is reported; tis_cap weighs the tokens by the two's ratio
        self.recompute_old = cfg.rollout.engine != "hf" or cfg.tis_cap is not None

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value

    def estimator_options(self) -> dict:
        return {"gamma": self.cfg.gamma, "lam": self.cfg.lam, "whiten": self.cfg.whiten_advantages}

    def critic_values(self, session: Session, examples: list[Example]) -> list[torch.Tensor]:
        self.critic.eval()
        with torch.no_grad():
            values = per_completion_token(session, examples, self.tokenizer.pad_token_id,
                                          lambda batch: critic_values(self.critic, session, batch))
        self.critic.train()
        return values

    def round_stats(self, session: Session, rnd: Round, ranks: list[dict]) -> tuple[dict, list[int]]:
        """TRL's objective/* metrics over every rank's samples; every sample is trained on."""
        scores, beta = rnd.scores, self.kl_ctl.value
        per_fn = ranks[session.dist.rank]["per_fn"]
        finished = ranks[session.dist.rank]["finished"]
        sums = session.dist.all_reduce_sums({
            "n": float(len(scores)), "scores": float(sum(scores)), "kl": float(rnd.kl.sum(dim=1).sum()),
            "entropy": float(-(padded(rnd.old_logprobs)[0] * rnd.mask).sum()), "length": float(sum(rnd.lengths)),
            "finished": float(sum(finished)), "scores_sq": float(sum(s * s for s in scores)),
            **{f"rewards/{name}/mean": float(sum(values)) for name, values in per_fn.items()}})
        n = max(sums.pop("n"), 1.0)
        mean_score, mean_kl = sums["scores"] / n, sums["kl"] / n
        metrics = {
            "objective/scores": mean_score, "objective/kl": mean_kl, "objective/entropy": sums["entropy"] / n,
            "objective/non_score_reward": -beta * mean_kl, "objective/rlhf_reward": mean_score - beta * mean_kl,
            "objective/kl_coef": beta, "reward": mean_score,
            "reward_std": math.sqrt(max(sums["scores_sq"] / n - mean_score ** 2, 0.0)),
            **{key: sums[key] / n for key in sums if key.startswith("rewards/")},
            "completions/mean_length": sums["length"] / n, "completions/clipped_ratio": 1.0 - sums["finished"] / n}
        return metrics, list(range(len(rnd.examples)))

    def after_rollout(self, session: Session, rnd: Round) -> None:
        # β for the next round, from this one's KL (this round's rewards already hold the β they were made with)
        self.kl_ctl.update(rnd.metrics["objective/kl"], int(session.dist.all_reduce_sum(float(len(rnd.examples)))))

    def sample_fields(self, rnd: Round, sample: int) -> dict:
        values = rnd.values[sample]
        return {"score": rnd.scores[sample], "value": float(values[0]) if len(values) else None}

    def step(self, session: Session, rnd: Round, minibatch: list[int], position: int) -> tuple[StepResult, float, dict]:
        return ppo_step(self.cfg, session, self.model, self.critic, rnd, minibatch, self.tokenizer.pad_token_id)

    def checkpoint_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value}


def run(cfg: PPOConfig) -> dict:
    with tracking.stage_run("ppo", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def _run(cfg: PPOConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    prompt_rows, rewards = prompts_and_rewards(cfg)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    actor = load_policy(cfg.model, cfg.loading, cfg.lora, cfg.train.seed, cfg.train)
    critic = load_critic(cfg, tokenizer.pad_token_id)
    session = Session(cfg.train, actor, out, on_metrics=tracked.log_metrics, run_config=asdict(cfg),
                      companions={"critic": (critic, cfg.critic_train)})
    attach_eval(session, cfg.eval, actor, tokenizer, tracked=tracked, watch=True)  # eval.every: eval/<suite>/...
    ref_model = reference_model(cfg, actor, session.device, cfg.kl_coef)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_controller, cfg.kl_target, cfg.kl_horizon)
    if "kl_coef" in session.resumed:
        kl_ctl.value = float(session.resumed["kl_coef"])
    dist = session.dist
    # one engine per rank, colocated with its actor (vllm: vLLM's external launcher over the ranks), or with
    # rollout_worker one vLLM engine in a process of its own sampling ahead (max_staleness)
    engine = build_engine(cfg, actor, tokenizer, dist.world)
    stage = PPO(cfg, actor, ref_model, tokenizer, critic, kl_ctl)
    try:
        history = train(stage, session, engine, prompt_rows, rewards, out)
        summary = {"rounds": -(-len(history) // cfg.steps_per_round) if history else 0, "steps": len(history),
                   "prompts": len(prompt_rows), "rewards": rewards.names, "final": history[-1] if history else None,
                   "kl_coef": kl_ctl.value,
                   "score_curve": [record["objective/scores"] for record in history[::cfg.steps_per_round]],
                   **session.exported}
        summary.update(save_policy(actor, tokenizer, out / "model", dist, cfg.lora, cfg.model, cfg.loading))
        save_model(critic, tokenizer, out / "critic", dist)
    finally:
        engine.close()  # after the saves' collectives: vLLM's shutdown ends the process group under torchrun
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s and %s", out / "model", out / "critic")
    return summary


def ppo_step(cfg: PPOConfig, session: Session, actor, critic, rollout: Round, minibatch: list[int], pad_id: int,
             ) -> tuple[StepResult, float, dict]:
    """One optimizer step of the actor (clipped surrogate, a token mean over every rank's minibatch) and one of the
    critic (clipped value loss) on the round's samples `minibatch` (this rank's). Returns the actor's result (its
    sums hold the critic's too), the trained-token count over all ranks, and the critic's step numbers.

    With tis_cap the surrogate's tokens are weighted by the off-policy correction (rl_loop.correction_weights) and
    the critic's loss is not, as in verl (verl/trainer/ppo/core_algos.py: the policy losses multiply pg_losses by
    rollout_is_weights, compute_value_loss takes none). The weight corrects the policy gradient, an expectation over
    π_old's actions, for the tokens having been drawn by the engine's policy (a worker's: up to max_staleness
    versions old); the critic regresses V(s_t) on the returns observed along those samples, and a per-token weight
    on its squared error would only re-weight states, not turn them into π_old's returns (that takes off-policy
    returns, e.g. V-trace). So a masked token (tis_mode mask) still trains the critic; verl's rejection mask also
    drops it from GAE and the critic's loss."""
    dist = session.dist
    examples = [rollout.examples[sample] for sample in minibatch]
    pick = lambda values: [values[sample] for sample in minibatch]  # noqa: E731
    old_logprobs, old_values = pick(rollout.old_logprobs), pick(rollout.values)
    advantages, returns = pick(rollout.advantages), pick(rollout.returns)
    batches = session.micro_batches(examples, pad_id)
    tokens = dist.all_reduce_sum(float(sum(len(values) for values in old_logprobs)))
    normalizer = max(tokens, 1.0)
    cliprange = cfg.cliprange if cfg.cliprange is not None else math.inf
    is_weights, is_sums = correction_weights(cfg, rollout, minibatch)  # tis_cap: π_old / π_rollout, bounded

    def actor_loss(index, micro_batch):
        logprobs, entropy = session.forward(actor, micro_batch, cfg.sampling.temperature)
        if micro_batch.num_tokens == 0 or not minibatch:  # an empty micro-batch only keeps the ranks in step
            return (logprobs * 0).sum(), {}
        mask = micro_batch.loss_mask
        old = completion_values(micro_batch, examples, old_logprobs)
        # the correction weighs the surrogate's tokens (their counts stay the mask's); the critic's loss it does not
        weighted = mask if is_weights is None else mask * completion_values(micro_batch, examples, is_weights)
        loss, metrics = clipped_policy_loss(logprobs, old, completion_values(micro_batch, examples, advantages),
                                            weighted, normalizer, cliprange, cliprange, count_mask=mask)
        with torch.no_grad():
            metrics = {"policy/clipfrac_avg": metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"],
                       "policy/approxkl_avg": (0.5 * (logprobs - old) ** 2 * mask).sum(),
                       "policy/entropy_avg": (entropy * mask).sum(), "loss/policy_avg": loss.detach()}
        return loss, metrics

    def value_loss(index, micro_batch):
        vpred = critic_values(critic, session, micro_batch)
        if micro_batch.num_tokens == 0 or not minibatch:
            return (vpred * 0).sum(), {}
        loss, metrics = clipped_value_loss(vpred, completion_values(micro_batch, examples, old_values),
                                           completion_values(micro_batch, examples, returns), micro_batch.loss_mask,
                                           normalizer, cliprange_value=cfg.cliprange_value)
        metrics["loss/value_avg"] = loss.detach()
        return loss, metrics

    result = session.optimize(batches, actor_loss)
    result.sums.update(is_sums)
    value_result = session.optimize(batches, value_loss, engine="critic")
    # loss/* are already means over the step: record divides every sum by the token count, so scale them back up
    for key, value_sums in (("loss/policy_avg", result.sums), ("loss/value_avg", value_result.sums)):
        value_sums[key] = value_sums.get(key, 0.0) * normalizer
    result.sums.update(value_result.sums)
    extra = {"val/grad_norm": value_result.grad_norm, "val/lr": value_result.lr}
    return result, tokens, extra


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, PPOConfig, run, argv)


if __name__ == "__main__":
    main()
