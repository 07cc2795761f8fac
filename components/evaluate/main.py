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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from components import threads, tracking
from components.config import stage_main
from components.datasets import DataError, RowError, check_bad_fraction, read_jsonl, sft_row, write_jsonl
from components.evaluate.config import HELDOUT, TEACHER_FORCED, EvaluateConfig
from components.evaluation.scoring import (
    encode_references,
    load_suite_rows,
    merge_scored,
    mlflow_metric_name,
    sample_and_score,
)
from components.evaluation.stats import bootstrap_ci, paired_bootstrap_ci
from components.models import check_model_dir
from components.training.batching import Example, micro_batches
from components.training.parallel import SamplingWorld, init_sampling

log = logging.getLogger("components.evaluate")


# ----------------------------------------------------------------------------------------------------
# Inputs: suites' rows and held-out text, checked before any model is loaded

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


@dataclass
class SuiteRun:
    """One model on one suite: per-prompt values, teacher-forced means and every sample."""
    per_prompt: dict[str, np.ndarray]
    teacher: dict[str, float]
    samples: list[dict]


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
    from components.evaluate.report import write_evaluation_report
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
                    threads.for_sampling(model, device.type)
                if vllm:  # the engine loads each model directory itself (its share, with tensor parallelism)
                    check_model_dir(path)
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
        report = write_evaluation_report(cfg.name, doc, training_metrics, out / "report.html", run_name=cfg.run_name,
                                         parents=cfg.parents)
        tracked.log_metrics({mlflow_metric_name(k): v for k, v in flat.items()}, step=0)
        for name in ("eval.json", "report.html"):
            tracked.log_artifact(out / name)
    log.info("wrote %s, %s and %s", out / "eval.json", out / "metrics.json", report)
    return {"metrics": doc["metrics"], "eval": str(out / "eval.json"), "report": str(report)}


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, EvaluateConfig, run, argv)


if __name__ == "__main__":
    main()
