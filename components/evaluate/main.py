"""Evaluate stage: a candidate model and its baselines on the same prompts, with intervals, and a report.

    python -m components.evaluate --config eval.yaml       (or: posttrain stage evaluate --config eval.yaml)

For each suite (a task's in-domain or OOD test prompts, or a JSONL file of prompts with reference answers)
every model — the candidate and each baseline (the base model, the previous stage, the champion) — samples
`samples` completions per prompt with the same seed, through the rollout engine (temperature 0 is greedy).
The task's verifier decides which samples are correct; the reward functions score them all.

Per suite and model: accuracy (avg@n), pass@k (unbiased estimator), reward/<fn> means and completion length,
each with a 95% percentile-bootstrap interval over prompts; for task suites, whose rows carry reference
completions, the mean token entropy of the model and its KL to the base model, teacher-forced on those
references (the quantity the training loop reports as `entropy`, here on text no stage trained on). The
same two on `heldout_text` appear as suite `heldout`. Every candidate − baseline difference of a per-prompt
metric has a paired bootstrap interval (the same prompts resampled for both).

Outputs in `output_dir`: eval.json (read by the promotion gate), metrics.json (flat, for KFP Metrics),
samples.jsonl (every completion with its scores) and report.html (self-contained, figures embedded).

On several processes (torchrun, one per accelerator; components/training/parallel.py) each data-parallel group
samples and scores a contiguous shard of every suite's prompts; rank 0 gathers the shards in prompt order,
measures the teacher-forced quantities itself (entropy, kl_to_base: the reference passes are short next to the
sampling) and writes the same outputs as one process. Samples are seeded per prompt (seed, prompt index, sample
number), so the results do not depend on the number of processes. With `rollout.engine: vllm` the engine loads
each model directory itself (`rollout.tensor_parallel_size` accelerators per engine) and no process but rank 0
loads a Hugging Face copy, rank 0 only for the teacher-forced passes: `teacher_forced: false` skips them, for a
model no single accelerator holds.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from components import tracking
from components.config import stage_main
from components.datasets import DataError, RowError, check_bad_fraction, prompt_row, read_jsonl, sft_row, write_jsonl
from components.evaluate.stats import (
    BOOTSTRAP_SAMPLES,
    avg_at_n,
    bootstrap_ci,
    paired_bootstrap_ci,
    pass_at_k_per_prompt,
)
from components.models import ModelLoading
from components.tasks import SPLITS, TASKS, get_task
from components.training.batching import Example, encode_example, micro_batches
from components.training.engines import RolloutEngine
from components.training.parallel import SamplingWorld, init_sampling

log = logging.getLogger("components.evaluate")

HELDOUT = "heldout"
RESERVED_NAMES = (HELDOUT, "baselines", "differences")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SUITE_KEYS = {"task": ("name", "task", "split", "n_prompts", "seed"), "data": ("name", "data", "task", "split")}
TEACHER_FORCED = ("entropy", "kl_to_base")


# ----------------------------------------------------------------------------------------------------
# Config

def normalize_suite(suite: dict, where: str, default_seed: int) -> dict:
    """A suite in full form: {"name", "task", "split", "n_prompts", "seed"} or {"name", "data", "task"?, "split"?}."""
    if not isinstance(suite, dict):
        raise ValueError(f"{where}={suite!r} is invalid: a mapping with 'task' or 'data'")
    kind = "data" if "data" in suite else "task"
    unknown = sorted(set(suite) - set(SUITE_KEYS[kind]))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for a {kind} suite; "
                         f"allowed: {', '.join(SUITE_KEYS[kind])}")
    task, split = suite.get("task"), suite.get("split", "id" if kind == "task" else None)
    if kind == "task" and task is None:
        raise ValueError(f"{where}: a suite needs 'task' (one of {', '.join(sorted(TASKS))}) or 'data' (a JSONL path)")
    if task is not None and task not in TASKS:
        raise ValueError(f"{where}.task={task!r} is invalid: one of {', '.join(sorted(TASKS))}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}.split={split!r} is invalid: one of {', '.join(SPLITS)}")
    name = suite.get("name", f"{task}-{split}" if kind == "task" else None)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(f"{where}.name={name!r} is invalid: letters, digits, '_', '.', '-' (a data suite must "
                         f"name itself), not one of {', '.join(RESERVED_NAMES)}")
    if kind == "data":
        if not isinstance(suite["data"], str) or not suite["data"]:
            raise ValueError(f"{where}.data={suite['data']!r} is invalid: a JSONL path or s3:// URI")
        return {"name": name, "data": suite["data"], "task": task, "split": split}
    n_prompts, seed = suite.get("n_prompts", 200), suite.get("seed", default_seed)
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts < 1:
        raise ValueError(f"{where}.n_prompts={n_prompts!r} is invalid: a positive integer")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{where}.seed={seed!r} is invalid: an integer")
    return {"name": name, "task": task, "split": split, "n_prompts": n_prompts, "seed": seed}


def default_reward_specs(suites: list[dict]) -> list[dict]:
    """The verifier of every task the suites name: the rewards reported when the config lists none."""
    return [{"name": t} for t in sorted({s["task"] for s in suites if s.get("task")})]


@dataclass(kw_only=True)
class EvaluateConfig:
    """An evaluation: which models, on which prompts, sampled how, and where the results go."""

    model: str
    """Candidate model: a Hugging Face directory (safetensors) or s3:// URI."""
    output_dir: str
    """Where eval.json, metrics.json, samples.jsonl and report.html go."""
    suites: list[dict]
    """Eval suites: {task, split (id|ood), n_prompts, seed, name?} (name defaults to <task>-<split>) or
    {name, data: JSONL of {prompt, answer, task?, split?} rows, task?: verifier for rows without one, split?}."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the models are loaded (components/README.md)."""
    rollout: RolloutEngine = field(default_factory=RolloutEngine)
    """The rollout engine that samples every model: hf or vllm (components/README.md)."""
    name: str = "candidate"
    """The candidate's name in the report (e.g. the stage that produced it)."""
    baselines: dict[str, str] = field(default_factory=dict)
    """Models to compare with, by name (e.g. base, the previous stage, champion): the same prompts and seeds."""
    parents: dict[str, str] = field(default_factory=dict)
    """Each trained model → the model it started from (names of the candidate or baselines, e.g. {psft: base,
    dpo: psft, grpo: dpo}): each one's effect on accuracy is measured against its parent and against the first
    ancestor (the base model)."""
    base_model: str | None = None
    """The base model that kl_to_base is measured against (it may also be a baseline); unset: no KL."""
    samples: int = 1
    """Completions per prompt (n of avg@n and pass@k); more than one needs a temperature > 0."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 32
    """Longest completion in tokens."""
    k: list[int] = field(default_factory=lambda: [1])
    """The k of each pass@k reported (each ≤ samples)."""
    rewards: list[dict] | None = None
    """Reward specs (components.rewards); default: the verifier of each task the suites name."""
    heldout_text: str | None = None
    """SFT JSONL ({prompt, completion} or {messages}): entropy and kl_to_base teacher-forced on its completions."""
    max_length: int = 1024
    """Longest teacher-forced sequence in tokens; longer held-out rows are truncated."""
    seed: int = 0
    """Seed of the sampling (the same for every model) and of the bootstrap; the default seed of task suites."""
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    """Bootstrap resamples per interval."""
    batch_size: int = 64
    """Sequences decoded together."""
    token_budget: int = 4096
    """Most tokens in one teacher-forced micro-batch."""
    training_metrics: dict[str, str] = field(default_factory=dict)
    """metrics.jsonl of earlier stages by stage name, for the report's entropy and reward curves."""
    teacher_forced: bool = True
    """Measure entropy and kl_to_base teacher-forced on reference completions, with a Hugging Face copy of each
    model (and of base_model) on rank 0's accelerator. false: neither is measured, and with rollout.engine vllm no
    process loads a Hugging Face copy (a model larger than one accelerator, sampled tensor-parallel)."""

    def __post_init__(self):
        def bad(key, allowed):
            raise ValueError(f"{key}={getattr(self, key)!r} is invalid: {allowed}")
        for key in ("samples", "max_new_tokens", "max_length", "bootstrap_samples", "batch_size", "token_budget"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, "a positive integer")
        if self.temperature < 0:
            bad("temperature", "a number ≥ 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if self.temperature == 0 and self.samples > 1:
            bad("samples", "1 with temperature 0 (greedy samples are all the same); set a temperature > 0")
        if not self.k or any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.samples
                             for k in self.k):
            bad("k", f"a non-empty list of integers in [1, samples={self.samples}]")
        self.k = sorted(set(self.k))
        names = [self.name, *self.baselines]
        for n in names:
            if not isinstance(n, str) or not _NAME.fullmatch(n) or n in RESERVED_NAMES:
                raise ValueError(f"model name {n!r} is invalid: letters, digits, '_', '.', '-', "
                                 f"not one of {', '.join(RESERVED_NAMES)}")
        if self.name in self.baselines:
            bad("name", f"a name that is not also a baseline ({', '.join(self.baselines)})")
        if not isinstance(self.parents, dict) or any(n not in names for kv in self.parents.items() for n in kv):
            bad("parents", f"a mapping between model names among {', '.join(names)}")
        for n in self.parents:
            if self.lineage(n)[-1] in self.parents:  # the walk stopped at a repeat, not at a root
                bad("parents", f"a mapping without a cycle (through {n})")
        if not isinstance(self.suites, list) or not self.suites:
            bad("suites", "a non-empty list of suites")
        self.suites = [normalize_suite(s, f"suites[{i}]", self.seed) for i, s in enumerate(self.suites)]
        seen = [s["name"] for s in self.suites]
        if len(set(seen)) != len(seen):
            bad("suites", f"suites with distinct names (got {', '.join(seen)})")
        if self.rewards is not None and not all(isinstance(r, dict) for r in self.rewards):
            bad("rewards", "a list of reward specs (mappings with a 'name')")
        if not isinstance(self.teacher_forced, bool):
            bad("teacher_forced", "true or false")
        if self.heldout_text is not None and not self.teacher_forced:
            bad("heldout_text", "unset with teacher_forced false (held-out text is only measured teacher-forced)")

    def lineage(self, name: str) -> list[str]:
        """`name`, its parent, its parent's parent, ... up to a model without one (a cycle stops at a repeat)."""
        out = [name]
        while out[-1] in self.parents and self.parents[out[-1]] not in out:
            out.append(self.parents[out[-1]])
        return out

    def reward_specs(self) -> list[dict]:
        return self.rewards if self.rewards is not None else default_reward_specs(self.suites)

    def metric_names(self, reward_names: list[str]) -> set[str]:
        """Every `<suite>/<metric>` this evaluation writes for a model (reward_names: RewardSet.names)."""
        return metric_names(self.suites, self.k, reward_names, kl_to_base=self.base_model is not None,
                            heldout=self.heldout_text is not None, teacher_forced=self.teacher_forced)

    @property
    def needs_teacher(self) -> bool:
        """Some suite (a task's, with reference completions) or the held-out text is measured teacher-forced."""
        return self.teacher_forced and (self.heldout_text is not None or any("data" not in s for s in self.suites))



def per_prompt_metric_names(k_list: list[int], reward_names: list[str]) -> list[str]:
    """The metrics with one value per prompt: they get bootstrap intervals and paired differences."""
    return ["accuracy", *(f"pass@{k}" for k in sorted(set(k_list))), *(f"reward/{r}" for r in reward_names),
            "length"]


def metric_names(suites: list[dict], k_list: list[int], reward_names: list[str], *, kl_to_base: bool = False,
                 heldout: bool = False, teacher_forced: bool = True) -> set[str]:
    """Every metric name eval.json carries for a model, so a promotion rule can be checked before a run.

    suites: as in the evaluate config (short or full form); k_list: the pass@k k's; reward_names: the names of
    the reward functions (RewardSet.names); kl_to_base: a base model is set; heldout: heldout_text is set;
    teacher_forced: the evaluation's `teacher_forced`. Task suites add teacher-forced `entropy` (and
    `kl_to_base`); data suites carry no reference completions.
    """
    teacher = ["entropy", *(["kl_to_base"] if kl_to_base else [])] if teacher_forced else []
    names = set()
    for i, raw in enumerate(suites):
        s = normalize_suite(raw, f"suites[{i}]", 0)
        for m in per_prompt_metric_names(k_list, reward_names):
            names |= {f"{s['name']}/{m}", f"{s['name']}/{m}_ci_low", f"{s['name']}/{m}_ci_high"}
        if "data" not in s:
            names |= {f"{s['name']}/{m}" for m in teacher}
    if heldout:
        names |= {f"{HELDOUT}/{m}" for m in teacher}
    return names


# ----------------------------------------------------------------------------------------------------
# Inputs: suites' rows and held-out text, checked before any model is loaded

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


def load_heldout_rows(uri: str) -> list[dict]:
    """{prompt, completion} rows of an SFT JSONL file; a bad row is an error naming file, line and field."""
    from components.storage import localize

    path = localize(uri)
    parsed = [raw if isinstance(raw, RowError) else sft_row(raw, str(path), line) for line, raw in read_jsonl(path)]
    check_bad_fraction([r for r in parsed if isinstance(r, RowError)], len(parsed), 0.0, f"heldout_text: {path}")
    if not parsed:
        raise DataError(f"heldout_text: {path}: no rows")
    return parsed


# ----------------------------------------------------------------------------------------------------
# Measurements of one model

@torch.no_grad()
def teacher_forced(model, examples: list[Example], pad_id: int, *, base=None, token_budget: int = 4096,
                   chunk_size: int = 2048) -> dict[str, float]:
    """Token-mean entropy of π and KL(π ‖ π_base) (exact, over the vocabulary) on the completions of `examples`.

    Only completion positions go through the heads, `chunk_size` tokens at a time, so no [tokens, vocab]
    array of the whole batch is ever held.
    """
    device = next(model.parameters()).device
    autocast = device.type == "cuda"
    sums, tokens = {"entropy": 0.0, "kl_to_base": 0.0}, 0
    for mb in micro_batches(examples, token_budget, pad_id):
        mb = mb.to(device)
        keep = mb.loss_mask.reshape(-1) > 0

        def hidden(m):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                h = m.base_model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False)
            return h.last_hidden_state.reshape(-1, h.last_hidden_state.shape[-1])[keep]

        h, hb = hidden(model), hidden(base) if base is not None else None
        for s in range(0, h.shape[0], chunk_size):
            logp = torch.log_softmax(model.get_output_embeddings()(h[s:s + chunk_size]).float(), dim=-1)
            p = logp.exp()
            sums["entropy"] -= float((p * logp).sum())
            if hb is not None:
                logq = torch.log_softmax(base.get_output_embeddings()(hb[s:s + chunk_size]).float(), dim=-1)
                sums["kl_to_base"] += float((p * (logp - logq)).sum())
        tokens += int(keep.sum())
    wanted = TEACHER_FORCED if base is not None else ("entropy",)
    return {k: sums[k] / max(tokens, 1) for k in wanted}


def encode_references(tokenizer, rows: list[dict], max_length: int) -> list[Example]:
    """Reference completions as Examples, cut to `max_length` tokens (a prompt that fills it is left out)."""
    examples = [encode_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return [Example(e.input_ids[:max_length], e.completion_start) for e in examples if e.completion_start < max_length]


@dataclass
class SuiteRun:
    """One model on one suite: per-prompt values, teacher-forced means and every sample."""
    per_prompt: dict[str, np.ndarray]
    teacher: dict[str, float]
    samples: list[dict]


def sample_and_score(engine, rows: list[dict], cfg: EvaluateConfig, rewards,
                     shard: range | None = None) -> tuple[dict, list[dict]] | None:
    """Sample cfg.samples completions per row of `shard` (default: every row) through the rollout engine, each
    prompt's samples seeded by its index in `rows`; verify and score them. Per-prompt values and the samples, in
    row order; None for an empty shard."""
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


def evaluate_model(engine, model, tokenizer, suites: list[dict], rows: dict[str, list[dict]],
                   heldout: list[dict] | None, cfg: EvaluateConfig, rewards, base=None,
                   world: SamplingWorld | None = None) -> dict[str, SuiteRun] | None:
    """Every suite for one model (and the held-out text, when given); `engine` samples from the model.

    Each data-parallel group of `world` samples its shard of every suite; rank 0 gets the runs, in prompt order,
    and measures the teacher-forced quantities with `model` (None when cfg.teacher_forced is off); the other
    ranks get None."""
    world = world or SamplingWorld()
    scored = {}
    for suite in suites:
        name = suite["name"]
        shard = world.shard(len(rows[name]))
        log.info("%s: %d of %d prompts × %d samples", name, len(shard), len(rows[name]), cfg.samples)
        scored[name] = sample_and_score(engine, rows[name], cfg, rewards, shard)
    parts = world.gather(scored)
    if parts is None:
        return None
    runs = {}
    for suite in suites:
        name = suite["name"]
        per_prompt, samples = merge_scored([part[name] for part in parts])
        refs = [r for r in rows[name] if "completion" in r] if "data" not in suite and cfg.teacher_forced else []
        teacher = teacher_forced(model, encode_references(tokenizer, refs, cfg.max_length), tokenizer.pad_token_id,
                                 base=base, token_budget=cfg.token_budget) if refs else {}
        runs[name] = SuiteRun(per_prompt, teacher, samples)
    if heldout is not None:
        teacher = teacher_forced(model, encode_references(tokenizer, heldout, cfg.max_length), tokenizer.pad_token_id,
                                 base=base, token_budget=cfg.token_budget)
        runs[HELDOUT] = SuiteRun({}, teacher, [])
    return runs


# ----------------------------------------------------------------------------------------------------
# Results: flat metrics, intervals, paired differences

def flat_metrics(runs: dict[str, SuiteRun], cfg: EvaluateConfig) -> dict[str, float]:
    """`<suite>/<metric>` means, `_ci_low`/`_ci_high` for per-prompt metrics, teacher-forced means."""
    out = {}
    for suite, run in runs.items():
        for m, values in run.per_prompt.items():
            low, high = bootstrap_ci(values, n_resamples=cfg.bootstrap_samples, seed=cfg.seed)
            out |= {f"{suite}/{m}": float(values.mean()), f"{suite}/{m}_ci_low": low, f"{suite}/{m}_ci_high": high}
        out |= {f"{suite}/{m}": v for m, v in run.teacher.items()}
    return out


def differences(cand: dict[str, SuiteRun], base: dict[str, SuiteRun], cfg: EvaluateConfig) -> dict[str, dict]:
    """Candidate − baseline for each per-prompt metric, with its paired bootstrap interval."""
    out = {}
    for suite, run in cand.items():
        for m, values in run.per_prompt.items():
            diff, low, high = paired_bootstrap_ci(values, base[suite].per_prompt[m],
                                                  n_resamples=cfg.bootstrap_samples, seed=cfg.seed)
            out[f"{suite}/{m}"] = {"diff": diff, "ci_low": low, "ci_high": high}
    return out


def verdict(low: float, high: float) -> str:
    """A change is `better` or `worse` when its whole 95% interval lies on one side of 0, else `within noise`."""
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def effects(cfg: EvaluateConfig, runs: dict[str, dict[str, SuiteRun]]) -> list[dict]:
    """What each model of `cfg.parents` changed: its accuracy minus that of the model it started from
    (`previous`) and of its first ancestor (`base`), per suite, with the paired bootstrap interval and a verdict."""
    out = []
    for name, parent in cfg.parents.items():
        for against, ref in (("previous", parent), ("base", cfg.lineage(name)[-1])):
            for suite, run in runs[name].items():
                if "accuracy" not in run.per_prompt:
                    continue
                diff, low, high = paired_bootstrap_ci(run.per_prompt["accuracy"],
                                                      runs[ref][suite].per_prompt["accuracy"],
                                                      n_resamples=cfg.bootstrap_samples, seed=cfg.seed)
                out.append({"stage": name, "against": against, "reference": ref, "suite": suite, "metric": "accuracy",
                            "diff": diff, "ci_low": low, "ci_high": high, "verdict": verdict(low, high)})
    return out


def eval_document(cfg: EvaluateConfig, runs: dict[str, dict[str, SuiteRun]], rows: dict[str, list[dict]]) -> dict:
    """eval.json: the candidate's flat metrics, each baseline's, the paired differences and suite details."""
    suites = {s["name"]: {**s, "n_prompts": len(rows[s["name"]]), "samples": cfg.samples,
                          "temperature": cfg.temperature,
                          "examples": {m: r[s["name"]].samples[:3] for m, r in runs.items()}}
              for s in cfg.suites}
    if cfg.heldout_text is not None:
        suites[HELDOUT] = {"name": HELDOUT, "data": cfg.heldout_text, "teacher_forced": True}
    return {"candidate": cfg.name,
            "metrics": flat_metrics(runs[cfg.name], cfg),
            "baselines": {b: flat_metrics(runs[b], cfg) for b in cfg.baselines},
            "differences": {b: differences(runs[cfg.name], runs[b], cfg) for b in cfg.baselines},
            "effects": effects(cfg, runs),
            "suites": suites,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("suites",)}}


def mlflow_metric_name(name: str) -> str:
    """MLflow allows letters, digits and `_-. :/` in a metric name: `pass@k` is logged there as `pass_at_k`."""
    return name.replace("@", "_at_")


def kfp_metrics(doc: dict) -> dict[str, float]:
    """One flat mapping for KFP Metrics: the candidate's metrics, then baselines/<b>/… and differences/<b>/…."""
    out = dict(doc["metrics"])
    for b, metrics in doc["baselines"].items():
        out |= {f"baselines/{b}/{k}": v for k, v in metrics.items()}
    for b, diffs in doc["differences"].items():
        out |= {f"differences/{b}/{k}": d["diff"] for k, d in diffs.items()}
    return out


# ----------------------------------------------------------------------------------------------------
# The stage

def run(cfg: EvaluateConfig) -> dict:
    with init_sampling(cfg.rollout.tensor_parallel_size) as world:
        return _run(cfg, world)


def _run(cfg: EvaluateConfig, world: SamplingWorld) -> dict:
    from components.evaluate.report import StageResult, write_report
    from components.rewards import build_rewards
    from components.storage import localize

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every input is read and checked before a model is loaded
    rows = {s["name"]: load_suite_rows(s) for s in cfg.suites}
    heldout = load_heldout_rows(cfg.heldout_text) if cfg.heldout_text else None
    rewards = build_rewards(cfg.reward_specs(), where="rewards")
    models = {cfg.name: cfg.model, **cfg.baselines}
    paths = {name: localize(uri) for name, uri in models.items()}
    training_metrics = {stage: localize(uri) for stage, uri in cfg.training_metrics.items()}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vllm = cfg.rollout.engine == "vllm"
    teacher = cfg.needs_teacher and world.writes  # the teacher-forced passes run on rank 0
    base = base_path = base_vocab = None
    if cfg.base_model is not None and teacher:
        base_path = localize(cfg.base_model).resolve()
        base = cfg.loading.load_model(base_path, device=device).eval()
        base_vocab = cfg.loading.load_tokenizer(base_path).get_vocab()

    with tracking.stage_run("evaluate", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI, and off rank 0
        runs = {}
        engine = None  # one rollout engine for every model: built on the first, then given each one's weights
        try:
            for name, path in paths.items():
                log.info("evaluating %s (%s)", name, models[name])
                tokenizer = cfg.loading.load_tokenizer(path)
                if base_vocab is not None and tokenizer.get_vocab() != base_vocab:
                    raise ValueError(f"{name} ({models[name]}) and base_model ({cfg.base_model}) have different "
                                     "vocabularies: kl_to_base needs the same tokenizer")
                model = None  # a Hugging Face copy: what the hf engine samples with, and the teacher-forced passes
                if not vllm or teacher:
                    model = base if path.resolve() == base_path else cfg.loading.load_model(path, device=device).eval()
                if vllm:  # the engine loads each model directory itself (its share, with tensor parallelism)
                    if engine is None:
                        engine = cfg.rollout.build_from(path, tokenizer, seed=cfg.seed, max_num_seqs=cfg.batch_size,
                                                        world_size=world.world)
                    else:
                        engine.load(path, tokenizer)
                elif engine is None:
                    engine = cfg.rollout.build(model, tokenizer, seed=cfg.seed, max_num_seqs=cfg.batch_size)
                else:
                    engine.sync(model, tokenizer)
                runs[name] = evaluate_model(engine, model, tokenizer, cfg.suites, rows, heldout, cfg, rewards, base,
                                            world)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            if engine is not None:
                engine.close()
        if not world.writes:
            return {}
        doc = eval_document(cfg, runs, rows)
        flat = kfp_metrics(doc)
        (out / "eval.json").write_text(json.dumps(doc, indent=2))
        (out / "metrics.json").write_text(json.dumps(flat, indent=2))
        write_jsonl(out / "samples.jsonl", ({"model": m, "suite": s, **sample} for m, r in runs.items()
                                            for s, run_ in r.items() for sample in run_.samples))
        stages = [StageResult(name=cfg.name, eval=doc, metrics=training_metrics.get(cfg.name))]
        stages += [StageResult(name=stage, metrics=path) for stage, path in training_metrics.items()
                   if stage != cfg.name]
        report = write_report(stages, out / "report.html", title=f"Evaluation of {cfg.name}")
        tracked.log_metrics({mlflow_metric_name(k): v for k, v in flat.items()}, step=0)
        for name in ("eval.json", "report.html"):
            tracked.log_artifact(out / name)
    log.info("wrote %s, %s and %s", out / "eval.json", out / "metrics.json", report)
    return {"metrics": doc["metrics"], "eval": str(out / "eval.json"), "report": str(report)}


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, EvaluateConfig, run, argv)


if __name__ == "__main__":
    main()
