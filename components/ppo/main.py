"""PPO stage: an actor and a critic, a per-token KL penalty in the reward, GAE, clipped surrogate and value losses.

Single device:   python -m components.ppo --config ppo.yaml      (or: posttrain stage ppo --config ppo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.ppo --config ppo.yaml   (DeepSpeed ZeRO)

One round (a rollout): take `train.batch_size` prompts, sample one completion of each from the actor (π_old; its
per-token log-probs come from the rollout), score each with the reward functions (a trained reward model, a
verifier, or both: components/rewards), compute the reference's log-probs and the critic's values of every
completion token, then per token

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

Outputs in `output_dir`: model/ (the actor, Hugging Face, safetensors), critic/ (the value model), metrics.jsonl
(one line per optimizer step; TRL's names where components/trl_names.py lists them), samples.jsonl, summary.json,
checkpoints/ (actor and critic, both optimizers, the KL coefficient, the RNG).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.evaluation.during_training import attach as attach_eval
from components.ppo.config import PPOConfig
from components.prompts import prompts_and_rewards
from components.training.batching import Example, PackedBatch, completion_values
from components.training.distributed import save_model
from components.training.engines import logprob_gap
from components.training.loop import Session, StepResult, step_indices
from components.training.lora import base_reference, load_policy, save_policy
from components.training.objectives import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_k1,
    kl_penalized_rewards,
    whiten,
)
from components.training.rl import (
    completion_logprobs,
    minibatches,
    per_completion_token,
    reference_model,
    rollout_seed,
    write_samples,
)

log = logging.getLogger("components.ppo")


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
        critic = cfg.loading.load_scalar_model(path, pad_token_id)
        if reward_head(path) == "logprob":  # a log-prob reward model has no scalar head: its weights, a head at zero
            torch.nn.init.zeros_(critic.score.weight)
            critic.config.reward_head = "scalar"  # what the saved critic is
        return critic
    critic = cfg.loading.load_scalar_model(cfg.model, pad_token_id)
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
    attach_eval(session, cfg.eval, actor, tokenizer, tracked=tracked, watch=True)  # eval.every: eval/<suite>/...
    ref_model = reference_model(cfg, actor, session.device, cfg.kl_coef)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_controller, cfg.kl_target, cfg.kl_horizon)
    if "kl_coef" in session.resumed:
        kl_ctl.value = float(session.resumed["kl_coef"])
    dist, pad_id = session.dist, tokenizer.pad_token_id
    # one engine per rank, colocated with its actor (vllm: vLLM's external launcher over the ranks)
    engine = cfg.rollout.build(actor, tokenizer, seed=cfg.train.seed,
                               max_num_seqs=cfg.sampling.generation_batch_size, world_size=dist.world)

    try:
        step = session.start_step
        while step < cfg.train.max_steps:
            rollout = ppo_rollout(cfg, session, actor, critic, ref_model, tokenizer, prompt_rows, rewards, kl_ctl,
                                  engine, round_index=step // cfg.steps_per_round)
            engine.rest()  # the round is sampled: the engine's memory goes to the trainer until the sync
            # β for the next round, from this one's KL (this round's rewards already hold the β they were made with)
            kl_ctl.update(rollout.metrics["objective/kl"], int(dist.all_reduce_sum(float(len(rollout.examples)))))
            if dist.rank == 0:
                write_samples(out / "samples.jsonl", rollout, cfg.samples_logged, lambda sample: {
                    "score": rollout.scores[sample],
                    "value": float(rollout.values[sample][0]) if len(rollout.values[sample]) else None})
            samples = list(range(len(rollout.examples)))
            steps = minibatches(samples, cfg.ppo_epochs, cfg.steps_per_round,
                                shuffle=(cfg.train.seed, rollout.index))[:cfg.train.max_steps - step]
            for position, minibatch in enumerate(steps):
                started = time.perf_counter()
                result, trained_tokens, extra = ppo_step(cfg, session, actor, critic, rollout, minibatch, pad_id)
                extra["rollout/sync_s"] = 0.0
                if position == len(steps) - 1 and step + 1 < cfg.train.max_steps:
                    synced = time.perf_counter()  # the next round samples from the updated actor
                    engine.sync(actor)
                    extra["rollout/sync_s"] = time.perf_counter() - synced
                seconds = time.perf_counter() - started + (rollout.seconds if position == 0 else 0.0)
                lengths = [len(rollout.examples[sample]) for sample in minibatch]
                session.record(step, result, trained_tokens, lengths, seconds, extra={**rollout.metrics, **extra})
                session.maybe_checkpoint(step, {"kl_coef": kl_ctl.value})
                step += 1

        history = session.finish()
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
                rewards, kl_ctl: KLController, engine, *, round_index: int) -> PPORound:
    """Sample, score and prepare one round: this rank's share of the round's prompts, one completion of each, the
    scores, the reference's log-probs and the critic's values, the KL-penalized per-token rewards, GAE, and the
    round's metrics (over every rank)."""
    started = time.perf_counter()
    dist, pad_id = session.dist, tokenizer.pad_token_id
    indices = step_indices(len(prompt_rows), cfg.train.batch_size, round_index, cfg.train.seed)
    places = list(range(dist.rank, len(indices), dist.world))  # every rank samples its own share of the round
    rows = [prompt_rows[indices[place]] for place in places]
    # seeded from (the round's seed, the prompt's place in the round): the same samples on 1 or N ranks
    sampled = cfg.sampling.sample(engine, [row["prompt"] for row in rows], n=1,
                                  seed=rollout_seed(cfg.train.seed, round_index), indices=places)
    scores, per_fn = rewards.score([row["prompt"] for row in rows], sampled.texts, [row.get("answer") for row in rows],
                                   [row.get("task") for row in rows])
    examples = [Example(prompt + completion, len(prompt))
                for prompt, completion in zip(sampled.prompt_ids, sampled.completion_ids)]
    # π_old and the KL are the actor's own log-probs: an engine's differ (its kernels, bf16, top-p renormalisation),
    # so with one they are computed again here, as verl does, and the gap is reported
    trainer_logprobs = (sampled.logprobs if engine.name == "hf" else
                        completion_logprobs(session, actor, examples, pad_id, cfg.sampling.temperature))
    old_logprobs, mask = _padded(trainer_logprobs)
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
    gap = logprob_gap(dist, trainer_logprobs, sampled.logprobs) if engine.name != "hf" else {}
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
        "rollout_s": seconds, "round": round_index + 1, **gap}
    return PPORound(index=round_index, rows=rows, completions=sampled.texts, scores=scores, examples=examples,
                    old_logprobs=trainer_logprobs, values=values,
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
