"""Evaluation by generation during training (the `eval` part of sft, dpo, grpo and ppo), and the reward-hacking
watch of grpo and ppo.

A stage calls `attach(session, cfg.eval, model, tokenizer, tracked=..., watch=...)` once its Session exists. Every
`eval.every` optimizer steps, and at the last step, the Session's `record` calls the evaluator on every rank: the
model being trained samples each suite's prompts with the eval part's own settings (Hugging Face generate on the
trainer's weights, whatever the stage's rollout engine: its weights are the trainer's only after a sync), the
task's verifier scores the samples (components/evaluation/scoring.py, the evaluate stage's code path) and the
step's record gets `eval/<suite>/accuracy`, `pass@k`, `length` and, for a task suite (whose rows carry reference
completions), `entropy` teacher-forced on those references, as the evaluate stage measures them.

On several ranks each rank samples a contiguous shard of a suite's prompts (the evaluate stage's shards; samples
are seeded per prompt, so the numbers do not depend on the number of ranks) and every rank gets every shard.
Under ZeRO-3 the ranks' generate and forward passes run in lockstep (components/training/rollout.py), an idle rank
joining them.

The watch (grpo and ppo): after each evaluation it compares the first and the last of the latest
`eval.watch_window` evaluations. It warns, and tags the stage's MLflow run `posttrain.reward_hacking`, when the
training reward rose (the mean `reward` of the steps since the evaluation before each) while a suite's accuracy
fell beyond noise: by more than 1.96 standard errors of the difference of two independent proportions over the
suite's prompts, sqrt((a₁(1−a₁) + a₂(1−a₂)) / prompts). Both evaluations see the same prompts and seeds, so the
two are positively correlated and this error overstates the noise of their difference: the rule errs towards
silence.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from components.evaluation.scoring import (
    encode_references,
    load_suite_rows,
    merge_scored,
    mlflow_metric_name,
    sample_and_score,
)
from components.evaluation.suites import TrainingEval
from components.training.engines import HFEngine
from components.training.parallel import SamplingWorld

log = logging.getLogger("components.evaluation")

Z = 1.96
"""Standard errors an accuracy must fall by to count as a fall beyond noise (two-sided 95%)."""
HACKING_TAG = "posttrain.reward_hacking"


class TrainingEvaluator:
    """`session.evaluator`: called with the number of steps done, after each step, on every rank; returns the
    evaluation's metrics when one is due ({} otherwise), the same on every rank."""

    def __init__(self, settings: TrainingEval, session, model, tokenizer):
        self.settings, self.session, self.model = settings, session, model
        self.pad_id = tokenizer.pad_token_id
        self.world = SamplingWorld(rank=session.dist.rank, world=session.dist.world)
        self.rows = {s["name"]: load_suite_rows(s) for s in settings.suites}  # read and checked before training
        self.references = {
            s["name"]: encode_references(tokenizer, [r for r in self.rows[s["name"]] if "completion" in r],
                                         settings.max_length)
            for s in settings.suites if "data" not in s}
        self.engine = HFEngine(model, tokenizer)

    def due(self, steps_done: int) -> bool:
        every = self.settings.every
        return bool(every) and (steps_done % every == 0 or steps_done == self.session.cfg.max_steps)

    def __call__(self, steps_done: int) -> dict:
        if not self.due(steps_done):
            return {}
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            out = {}
            for suite in self.settings.suites:
                out |= self.suite_metrics(suite["name"])
        finally:
            self.model.train(was_training)
        out["eval_s"] = time.perf_counter() - started
        if self.session.dist.rank == 0:
            log.info("step %d: eval %s", steps_done,
                     " ".join(f"{key.removeprefix('eval/')} {value:.4g}" for key, value in out.items()))
        return out

    def suite_metrics(self, name: str) -> dict:
        rows, s = self.rows[name], self.settings
        shard = self.world.shard(len(rows))
        part = sample_and_score(self.engine, rows, s, shard=shard)
        if part is None:  # an empty shard: under ZeRO-3 this rank still joins the others' decode steps
            self.engine.generate([], n=s.samples, temperature=s.temperature, top_p=s.top_p,
                                 max_new_tokens=s.max_new_tokens, seed=s.seed, batch_size=s.batch_size, indices=[])
        per_prompt, _ = merge_scored(self.session.dist.all_gather(part))
        out = {f"eval/{name}/{metric}": float(values.mean()) for metric, values in per_prompt.items()}
        if self.references.get(name):
            out[f"eval/{name}/entropy"] = self.entropy(self.references[name])
        return out

    @torch.no_grad()
    def entropy(self, examples) -> float:
        """Token-mean entropy of the model on the completions of `examples` (this rank's shard, summed over ranks),
        as the evaluate stage measures it teacher-forced."""
        session = self.session
        local = [examples[i] for i in self.world.shard(len(examples))]
        sums = {"entropy": 0.0, "tokens": 0.0}
        for batch in session.micro_batches(local, self.pad_id):  # as many on every rank (ZeRO-3 gathers)
            _, entropy = session.forward(self.model, batch)
            sums["entropy"] += float((entropy * batch.loss_mask).sum())
            sums["tokens"] += float(batch.loss_mask.sum())
        totals = session.dist.all_reduce_sums(sums)
        return totals["entropy"] / max(totals["tokens"], 1.0)


def hacking_signal(history: list[dict], suite: str, prompts: int, window: int) -> dict | None:
    """The reward-hacking rule (module docstring) on a stage's step records: what rose and fell, or None.

    history: the records in step order; the evaluations are those holding `eval/<suite>/accuracy`; prompts: the
    suite's prompt count; window: how many of the latest evaluations the rule spans (their first vs their last)."""
    key = f"eval/{suite}/accuracy"
    evals = [i for i, record in enumerate(history) if key in record]
    if len(evals) < 2:
        return None
    chosen = evals[-window:]

    def reward_up_to(position: int) -> float | None:
        j = evals.index(position)
        values = [history[i]["reward"] for i in range(evals[j - 1] + 1 if j else 0, position + 1)
                  if isinstance(history[i].get("reward"), (int, float))]
        return sum(values) / len(values) if values else None

    first, last = chosen[0], chosen[-1]
    reward_first, reward_last = reward_up_to(first), reward_up_to(last)
    acc_first, acc_last = float(history[first][key]), float(history[last][key])
    noise = Z * math.sqrt((acc_first * (1 - acc_first) + acc_last * (1 - acc_last)) / prompts)
    if reward_first is None or reward_last is None or not reward_last > reward_first:
        return None
    if not acc_first - acc_last > noise:
        return None
    return {"suite": suite, "from_step": history[first]["step"], "to_step": history[last]["step"],
            "reward": (reward_first, reward_last), "accuracy": (acc_first, acc_last), "noise": noise,
            "prompts": prompts}


def hacking_message(signal: dict) -> str:
    (r1, r2), (a1, a2) = signal["reward"], signal["accuracy"]
    return (f"possible reward hacking: from step {signal['from_step']} to step {signal['to_step']} the training "
            f"reward rose {r1:.4g} → {r2:.4g} while eval/{signal['suite']}/accuracy fell {a1:.3f} → {a2:.3f} "
            f"(a fall of {a1 - a2:.3f} > {signal['noise']:.3f}, 1.96 standard errors over {signal['prompts']} "
            "prompts): the reward pays for something the held-out verifier does not")


def attach(session, settings: TrainingEval, model, tokenizer, *, tracked=None, watch: bool = False,
           ) -> TrainingEvaluator | None:
    """Evaluate during training when `settings.every` > 0: sets `session.evaluator`, and wraps
    `session.on_metrics` so that MLflow gets `pass_at_k` for `pass@k` and, with `watch` (a stage whose records
    carry the training `reward`), each evaluation is followed by the reward-hacking rule (a warning line and a tag
    on `tracked`, the stage's run). None when off."""
    if not settings.every:
        return None
    evaluator = TrainingEvaluator(settings, session, model, tokenizer)
    session.evaluator = evaluator
    downstream = session.on_metrics
    prompts = {name: len(rows) for name, rows in evaluator.rows.items()}

    def on_metrics(record: dict) -> None:  # rank 0, after the record joined session.history
        if downstream is not None:
            downstream({mlflow_metric_name(key): value for key, value in record.items()})
        if not watch or not any(key.startswith("eval/") for key in record):
            return
        for suite, count in prompts.items():
            signal = hacking_signal(session.history, suite, count, settings.watch_window)
            if signal is not None:
                message = hacking_message(signal)
                log.warning("step %d: %s", record["step"], message)
                if tracked is not None:
                    tracked.set_tags({HACKING_TAG: message})

    session.on_metrics = on_metrics
    return evaluator
