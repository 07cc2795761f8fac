"""GRPO stage: sample a group of completions per prompt, reward them, and train on group-normalized advantages.

Single device:   python -m components.grpo --config grpo.yaml      (or: posttrain stage grpo --config grpo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.grpo --config grpo.yaml   (DeepSpeed ZeRO)

One round: take `prompts_per_round` prompts, sample `num_generations` completions for each from the current
policy (π_old; its per-token log-probs come from the rollout, computed once), score them with the reward
functions, compute Â_i = (R_i − mean_G R) / (std R + 1e-4) per group (`scale_rewards`; or another `advantage`
estimator: rloo, reinforce_pp), optionally drop groups
whose rewards are all equal, then run `num_iterations` passes of optimizer steps over minibatches of
`batch_size` sequences with the clipped objective (ε_low, ε_high), aggregated per token, per sequence or by a
constant (Dr. GRPO), plus β·KL_k3 to a reference model only when β > 0 (no reference is loaded otherwise; with
LoRA the reference is the base model with the adapter disabled).

In code, `_run` reads top to bottom: per round, `rollout_round` samples, scores and prepares the round (a
`RolloutRound`: examples, advantages, π_old and reference log-probs, lengths, metrics), then `minibatches`
cuts it into the round's optimizer steps and `grpo_step` takes each.

Outputs in `output_dir`: model/ (Hugging Face, safetensors), metrics.jsonl (one line per optimizer step; TRL's
names where components/trl_names.py lists them), samples.jsonl (a few scored completions per round), summary.json,
checkpoints/.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.evaluation.during_training import attach as attach_eval
from components.grpo.config import GRPOConfig
from components.prompts import prompts_and_rewards
from components.training.batching import Example, completion_values
from components.training.engines import gap_metrics, logprob_gap
from components.training.loop import Session, StepResult, step_indices
from components.training.lora import base_reference, load_policy, save_policy
from components.training.objectives import ADVANTAGE_ESTIMATORS, aggregation_weights, grpo_loss, kl_k1
from components.training.rl import completion_logprobs, minibatches, reference_model, rollout_seed, write_samples

log = logging.getLogger("components.grpo")


def _stats(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


def round_stats(ranks: list[dict], rank: int, group_size: int, scale: str, advantage: str = "grpo",
                ) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """A round's advantages and metrics from every rank's samples (advantages None for a per-token estimator:
    `token_advantages` computes those).

    ranks: each rank's {"total": rewards, "per_fn": {name: rewards}, "lengths", "finished"}, in rank order, each
    a run of whole groups. Returns this rank's advantages, the reward std of each of its groups, and the
    metrics of the whole round: "batch" scaling and the logged rewards see every rank's samples, as they
    would in one process.
    """
    def gathered(key: str) -> list:
        return [value for samples in ranks for value in samples[key]]

    start = sum(len(samples["total"]) for samples in ranks[:rank])
    count = len(ranks[rank]["total"])
    rewards = torch.tensor(gathered("total"), dtype=torch.float32)
    group_std = rewards.reshape(-1, group_size).std(dim=1)
    lengths = torch.tensor(gathered("lengths"), dtype=torch.float32)
    finished = gathered("finished")
    reward_mean, reward_std = _stats(rewards.tolist())
    per_fn = {name: _stats([value for samples in ranks for value in samples["per_fn"][name]])
              for name in ranks[rank]["per_fn"]}
    metrics = {
        "reward": reward_mean, "reward_std": reward_std,
        **{key: value for name, stats in per_fn.items()
           for key, value in zip((f"rewards/{name}/mean", f"rewards/{name}/std"), stats)},
        "frac_reward_zero_std": float((group_std == 0).float().mean()),
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": 1.0 - sum(finished) / len(finished),
    }
    estimator = ADVANTAGE_ESTIMATORS[advantage]
    advantages = None if estimator.per_token else estimator.fn(rewards, group_size, scale=scale)[start:start + count]
    return advantages, group_std[start // group_size:(start + count) // group_size], metrics


@dataclass
class RolloutRound:
    """One round's samples on this rank, scored, with everything the round's optimizer steps read."""

    index: int
    """The round, 0-based."""
    rows: list[dict]
    """The prompt row of each sample (num_generations samples in a row per prompt: a group)."""
    completions: list[str]
    """The text of each sample's completion."""
    rewards: list[float]
    """Each sample's total (weighted) reward."""
    examples: list[Example]
    """Prompt + completion tokens of each sample."""
    lengths: torch.Tensor
    """Each sample's completion length in tokens (float32)."""
    advantages: torch.Tensor
    """Each sample's advantage Â (a per-token estimator: that of its first completion token)."""
    kept: list[int]
    """The samples trained on: all of them, or with filter_zero_std those of groups whose rewards differ."""
    old_logprobs: list[torch.Tensor]
    """π_old's log-prob of each completion token (from the rollout)."""
    ref_logprobs: list[torch.Tensor] | None
    """The reference model's log-prob of each completion token; None with β = 0."""
    metrics: dict
    """The round's metrics (rewards, completions/*, rollout_s, round), reported with each of its steps."""
    seconds: float
    """Time of the rollout, scoring and reference pass (added to the round's first step)."""
    token_advantages: list[torch.Tensor] | None = None
    """A per-token estimator's advantage of each completion token (None for a per-sequence one)."""
    rollout_logprobs: list[torch.Tensor] | None = None
    """With tis_cap: the rollout engine's log-probs of each completion token (old_logprobs are then the
    trainer's)."""


def run(cfg: GRPOConfig) -> dict:
    with tracking.stage_run("grpo", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def _run(cfg: GRPOConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    prompt_rows, rewards = prompts_and_rewards(cfg)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    model = load_policy(cfg.model, cfg.loading, cfg.lora, cfg.train.seed, cfg.train)
    session = Session(cfg.train, model, out, on_metrics=tracked.log_metrics, run_config=asdict(cfg))
    attach_eval(session, cfg.eval, model, tokenizer, tracked=tracked, watch=True)  # eval.every: eval/<suite>/...
    ref_model = reference_model(cfg, model, session.device, cfg.beta)
    dist = session.dist
    # one engine per rank, colocated with its trainer (vllm: vLLM's external launcher over the ranks)
    engine = cfg.rollout.build(model, tokenizer, seed=cfg.train.seed,
                               max_num_seqs=cfg.sampling.generation_batch_size, world_size=dist.world)
    try:
        history = _train(cfg, session, model, ref_model, tokenizer, prompt_rows, rewards, engine, out)
        summary = {"rounds": -(-len(history) // cfg.steps_per_round) if history else 0, "steps": len(history),
                   "prompts": len(prompt_rows), "rewards": rewards.names, "final": history[-1] if history else None,
                   "reward_curve": [record["reward"] for record in history[::cfg.steps_per_round]],
                   **session.exported}
        summary.update(save_policy(model, tokenizer, out / "model", dist, cfg.lora, cfg.model, cfg.loading))
    finally:
        engine.close()  # after the save's collectives: vLLM's shutdown ends the process group under torchrun
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


def _train(cfg: GRPOConfig, session: Session, model, ref_model, tokenizer, prompt_rows, rewards, engine,
           out: Path) -> list[dict]:
    """The rounds: sample (the engine), then the round's optimizer steps, then give the engine the new weights."""
    dist, pad_id = session.dist, tokenizer.pad_token_id
    step = session.start_step
    while step < cfg.train.max_steps:
        rollout = rollout_round(cfg, session, model, ref_model, tokenizer, prompt_rows, rewards, engine,
                                round_index=step // cfg.steps_per_round)
        engine.rest()  # the round is sampled: the engine's memory goes to the trainer until the sync
        if dist.rank == 0:
            write_samples(out / "samples.jsonl", rollout, cfg.samples_logged,
                          lambda sample: {"reward": rollout.rewards[sample],
                                          "advantage": float(rollout.advantages[sample])})
        # μ passes of optimizer steps over minibatches of this round's (kept) samples
        steps = minibatches(rollout.kept, cfg.num_iterations, cfg.steps_per_round)[:cfg.train.max_steps - step]
        for position, minibatch in enumerate(steps):
            started = time.perf_counter()
            # the round's first step sees the policy that sampled: the trainer's log-probs vs the rollout's
            result, trained_tokens = grpo_step(cfg, session, model, rollout, minibatch, pad_id,
                                               measure=position == 0 and rollout.rollout_logprobs is None)
            sync_s = 0.0
            if position == len(steps) - 1 and step + 1 < cfg.train.max_steps:
                synced = time.perf_counter()  # the next round samples from the updated policy
                engine.sync(model)
                sync_s = time.perf_counter() - synced
            seconds = time.perf_counter() - started + (rollout.seconds if position == 0 else 0.0)
            lengths = [len(rollout.examples[sample]) for sample in minibatch]
            rollout.metrics.update(result.extra)
            session.record(step, result, trained_tokens, lengths, seconds,
                           extra={**rollout.metrics, "rollout/sync_s": sync_s})
            session.maybe_checkpoint(step)
            step += 1
    return session.finish()


def rollout_round(cfg: GRPOConfig, session: Session, model, ref_model, tokenizer, prompt_rows: list[dict], rewards,
                  engine, *, round_index: int) -> RolloutRound:
    """Sample, score and prepare one round: this rank's share of the round's prompts, num_generations
    completions of each from the current policy, their rewards, the advantages and metrics over every rank's
    samples (round_stats), and with a reference model its log-probs of every completion."""
    started = time.perf_counter()
    dist, group_size = session.dist, cfg.num_generations
    indices = step_indices(len(prompt_rows), cfg.prompts_per_round, round_index, cfg.train.seed)
    places = list(range(dist.rank, len(indices), dist.world))  # every rank samples its own share of the round
    round_rows = [prompt_rows[indices[place]] for place in places]
    # sample j of the prompt at place p of the round is seeded from (the round's seed, p, j): the round samples
    # the same completions whatever the number of ranks (and engines) it is split over
    sampled = cfg.sampling.sample(engine, [row["prompt"] for row in round_rows], n=group_size,
                                  seed=rollout_seed(cfg.train.seed, round_index), indices=places)
    rows = [round_rows[prompt] for prompt in sampled.prompt_index]
    total, per_fn = rewards.score([row["prompt"] for row in rows], sampled.texts, [row.get("answer") for row in rows],
                                  [row.get("task") for row in rows])
    ranks = dist.all_gather({"total": total, "per_fn": per_fn, "lengths": sampled.lengths,
                             "finished": sampled.finished})
    advantages, group_std, metrics = round_stats(ranks, dist.rank, group_size, cfg.scale_rewards, cfg.advantage)
    kept = [sample for sample in range(len(sampled))
            if not (cfg.filter_zero_std and float(group_std[sample // group_size]) == 0.0)]
    examples = [Example(prompt + completion, len(prompt))
                for prompt, completion in zip(sampled.prompt_ids, sampled.completion_ids)]
    ref_logprobs = None
    if ref_model is not None:
        with base_reference(model) if ref_model is model else nullcontext():
            ref_logprobs = completion_logprobs(session, ref_model, examples, tokenizer.pad_token_id,
                                                cfg.sampling.temperature)
    old_logprobs, rollout_logprobs = sampled.logprobs, None
    if cfg.tis_cap is not None:  # π_old from the trainer; the rollout's log-probs only weigh the tokens
        rollout_logprobs = sampled.logprobs
        old_logprobs = completion_logprobs(session, model, examples, tokenizer.pad_token_id, cfg.sampling.temperature)
        metrics.update(logprob_gap(session.dist, old_logprobs, rollout_logprobs))
    per_token = None
    if advantages is None:
        per_token, kl_metrics = token_advantages(cfg, session, total, sampled.logprobs, ref_logprobs)
        advantages = torch.tensor([float(values[0]) if len(values) else 0.0 for values in per_token])
        metrics.update(kl_metrics)
    seconds = time.perf_counter() - started
    metrics.update({"rollout_s": seconds, "round": round_index + 1})
    return RolloutRound(index=round_index, rows=rows, completions=sampled.texts, rewards=total, examples=examples,
                        lengths=torch.tensor(sampled.lengths, dtype=torch.float32), advantages=advantages,
                        kept=kept, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs,
                        ref_logprobs=ref_logprobs if cfg.loss_beta > 0 else None, metrics=metrics, seconds=seconds,
                        token_advantages=per_token)


def token_advantages(cfg: GRPOConfig, session: Session, rewards: list[float], old_logprobs: list[torch.Tensor],
                     ref_logprobs: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], dict]:
    """A per-token estimator's advantages of this rank's samples (normalized over every rank's tokens) and the
    round's mean k1 KL to the reference per token (`kl`; with β = 0 there is no reference and no KL)."""
    lengths = [len(values) for values in old_logprobs]
    width = max(lengths + [1])
    mask = torch.zeros(len(lengths), width)
    kl = torch.zeros(len(lengths), width)
    for sample, values in enumerate(old_logprobs):
        mask[sample, :len(values)] = 1.0
        if ref_logprobs is not None and len(values):
            kl[sample, :len(values)] = kl_k1(values.float(), ref_logprobs[sample].float())
    dist = session.dist
    advantages = ADVANTAGE_ESTIMATORS[cfg.advantage].fn(torch.tensor(rewards, dtype=torch.float32), kl, mask,
                                                        beta=cfg.beta, reduce=dist.all_reduce_sums)
    sums = dist.all_reduce_sums({"kl": float((kl * mask).sum()), "tokens": float(mask.sum())})
    metrics = {"kl": sums["kl"] / max(sums["tokens"], 1.0)} if ref_logprobs is not None else {}
    return [advantages[sample, :length] for sample, length in enumerate(lengths)], metrics


def grpo_step(cfg: GRPOConfig, session: Session, model, rollout: RolloutRound, minibatch: list[int], pad_id: int,
              measure: bool = False) -> tuple[StepResult, float]:
    """One optimizer step of the clipped objective on the round's samples `minibatch` (this rank's); returns
    its result (`extra`: sampling/sampling_logp_difference/* when `measure`, the policy being the one that
    sampled) and its trained-token count over all ranks."""
    dist = session.dist
    examples = [rollout.examples[sample] for sample in minibatch]
    batches = session.micro_batches(examples, pad_id)
    lengths = rollout.lengths[minibatch]
    # weights of one mean over every rank's sequences (the engine averages the ranks' gradients, and
    # Session.optimize scales each rank's loss by the world size to undo that); every rank reduces
    total_tokens = dist.all_reduce_sum(float(lengths.clamp(min=1).sum()) if minibatch else 0.0)
    total_sequences = dist.all_reduce_sum(float(len(minibatch)))
    weights = aggregation_weights(lengths, cfg.loss_aggregation, cfg.sampling.max_new_tokens,
                                  total_tokens=total_tokens, total_sequences=total_sequences) if minibatch \
        else torch.zeros(0)
    advantages = rollout.advantages[minibatch]
    token_advantages = ([rollout.token_advantages[sample] for sample in minibatch]
                        if rollout.token_advantages is not None else None)
    old_logprobs = [rollout.old_logprobs[sample] for sample in minibatch]
    ref_logprobs = ([rollout.ref_logprobs[sample] for sample in minibatch] if rollout.ref_logprobs is not None
                    else None)
    rollout_logprobs = ([rollout.rollout_logprobs[sample] for sample in minibatch]
                        if rollout.rollout_logprobs is not None else None)
    trained_tokens = dist.all_reduce_sum(float(sum(lengths)) if minibatch else 0.0)
    diff = {"total": 0.0, "count": 0.0, "max": 0.0}

    def loss_fn(index, micro_batch):
        logprobs, entropy = session.forward(model, micro_batch, cfg.sampling.temperature)
        if micro_batch.num_tokens == 0 or not minibatch:  # an empty micro-batch only keeps the ranks in step
            return (logprobs * 0).sum(), {}
        sequence = micro_batch.seq_index.clamp(min=0)
        mask = micro_batch.loss_mask
        token_adv = (completion_values(micro_batch, examples, token_advantages) if token_advantages is not None
                     else advantages.to(logprobs.device)[sequence])
        old = completion_values(micro_batch, examples, old_logprobs)
        token_weights = weights.to(logprobs.device)[sequence]
        is_weights = None
        if rollout_logprobs is not None:  # truncated importance sampling: min(π_old / π_rollout, C) per token
            behaviour = completion_values(micro_batch, examples, rollout_logprobs)
            is_weights = torch.exp(old - behaviour).clamp(max=cfg.tis_cap) * mask
        if measure:
            gap = (logprobs.detach().float() - old).abs() * mask
            diff["total"] += float(gap.sum())
            diff["count"] += float(mask.sum())
            diff["max"] = max(diff["max"], float(gap.max()))
        loss, metrics = grpo_loss(
            logprobs, old, token_adv, mask, token_weights,
            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.loss_beta, is_weights=is_weights,
            ref_logp=completion_values(micro_batch, examples, ref_logprobs) if ref_logprobs is not None else None)
        metrics["entropy"] = (entropy * mask).sum()
        return loss, metrics

    result = session.optimize(batches, loss_fn)
    if measure:
        result.extra = gap_metrics(session.dist, diff["total"], diff["count"], diff["max"])
    return result, trained_tokens


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, GRPOConfig, run, argv)


if __name__ == "__main__":
    main()
