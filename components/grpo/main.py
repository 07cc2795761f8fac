"""GRPO stage: sample a group of completions per prompt, reward them, and train on group-normalized advantages.

Single device:   python -m components.grpo --config grpo.yaml      (or: posttrain stage grpo --config grpo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.grpo --config grpo.yaml   (DeepSpeed ZeRO)

One round: take `prompts_per_round` prompts, sample `num_generations` completions for each from the current
policy (π_old; its per-token log-probs come from the rollout, computed once), score them with the reward
functions, compute Â_i = (R_i − mean_G R) / (std R + 1e-4) per group (`scale_rewards`), optionally drop groups
whose rewards are all equal, then run `num_iterations` passes of optimizer steps over minibatches of
`batch_size` sequences with the clipped objective (ε_low, ε_high), aggregated per token, per sequence or by a
constant (Dr. GRPO), plus β·KL_k3 to a reference model only when β > 0 (no reference is loaded otherwise).

Outputs in `output_dir`: model/ (Hugging Face, safetensors), metrics.jsonl (one line per optimizer step,
TRL's metric names), samples.jsonl (a few scored completions per round), summary.json, checkpoints/.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.models import ModelLoading
from components.prompts import PromptSource
from components.rewards import build_rewards
from components.sft.main import save_model
from components.training.batching import Example, completion_values
from components.training.loop import Session, TrainConfig, step_indices
from components.training.objectives import (LOSS_AGGREGATIONS, SCALE_REWARDS, aggregation_weights,
                                            group_advantages, grpo_loss)
from components.training.rollout import Sampling

log = logging.getLogger("components.grpo")


@dataclass(kw_only=True)
class GRPOConfig(TrainConfig, PromptSource, Sampling, ModelLoading):
    """A GRPO stage: the training settings, the prompts, the rewards and the sampling settings."""

    unused_fields = ("method", "updates_per_batch", "sft_warmup_steps")
    model: str
    """Policy to start from: a Hugging Face directory with safetensors weights."""
    output_dir: str
    """Where model/, metrics.jsonl, samples.jsonl, summary.json and checkpoints/ go."""
    rewards: list[dict] = field(default_factory=lambda: [{"name": "task"}])
    """Reward functions and weights, e.g. [{name: task}, {name: format, weight: 0.1}] (components/rewards)."""
    num_generations: int = 8
    """G: completions sampled per prompt (a group)."""
    prompts_per_round: int = 16
    """Prompts sampled per round; a round yields prompts_per_round × G sequences."""
    num_iterations: int = 1
    """μ: passes over a round's samples (μ > 1 makes the clip matter)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std of each group), batch (std of the round), none (Dr. GRPO)."""
    loss_aggregation: str = "token"
    """token (token-mean over a step, DAPO), sequence (mean per sequence, then over sequences: original
    GRPO) or constant (divide by sequences × max_new_tokens: Dr. GRPO)."""
    filter_zero_std: bool = False
    """Drop groups whose rewards are all equal (they carry no gradient) before training."""
    ref_model: str | None = None
    """β > 0: the reference model of the KL term (default: the starting policy)."""
    samples_logged: int = 4
    """Scored completions written to samples.jsonl per round."""
    beta: float = 0.0
    """Weight of the KL_k3 penalty to the reference model (0: no reference model is loaded)."""
    batch_size: int = 128
    """Sequences per optimizer step; prompts_per_round × num_generations must be a multiple of it."""

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        Sampling.__post_init__(self)
        ModelLoading.__post_init__(self)
        round_size = self.prompts_per_round * self.num_generations
        for name in ("num_generations", "prompts_per_round", "num_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: a positive integer")
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations} is invalid: ≥ 2 (advantages compare a group)")
        if round_size % self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} is invalid: it must divide prompts_per_round × "
                             f"num_generations = {round_size}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r} is invalid: one of {', '.join(SCALE_REWARDS)}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation={self.loss_aggregation!r} is invalid: one of "
                             f"{', '.join(LOSS_AGGREGATIONS)}")
        if self.ref_model is not None and self.beta == 0:
            raise ValueError(f"ref_model={self.ref_model!r} is invalid with beta 0: only the KL term (beta > 0) "
                             "reads it")
        if self.checkpoint_every % self.steps_per_round:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} is invalid: a multiple of the "
                             f"{self.steps_per_round} optimizer steps of a round (a checkpoint sits between rounds)")

    @property
    def steps_per_round(self) -> int:
        return self.num_iterations * self.prompts_per_round * self.num_generations // self.batch_size


def _stats(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def round_stats(ranks: list[dict], rank: int, group_size: int, scale: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A round's advantages and metrics from every rank's samples.

    ranks: each rank's {"total": rewards, "per_fn": {name: rewards}, "lengths", "finished"}, in rank order, each
    a run of whole groups. Returns this rank's advantages, the reward std of each of its groups, and the
    metrics of the whole round: "batch" scaling and the logged rewards see every rank's samples, as they
    would in one process.
    """
    start = sum(len(r["total"]) for r in ranks[:rank])
    n = len(ranks[rank]["total"])
    rewards = torch.tensor([x for r in ranks for x in r["total"]], dtype=torch.float32)
    group_std = rewards.reshape(-1, group_size).std(dim=1)
    lengths = torch.tensor([x for r in ranks for x in r["lengths"]], dtype=torch.float32)
    finished = [x for r in ranks for x in r["finished"]]
    reward_mean, reward_std = _stats(rewards.tolist())
    metrics = {
        "reward": reward_mean, "reward_std": reward_std,
        **{k: v for fn in ranks[rank]["per_fn"] for k, v in zip(
            (f"rewards/{fn}/mean", f"rewards/{fn}/std"), _stats([x for r in ranks for x in r["per_fn"][fn]]))},
        "frac_reward_zero_std": float((group_std == 0).float().mean()),
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": 1.0 - sum(finished) / len(finished),
    }
    adv = group_advantages(rewards, group_size, scale)[start:start + n]
    return adv, group_std[start // group_size:(start + n) // group_size], metrics


def run(cfg: GRPOConfig) -> dict:
    with tracking.stage_run("grpo", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def _run(cfg: GRPOConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    rewards = build_rewards(cfg.rewards, where="rewards")
    rows = cfg.load_prompts(cfg.seed)
    cfg.check_rows(rows, rewards)
    tokenizer = cfg.load_tokenizer(cfg.model)
    model = cfg.load_model(cfg.model)
    sess = Session(cfg.training(), model, out, on_metrics=tracked.log_metrics)
    ref_model = None
    if cfg.beta > 0:
        ref_model = cfg.load_model(cfg.ref_model or cfg.model).to(sess.device).eval().requires_grad_(False)
    dist, pad = sess.dist, tokenizer.pad_token_id
    G = cfg.num_generations
    samples_path = out / "samples.jsonl"

    step = sess.start_step
    while step < cfg.max_steps:
        rnd = step // cfg.steps_per_round
        t0 = time.perf_counter()
        # every rank samples its own share of the round's prompts
        idx = step_indices(len(rows), cfg.prompts_per_round, rnd, cfg.seed)[dist.rank::dist.world]
        batch_rows = [rows[i] for i in idx]
        ro = cfg.sample(model, tokenizer, [r["prompt"] for r in batch_rows], n=G,
                        seed=cfg.seed * 1_000_003 + rnd * 97 + dist.rank)
        srows = [batch_rows[i] for i in ro.prompt_index]
        total, per_fn = rewards.score([r["prompt"] for r in srows], ro.texts, [r.get("answer") for r in srows],
                                      [r.get("task") for r in srows])
        ranks = dist.all_gather({"total": total, "per_fn": per_fn, "lengths": ro.lengths, "finished": ro.finished})
        adv, group_std, round_metrics = round_stats(ranks, dist.rank, G, cfg.scale_rewards)
        keep = [i for i in range(len(ro)) if not (cfg.filter_zero_std and float(group_std[i // G]) == 0.0)]
        examples = [Example(ro.prompt_ids[i] + ro.completion_ids[i], len(ro.prompt_ids[i])) for i in range(len(ro))]
        ref_logps = None
        if ref_model is not None:
            ref_logps = _completion_logps(sess, ref_model, examples, pad, cfg.temperature)
        gen_seconds = time.perf_counter() - t0
        lengths = torch.tensor(ro.lengths, dtype=torch.float32)
        round_metrics.update({"rollout_s": gen_seconds, "round": rnd + 1})
        if dist.rank == 0:
            with samples_path.open("a") as f:
                for i in range(0, len(ro), max(1, len(ro) // max(cfg.samples_logged, 1)))[:cfg.samples_logged]:
                    f.write(json.dumps({"round": rnd + 1, "prompt": srows[i]["prompt"], "completion": ro.texts[i],
                                        "answer": srows[i].get("answer"), "reward": total[i],
                                        "advantage": float(adv[i])}) + "\n")

        # μ passes of optimizer steps over minibatches of this round's (kept) samples
        per_step = max(1, len(keep) * cfg.num_iterations // cfg.steps_per_round) if keep else 0
        order = keep * cfg.num_iterations
        for k in range(cfg.steps_per_round):
            if step >= cfg.max_steps:
                break
            t1 = time.perf_counter()
            chunk = order[k * per_step:(k + 1) * per_step] if k < cfg.steps_per_round - 1 else order[k * per_step:]
            mb_examples = [examples[i] for i in chunk]
            batches = sess.micro_batches(mb_examples, pad)
            # weights of one mean over every rank's sequences (the engine averages the ranks' gradients, and
            # Session.optimize scales each rank's loss by the world size to undo that); every rank reduces
            total_tokens = dist.all_reduce_sum(float(lengths[chunk].clamp(min=1).sum()) if chunk else 0.0)
            total_sequences = dist.all_reduce_sum(float(len(chunk)))
            seq_w = aggregation_weights(lengths[chunk], cfg.loss_aggregation, cfg.max_new_tokens,
                                        total_tokens=total_tokens, total_sequences=total_sequences) if chunk \
                else torch.zeros(0)
            seq_adv = adv[chunk]
            old = [ro.logprobs[i] for i in chunk]
            ref = [ref_logps[i] for i in chunk] if ref_logps is not None else None
            normalizer = dist.all_reduce_sum(float(sum(lengths[chunk]))) if chunk else dist.all_reduce_sum(0.0)

            def loss_fn(j, mb):
                logp, entropy = sess.forward(model, mb, cfg.temperature)
                if mb.num_tokens == 0 or not chunk:  # an empty micro-batch only keeps the ranks in step
                    return (logp * 0).sum(), {}
                seq = mb.seq_index.clamp(min=0)
                mask = mb.loss_mask
                loss, m = grpo_loss(logp, completion_values(mb, mb_examples, old), seq_adv.to(logp.device)[seq],
                                    mask, seq_w.to(logp.device)[seq],
                                    epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                    ref_logp=completion_values(mb, mb_examples, ref) if ref else None, beta=cfg.beta)
                m["entropy"] = (entropy * mask).sum()
                return loss, m

            loss, sums, grad_norm, lr = sess.optimize(batches, loss_fn)
            seconds = time.perf_counter() - t1 + (gen_seconds if k == 0 else 0.0)
            sess.record(step, loss, sums, normalizer, grad_norm, lr,
                        [len(e) for e in mb_examples], seconds, extra=round_metrics)
            sess.maybe_checkpoint(step)
            step += 1

    history = sess.finish()
    summary = {"rounds": -(-len(history) // cfg.steps_per_round) if history else 0, "steps": len(history),
               "prompts": len(rows), "rewards": rewards.names, "final": history[-1] if history else None,
               "reward_curve": [h["reward"] for h in history[::cfg.steps_per_round]]}
    save_model(model, tokenizer, out / "model", dist)
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


@torch.no_grad()
def _completion_logps(sess: Session, model, examples: list[Example], pad_id: int, temperature: float,
                      ) -> list[torch.Tensor]:
    """Per-completion-token log-probs of `model` (the reference) for every example, in one pass."""
    out: list[torch.Tensor | None] = [None] * len(examples)
    for mb in sess.micro_batches(examples, pad_id):
        logp, _ = sess.forward(model, mb, temperature)
        for i in mb.seq_index.unique().tolist():
            if i >= 0:
                sel = (mb.seq_index == i) & (mb.loss_mask > 0)
                if sel.any():  # (a rank's filler micro-batch has no trained tokens)
                    out[i] = logp[sel].float().cpu()
    return out


CONFIG = GRPOConfig


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, GRPOConfig, run, argv)


if __name__ == "__main__":
    main()
