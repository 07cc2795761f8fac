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

With a rollout worker (components/training/rollout_worker.py: `rollout_worker: true`, `max_staleness` k) step 1
takes the round from the worker, which sampled it with weights up to k versions older, and step 5 pushes the new
version to the worker and asks for the round k ahead (`Ahead`); the rest of the round is the same.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from components.training.advantages import Scores, get_adv_estimator, padded
from components.training.batching import Example
from components.training.engines import EngineSyncError, logprob_gap
from components.training.loop import Session, StepResult, step_indices
from components.training.lora import base_reference
from components.training.objectives import IS_METRICS, importance_weights, kl_k1
from components.training.rl import completion_logprobs, minibatches, rollout_seed, write_samples
from components.training.rollout_worker import RolloutWorker, VersionBook

log = logging.getLogger("components.training.rl_loop")


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


class Ahead:
    """The rounds a rollout worker samples ahead of the trainer: with max_staleness k, once version v is pushed
    round v + k is requested, drawn with weights ≥ v (components/training/rollout_worker.py).

    A worker that exits, fails or misses a deadline is restarted (up to rollout_worker_restarts times in the run)
    and caught up: it gets the trainer's current version and every round requested but not yet taken, again. Only
    a taken round is trained, and each once; the rounds sampled again are fresher than they would have been."""

    def __init__(self, stage: RLStage, session: Session, worker: RolloutWorker, prompt_rows: list[dict]):
        self.stage, self.session, self.worker, self.prompt_rows = stage, session, worker, prompt_rows
        self.k = stage.cfg.max_staleness
        self.restarts = stage.cfg.rollout_worker_restarts
        self.last_round = (stage.cfg.train.max_steps - 1) // stage.steps_per_round
        self.book = VersionBook(self.k)
        self.version = 0
        self.outstanding: list[int] = []  # requested, not yet taken: what a restarted worker is asked again

    def _send(self, round_index: int) -> None:
        stage = self.stage
        rows, places = round_prompts(stage, self.session, self.prompt_rows, round_index)
        self.worker.request(round_index, self.version, stage.cfg.sampling, [row["prompt"] for row in rows],
                            n=stage.group_size, seed=rollout_seed(stage.cfg.train.seed, round_index), indices=places)

    def begin(self, model, version: int, book: dict | None = None) -> None:
        """Push `version` (a fresh start: 0, a resume: the checkpoint's, with its `book`, VersionBook.state) and
        request the rounds it samples."""
        self.version = version
        if book is not None:
            self.book.restore(book)
        self.outstanding = list(range(version, min(version + self.k, self.last_round) + 1))
        self._caught_up(lambda: self._resend(model), again=False)

    def _resend(self, model) -> None:
        """The current version, then every outstanding round."""
        self.worker.push(model, self.version)
        for round_index in self.outstanding:
            self._send(round_index)

    def _caught_up(self, call, *, again: bool = True):
        """call(); when the worker breaks meanwhile (exits, fails, misses a deadline) and restarts are left, a fresh
        worker gets the current version and the outstanding rounds, and (`again`) call() runs again: a call that
        only sends needs not, the restart sent it all."""
        failed = None
        while True:
            try:
                if failed is None:
                    return call()
                self.worker.restart()
                self._resend(self.stage.model)
                failed = None
                if not again:
                    return None
            except EngineSyncError as e:
                if not self.worker.broken or self.book.restarts >= self.restarts:
                    raise
                self.book.restarts += 1
                log.warning("%s: restarting the rollout worker (%d of rollout_worker_restarts %d), with weights "
                            "version %d and rounds %s again", e, self.book.restarts, self.restarts, self.version,
                            [r + 1 for r in self.outstanding])
                failed = e

    def take(self, round_index: int) -> tuple:
        """Round `round_index`'s samples, within max_staleness (an older round is dropped and requested again),
        the version they were drawn with and the round's async/* metrics."""
        started = time.perf_counter()
        while True:
            sampled, version, sample_s = self._caught_up(lambda: self.worker.take(round_index))
            if self.book.accept(round_index, version):
                break
            self._caught_up(lambda: self._send(round_index), again=False)
        self.outstanding.remove(round_index)
        metrics = {**self.book.trained(round_index, version, len(sampled)), "async/sample_s": sample_s,
                   "async/wait_s": time.perf_counter() - started}
        return sampled, version, metrics

    def advance(self, model, version: int) -> None:
        """After a round's last step: push the new `version`, request the round k ahead."""
        self.version = version
        ahead = [version + self.k] if version + self.k <= self.last_round else []
        self.outstanding += ahead

        def send():
            self.worker.push(model, version)
            for round_index in ahead:
                self._send(round_index)

        self._caught_up(send, again=False)


def train(stage: RLStage, session: Session, engine, prompt_rows: list[dict], rewards, out: Path) -> list[dict]:
    """The rounds, from the step a resume starts at to train.max_steps; returns every step's record."""
    cfg, dist = stage.cfg, session.dist
    step = session.start_step
    ahead = Ahead(stage, session, engine, prompt_rows) if isinstance(engine, RolloutWorker) else None
    if ahead is not None:
        version = step // stage.steps_per_round  # a checkpoint sits between rounds and records its version
        if session.resumed.get("version", version) != version:
            raise ValueError(f"the checkpoint of step {step} records weights version {session.resumed['version']}, "
                             f"not {version}: it was not saved between rounds")
        ahead.begin(stage.model, version, session.resumed.get("async"))
    while step < cfg.train.max_steps:
        # 1-3. rollout (or the worker's round), score, advantages
        round_index, sampled, version, async_metrics = step // stage.steps_per_round, None, None, {}
        taken = time.perf_counter()
        if ahead is not None:
            sampled, version, async_metrics = ahead.take(round_index)
        rnd = rollout(stage, session, engine, prompt_rows, rewards, round_index=round_index, sampled=sampled)
        rnd.seconds = time.perf_counter() - taken  # with a worker, the wait for its round too: the step's wall time
        rnd.metrics.update(async_metrics)
        engine.rest()  # the round is sampled: the engine's memory goes to the trainer until the sync
        stage.after_rollout(session, rnd)
        if dist.rank == 0:
            extra = (lambda sample: {}) if version is None else (lambda sample: {"version": version, "sample": sample})
            write_samples(out / "samples.jsonl", rnd, cfg.samples_logged,
                          lambda sample: {**stage.sample_fields(rnd, sample), **extra(sample)})
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
                if ahead is not None:
                    ahead.advance(stage.model, rnd.index + 1)
                else:
                    engine.sync(stage.model)
                sync_s = time.perf_counter() - synced
            # 6. record, 7. checkpoint
            seconds = time.perf_counter() - started + (rnd.seconds if position == 0 else 0.0)
            lengths = [len(rnd.examples[sample]) for sample in minibatch]
            session.record(step, result, trained_tokens, lengths, seconds,
                           extra={**rnd.metrics, **extra, "rollout/sync_s": sync_s})
            state = stage.checkpoint_state()
            if ahead is not None:  # the weights' version: the rounds trained (a checkpoint sits between rounds)
                state = {**(state or {}), "version": (step + 1) // stage.steps_per_round, "async": ahead.book.state()}
            session.maybe_checkpoint(step, state)
            step += 1
    return session.finish()


def correction_weights(cfg, rnd: Round, minibatch: list[int]) -> tuple[list[Tensor] | None, dict]:
    """The off-policy correction of the round's samples `minibatch` (this rank's): each one's per-token importance
    weights, π_old (the trainer's) over the engine's as cfg's tis_cap, tis_level and tis_mode bound them
    (objectives.importance_weights), and the tokens they bounded, as a sum the step's record divides by its token
    count (IS_METRICS). None and {} without tis_cap."""
    if cfg.tis_cap is None:
        return None, {}
    old, mask = padded([rnd.old_logprobs[sample] for sample in minibatch])
    behaviour, _ = padded([rnd.rollout_logprobs[sample] for sample in minibatch])
    weights, bounded = importance_weights(old, behaviour, mask, cap=cfg.tis_cap, level=cfg.tis_level,
                                          mode=cfg.tis_mode)
    per_sample = [weights[row, :len(rnd.old_logprobs[sample])] for row, sample in enumerate(minibatch)]
    return per_sample, {IS_METRICS[cfg.tis_mode]: float(bounded.sum())}


def round_prompts(stage: RLStage, session: Session, prompt_rows: list[dict], round_index: int
                  ) -> tuple[list[dict], list[int]]:
    """This rank's share of the round's prompt rows, and each one's place in the round (its samples' seeds)."""
    dist = session.dist
    indices = step_indices(len(prompt_rows), stage.prompts_per_round, round_index, stage.cfg.train.seed)
    places = list(range(dist.rank, len(indices), dist.world))  # every rank samples its own share of the round
    return [prompt_rows[indices[place]] for place in places], places


def rollout(stage: RLStage, session: Session, engine, prompt_rows: list[dict], rewards, *, round_index: int,
            sampled=None) -> Round:
    """Sample (or take `sampled`, a rollout worker's), score and prepare one round: this rank's share of its prompts,
    their completions and scores, the log-probs and values the estimator and the steps read, the advantages, and
    the round's metrics."""
    started = time.perf_counter()
    cfg, dist, model, pad_id = stage.cfg, session.dist, stage.model, stage.tokenizer.pad_token_id
    temperature = cfg.sampling.temperature
    round_rows, places = round_prompts(stage, session, prompt_rows, round_index)
    # sample j of the prompt at place p of the round is seeded from (the round's seed, p, j): the round samples
    # the same completions whatever the number of ranks (and engines) it is split over
    if sampled is None:
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

