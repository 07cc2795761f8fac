"""The one RL loop of the stages that train on their own samples (grpo, ppo). One round, top to bottom (`train`):

1. rollout: this rank's share of the round's prompts, `group_size` completions of each from the engine, with
   π_old's per-token log-probs (recomputed by the trainer where the stage asks: the engine's numerics differ);
2. score: the reward functions; every rank's scores gathered, so a round's statistics are one process's;
3. advantages: the reference's log-probs (a KL), the critic's values where the stage has a critic, then the
   stage's estimator by name (components/training/advantages.py: grpo, rloo, reinforce_pp, gae);
4. minibatch updates: `passes` passes over the kept samples, cut into the round's optimizer steps; each is the
   stage's `step` (its loss; ppo: its critic's too);
5. sync: after the round's last step the engine gets the new weights (not after the run's last step);
6. record: one metrics line per step, a few scored samples per round;
7. checkpoint: Session.maybe_checkpoint, with the stage's own state.

GRPO and PPO differ by their estimator, their loss and whether they have a critic (an `RLStage`), not by this loop.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from components.training.advantages import Scores, get_adv_estimator, padded
from components.training.batching import Example
from components.training.engines import logprob_gap
from components.training.loop import Session, StepResult, step_indices
from components.training.lora import base_reference
from components.training.objectives import kl_k1
from components.training.rl import completion_logprobs, minibatches, rollout_seed, write_samples


@dataclass
class Round:
    """One round's samples on this rank, scored, with everything its optimizer steps read (per completion
    token: log-probs, values, advantages, returns)."""

    index: int
    """The round, 0-based."""
    rows: list[dict]
    """The prompt row of each sample (group_size samples in a row per prompt: a group)."""
    completions: list[str]
    scores: list[float]
    """Each sample's total (weighted) reward."""
    examples: list[Example]
    """Prompt + completion tokens of each sample."""
    lengths: list[int]
    """Each sample's completion length in tokens."""
    old_logprobs: list[Tensor]
    """π_old's log-prob of each completion token: the rollout's, or the trainer's where the stage recomputes."""
    rollout_logprobs: list[Tensor]
    """The engine's log-prob of each completion token."""
    ref_logprobs: list[Tensor] | None
    """The reference's log-prob of each completion token; None without a reference."""
    values: list[Tensor] | None
    """The critic's V(s_t) of each completion token; None without a critic."""
    kl: Tensor
    """[N, T] k1 log π_old − log π_ref (0 without a reference), left-aligned as `mask`."""
    mask: Tensor
    """[N, T] 1 on completion tokens."""
    advantages: list[Tensor]
    """The estimator's Â of each completion token."""
    returns: list[Tensor] | None
    """The estimator's returns of each completion token (gae: the critic's targets)."""
    kept: list[int]
    """The samples trained on (grpo's filter_zero_std drops groups whose rewards are all equal)."""
    metrics: dict
    """The round's metrics (rewards, completions/*, rollout_s, round), reported with each of its steps."""
    seconds: float
    """Time of the rollout, scoring and the advantages' passes (added to the round's first step)."""


class RLStage:
    """What a stage gives the loop: its settings, models and hooks. grpo and ppo subclass it."""

    estimator: str
    """The advantage estimator's name (advantages.ADV_ESTIMATOR_REGISTRY)."""
    prompts_per_round: int
    group_size: int
    """Completions sampled per prompt."""
    passes: int
    """Passes of optimizer steps over a round's samples."""
    steps_per_round: int
    shuffle: bool = False
    """Each pass takes the samples in an order of its own (rl.minibatches)."""
    recompute_old: bool = False
    """The trainer computes π_old's log-probs again (sampling/sampling_logp_difference/* then compares the
    engine's)."""

    def __init__(self, cfg, model, ref_model, tokenizer):
        self.cfg, self.model, self.ref_model, self.tokenizer = cfg, model, ref_model, tokenizer

    @property
    def kl_coef(self) -> float:
        """β of a KL folded into the reward (the estimator reads it)."""
        return 0.0

    def estimator_options(self) -> dict:
        return {}

    def critic_values(self, session: Session, examples: list[Example]) -> list[Tensor] | None:
        """The critic's V(s_t) of every completion token (what gae needs); None: the stage has no critic."""
        return None

    def round_stats(self, session: Session, rnd: Round, ranks: list[dict]) -> tuple[dict, list[int]]:
        """The round's metrics and the samples kept for training; `ranks`: every rank's scores, per-function
        scores, lengths and finished flags, in rank order."""
        raise NotImplementedError

    def after_rollout(self, session: Session, rnd: Round) -> None:
        """What the stage updates from a sampled round before its steps (ppo: the adaptive KL coefficient)."""

    def sample_fields(self, rnd: Round, sample: int) -> dict:
        """The stage's own fields of a scored sample in samples.jsonl."""
        raise NotImplementedError

    def step(self, session: Session, rnd: Round, minibatch: list[int], position: int) -> tuple[StepResult, float, dict]:
        """One optimizer step on the round's samples `minibatch` (the round's `position`-th): its result, its
        trained-token count over all ranks, and metrics for its line."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict | None:
        return None


def train(stage: RLStage, session: Session, engine, prompt_rows: list[dict], rewards, out: Path) -> list[dict]:
    """The rounds, from the step a resume starts at to train.max_steps; returns every step's record."""
    cfg, dist = stage.cfg, session.dist
    step = session.start_step
    while step < cfg.train.max_steps:
        # 1-3. rollout, score, advantages
        rnd = rollout(stage, session, engine, prompt_rows, rewards, round_index=step // stage.steps_per_round)
        engine.rest()  # the round is sampled: the engine's memory goes to the trainer until the sync
        stage.after_rollout(session, rnd)
        if dist.rank == 0:
            write_samples(out / "samples.jsonl", rnd, cfg.samples_logged,
                          lambda sample: stage.sample_fields(rnd, sample))
        # 4. passes of optimizer steps over minibatches of the round's kept samples
        shuffle = (cfg.train.seed, rnd.index) if stage.shuffle else None
        steps = minibatches(rnd.kept, stage.passes, stage.steps_per_round, shuffle=shuffle)[:cfg.train.max_steps - step]
        for position, minibatch in enumerate(steps):
            started = time.perf_counter()
            result, trained_tokens, extra = stage.step(session, rnd, minibatch, position)
            # 5. sync: the next round samples from the updated policy
            sync_s = 0.0
            if position == len(steps) - 1 and step + 1 < cfg.train.max_steps:
                synced = time.perf_counter()
                engine.sync(stage.model)
                sync_s = time.perf_counter() - synced
            # 6. record, 7. checkpoint
            seconds = time.perf_counter() - started + (rnd.seconds if position == 0 else 0.0)
            lengths = [len(rnd.examples[sample]) for sample in minibatch]
            session.record(step, result, trained_tokens, lengths, seconds,
                           extra={**rnd.metrics, **extra, "rollout/sync_s": sync_s})
            session.maybe_checkpoint(step, stage.checkpoint_state())
            step += 1
    return session.finish()


def rollout(stage: RLStage, session: Session, engine, prompt_rows: list[dict], rewards, *, round_index: int
            ) -> Round:
    """Sample, score and prepare one round: this rank's share of its prompts, their completions and scores, the
    log-probs and values the estimator and the steps read, the advantages, and the round's metrics."""
    started = time.perf_counter()
    cfg, dist, model, pad_id = stage.cfg, session.dist, stage.model, stage.tokenizer.pad_token_id
    temperature = cfg.sampling.temperature
    indices = step_indices(len(prompt_rows), stage.prompts_per_round, round_index, cfg.train.seed)
    places = list(range(dist.rank, len(indices), dist.world))  # every rank samples its own share of the round
    round_rows = [prompt_rows[indices[place]] for place in places]
    # sample j of the prompt at place p of the round is seeded from (the round's seed, p, j): the round samples
    # the same completions whatever the number of ranks (and engines) it is split over
    sampled = cfg.sampling.sample(engine, [row["prompt"] for row in round_rows], n=stage.group_size,
                                  seed=rollout_seed(cfg.train.seed, round_index), indices=places)
    rows = [round_rows[prompt] for prompt in sampled.prompt_index]
    scores, per_fn = rewards.score([row["prompt"] for row in rows], sampled.texts,
                                   [row.get("answer") for row in rows], [row.get("task") for row in rows])
    ranks = dist.all_gather({"total": scores, "per_fn": per_fn, "lengths": sampled.lengths,
                             "finished": sampled.finished})
    examples = [Example(prompt + completion, len(prompt))
                for prompt, completion in zip(sampled.prompt_ids, sampled.completion_ids)]
    # π_old: the engine's log-probs, or the trainer's own (as verl does), the gap between them reported
    old_logprobs, gap = sampled.logprobs, {}
    if stage.recompute_old:
        old_logprobs = completion_logprobs(session, model, examples, pad_id, temperature)
        gap = logprob_gap(dist, old_logprobs, sampled.logprobs)
    old, mask = padded(old_logprobs)
    ref_logprobs, kl = None, torch.zeros_like(old)
    if stage.ref_model is not None:  # a LoRA policy is its own reference: its base, the adapter disabled
        with base_reference(model) if stage.ref_model is model else nullcontext():
            ref_logprobs = completion_logprobs(session, stage.ref_model, examples, pad_id, temperature)
        kl = kl_k1(old, padded(ref_logprobs)[0]) * mask
    values = stage.critic_values(session, examples)
    gathered = [score for samples in ranks for score in samples["total"]]
    start = sum(len(samples["total"]) for samples in ranks[:dist.rank])
    advantages, returns = get_adv_estimator(stage.estimator)(Scores(
        rewards=torch.tensor(scores, dtype=torch.float32), gathered=torch.tensor(gathered, dtype=torch.float32),
        start=start, group_size=stage.group_size, kl=kl, mask=mask, reduce=dist.all_reduce_sums,
        kl_coef=stage.kl_coef, values=padded(values)[0] if values is not None else None,
        options=stage.estimator_options()))
    lengths = sampled.lengths
    rnd = Round(index=round_index, rows=rows, completions=sampled.texts, scores=scores, examples=examples,
                lengths=lengths, old_logprobs=old_logprobs, rollout_logprobs=sampled.logprobs,
                ref_logprobs=ref_logprobs, values=values, kl=kl, mask=mask,
                advantages=[advantages[i, :length] for i, length in enumerate(lengths)],
                returns=[returns[i, :length] for i, length in enumerate(lengths)] if returns is not None else None,
                kept=[], metrics={}, seconds=0.0)
    metrics, rnd.kept = stage.round_stats(session, rnd, ranks)
    rnd.seconds = time.perf_counter() - started
    rnd.metrics = {**metrics, **gap, "rollout_s": rnd.seconds, "round": round_index + 1}
    return rnd

