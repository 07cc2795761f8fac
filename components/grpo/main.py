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

In code, the round is components/training/rl_loop.py's (rollout → score → advantages → minibatch updates →
sync → record → checkpoint); this stage gives it `GRPO`: the estimator named by `advantage`, its group
statistics (`round_stats`) and its optimizer step (`grpo_step`).

Outputs in `output_dir`: model/ (Hugging Face, safetensors), metrics.jsonl (one line per optimizer step; TRL's
names where components/trl_names.py lists them), samples.jsonl (a few scored completions per round), summary.json,
checkpoints/.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.evaluation.during_training import attach as attach_eval
from components.grpo.config import GRPOConfig
from components.prompts import prompts_and_rewards
from components.training.batching import completion_values
from components.training.config import KL_IN_REWARD
from components.training.engines import gap_metrics
from components.training.loop import Session, StepResult
from components.training.lora import load_policy, save_policy
from components.training.objectives import aggregation_weights, grpo_loss
from components.training.rl import reference_model
from components.training.rl_loop import RLStage, Round, correction_weights, train
from components.training.rollout_worker import build_engine

log = logging.getLogger("components.grpo")


def _stats(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


def round_stats(ranks: list[dict], rank: int, group_size: int) -> tuple[torch.Tensor, dict]:
    """The reward std of each of this rank's groups and the metrics of the whole round, from every rank's samples.

    ranks: each rank's {"total": rewards, "per_fn": {name: rewards}, "lengths", "finished"}, in rank order, each
    a run of whole groups: the logged rewards see every rank's samples, as they would in one process.
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
    return group_std[start // group_size:(start + count) // group_size], metrics


class GRPO(RLStage):
    """GRPO in the RL loop: a group of completions per prompt, a critic-free estimator (grpo, rloo, reinforce_pp),
    and the clipped objective with an optional k3 KL term."""

    def __init__(self, cfg: GRPOConfig, model, ref_model, tokenizer):
        super().__init__(cfg, model, ref_model, tokenizer)
        self.estimator, self.group_size, self.passes = cfg.advantage, cfg.num_generations, cfg.num_iterations
        self.prompts_per_round, self.steps_per_round = cfg.prompts_per_round, cfg.steps_per_round
        self.recompute_old = cfg.tis_cap is not None  # π_old from the trainer; the rollout's only weigh tokens

    @property
    def kl_coef(self) -> float:
        return self.cfg.beta if KL_IN_REWARD[self.cfg.advantage] else 0.0  # else β is the loss's k3 term

    def estimator_options(self) -> dict:
        return {"scale": self.cfg.scale_rewards}

    def round_stats(self, session: Session, rnd: Round, ranks: list[dict]) -> tuple[dict, list[int]]:
        cfg, dist = self.cfg, session.dist
        group_std, metrics = round_stats(ranks, dist.rank, self.group_size)
        kept = [sample for sample in range(len(rnd.examples))
                if not (cfg.filter_zero_std and float(group_std[sample // self.group_size]) == 0.0)]
        if rnd.ref_logprobs is not None and cfg.loss_beta == 0:  # the KL is in the reward: report it per round
            sums = dist.all_reduce_sums({"kl": float(rnd.kl.sum()), "tokens": float(rnd.mask.sum())})
            metrics["kl"] = sums["kl"] / max(sums["tokens"], 1.0)
        return metrics, kept

    def sample_fields(self, rnd: Round, sample: int) -> dict:
        advantages = rnd.advantages[sample]
        return {"reward": rnd.scores[sample], "advantage": float(advantages[0]) if len(advantages) else 0.0}

    def step(self, session: Session, rnd: Round, minibatch: list[int], position: int) -> tuple[StepResult, float, dict]:
        # the round's first step sees the policy that sampled: the trainer's log-probs vs the rollout's
        result, trained_tokens = grpo_step(self.cfg, session, self.model, rnd, minibatch,
                                           self.tokenizer.pad_token_id,
                                           measure=position == 0 and not self.recompute_old)
        rnd.metrics.update(result.extra)  # the round's gap, on each of its steps
        return result, trained_tokens, {}


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
    stage = GRPO(cfg, model, reference_model(cfg, model, session.device, cfg.beta), tokenizer)
    dist = session.dist
    # one engine per rank, colocated with its trainer (vllm: vLLM's external launcher over the ranks), or with
    # rollout_worker one vLLM engine in a process of its own sampling ahead (max_staleness)
    engine = build_engine(cfg, model, tokenizer, dist.world)
    try:
        history = train(stage, session, engine, prompt_rows, rewards, out)
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


def grpo_step(cfg: GRPOConfig, session: Session, model, rollout: Round, minibatch: list[int], pad_id: int,
              measure: bool = False) -> tuple[StepResult, float]:
    """One optimizer step of the clipped objective on the round's samples `minibatch` (this rank's); returns
    its result (`extra`: sampling/sampling_logp_difference/* when `measure`, the policy being the one that
    sampled) and its trained-token count over all ranks."""
    dist = session.dist
    examples = [rollout.examples[sample] for sample in minibatch]
    batches = session.micro_batches(examples, pad_id)
    lengths = torch.tensor(rollout.lengths, dtype=torch.float32)[minibatch]
    # weights of one mean over every rank's sequences (the engine averages the ranks' gradients, and
    # Session.optimize scales each rank's loss by the world size to undo that); every rank reduces
    total_tokens = dist.all_reduce_sum(float(lengths.clamp(min=1).sum()) if minibatch else 0.0)
    total_sequences = dist.all_reduce_sum(float(len(minibatch)))
    weights = aggregation_weights(lengths, cfg.loss_aggregation, cfg.sampling.max_new_tokens,
                                  total_tokens=total_tokens, total_sequences=total_sequences) if minibatch \
        else torch.zeros(0)
    pick = lambda values: [values[sample] for sample in minibatch]  # noqa: E731
    advantages, old_logprobs = pick(rollout.advantages), pick(rollout.old_logprobs)
    ref_logprobs = pick(rollout.ref_logprobs) if cfg.loss_beta > 0 else None
    is_weights, is_sums = correction_weights(cfg, rollout, minibatch)  # tis_cap: π_old / π_rollout, bounded
    trained_tokens = dist.all_reduce_sum(float(sum(lengths)) if minibatch else 0.0)
    diff = {"total": 0.0, "count": 0.0, "max": 0.0}

    def loss_fn(index, micro_batch):
        logprobs, entropy = session.forward(model, micro_batch, cfg.sampling.temperature)
        if micro_batch.num_tokens == 0 or not minibatch:  # an empty micro-batch only keeps the ranks in step
            return (logprobs * 0).sum(), {}
        sequence = micro_batch.seq_index.clamp(min=0)
        mask = micro_batch.loss_mask
        old = completion_values(micro_batch, examples, old_logprobs)
        token_weights = weights.to(logprobs.device)[sequence]
        if measure:
            gap = (logprobs.detach().float() - old).abs() * mask
            diff["total"] += float(gap.sum())
            diff["count"] += float(mask.sum())
            diff["max"] = max(diff["max"], float(gap.max()))
        loss, metrics = grpo_loss(
            logprobs, old, completion_values(micro_batch, examples, advantages), mask, token_weights,
            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.loss_beta,
            is_weights=completion_values(micro_batch, examples, is_weights) if is_weights is not None else None,
            ref_logp=completion_values(micro_batch, examples, ref_logprobs) if ref_logprobs is not None else None)
        metrics["entropy"] = (entropy * mask).sum()
        return loss, metrics

    result = session.optimize(batches, loss_fn)
    result.sums.update(is_sums)
    if measure:
        result.extra = gap_metrics(session.dist, diff["total"], diff["count"], diff["max"])
    return result, trained_tokens


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, GRPOConfig, run, argv)


if __name__ == "__main__":
    main()
