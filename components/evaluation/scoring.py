"""Sampling, verifying and scoring an eval suite: one code path for the evaluate stage and for evaluation during
training (components/evaluation/during_training.py), so both give the same numbers for the same model, suite and
sampling settings."""

from __future__ import annotations

import numpy as np

from components.datasets import DataError, RowError, check_bad_fraction, prompt_row, read_jsonl
from components.evaluation.stats import avg_at_n, pass_at_k_per_prompt
from components.tasks import TASKS, get_task
from components.training.batching import Example, encode_example


def load_suite_rows(suite: dict) -> list[dict]:
    """The suite's rows {prompt, answer, task, completion?}; a bad data row is an error naming file, line, field."""
    if "data" not in suite:
        return get_task(suite["task"]).generate(suite["n_prompts"], seed=suite["seed"], split=suite["split"],
                                                part="test")
    from components.storage import localize

    path = localize(suite["data"])
    rows, errors, total = [], [], 0
    for line, raw in read_jsonl(path):
        total += 1
        row = raw if isinstance(raw, RowError) else prompt_row(raw, str(path), line)
        if isinstance(row, RowError):
            errors.append(row)
            continue
        task = row.get("task", suite["task"])
        if "answer" not in row:
            errors.append(RowError(str(path), line, "answer", "missing (an eval row needs a reference answer)"))
        elif task is None:
            errors.append(RowError(str(path), line, "task", "missing: set it on the row or as the suite's 'task'"))
        elif task not in TASKS:
            errors.append(RowError(str(path), line, "task",
                                   f"unknown task {task!r} (known: {', '.join(sorted(TASKS))})"))
        else:
            rows.append({**row, "task": task})
    check_bad_fraction(errors, total, 0.0, f"suite {suite['name']}: {path}")
    if not rows:
        raise DataError(f"suite {suite['name']}: {path}: no rows")
    return rows


def encode_references(tokenizer, rows: list[dict], max_length: int) -> list[Example]:
    """Reference completions as Examples, cut to `max_length` tokens (a prompt that fills it is left out)."""
    examples = [encode_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return [Example(e.input_ids[:max_length], e.completion_start) for e in examples if e.completion_start < max_length]


def sample_and_score(engine, rows: list[dict], cfg, rewards=None,
                     shard: range | None = None) -> tuple[dict, list[dict]] | None:
    """Sample cfg.samples completions per row of `shard` (default: every row) through the rollout engine, each
    prompt's samples seeded by its index in `rows`; verify them with the task's verifier and score them with
    `rewards` (None: no reward/<fn> values). Per-prompt values and the samples, in row order; None for an empty
    shard. `cfg`: the sampling settings (samples, temperature, top_p, max_new_tokens, seed, batch_size, k) of an
    EvaluateConfig or a TrainingEval."""
    shard = range(len(rows)) if shard is None else shard
    if not shard:
        return None
    rows = [rows[i] for i in shard]
    prompts, P, n = [r["prompt"] for r in rows], len(rows), cfg.samples
    ro = engine.generate(prompts, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                         indices=list(shard))
    if list(ro.prompt_index) != [i for i in range(P) for _ in range(n)]:
        raise RuntimeError("rollout returned samples out of prompt order")
    rep = [rows[i] for i in ro.prompt_index]
    correct = np.array([get_task(r["task"]).verify(r["prompt"], text, r["answer"]) >= 1.0
                        for r, text in zip(rep, ro.texts)]).reshape(P, n)
    per_fn = {}
    if rewards is not None:
        _, per_fn = rewards.score([r["prompt"] for r in rep], ro.texts, [r["answer"] for r in rep],
                                  [r["task"] for r in rep])
    lengths = np.asarray(ro.lengths, dtype=float).reshape(P, n)
    per_prompt = {"accuracy": avg_at_n(correct),
                  **{f"pass@{k}": pass_at_k_per_prompt(correct, k) for k in cfg.k},
                  **{f"reward/{fn}": avg_at_n(np.asarray(v, dtype=float).reshape(P, n)) for fn, v in per_fn.items()},
                  "length": avg_at_n(lengths)}
    samples = [{"prompt": r["prompt"], "answer": r["answer"], "completion": text, "correct": bool(c),
                "length": int(length), "rewards": {fn: float(v[i]) for fn, v in per_fn.items()}}
               for i, (r, text, c, length) in enumerate(zip(rep, ro.texts, correct.reshape(-1), lengths.reshape(-1)))]
    return per_prompt, samples


def merge_scored(parts: list[tuple[dict, list[dict]] | None]) -> tuple[dict, list[dict]]:
    """The shards of sample_and_score (in shard order, None for an empty one) as one: per-prompt values and
    samples in prompt order."""
    parts = [p for p in parts if p is not None]
    per_prompt = {m: np.concatenate([p[0][m] for p in parts]) for m in parts[0][0]}
    return per_prompt, [sample for p in parts for sample in p[1]]


def mlflow_metric_name(name: str) -> str:
    """MLflow allows letters, digits and `_-. :/` in a metric name: `pass@k` is logged there as `pass_at_k`."""
    return name.replace("@", "_at_")
