"""The SFT vs PSFT demo: one task, one tiny model, the same data and budget for both objectives.

Runs on a laptop CPU in minutes: build the tiny model (or copy `base_model`), generate the task's training rows, run
the SFT stage twice (method sft, method psft) through the same entrypoint a pipeline step calls, and evaluate the base
model and both results on held-out in-domain and out-of-domain prompts: greedy accuracy and mean token
entropy. Prints a table and writes demo_summary.json in the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from components.config import from_mapping, merge
from components.datasets import write_jsonl
from components.models import build_tiny_model, check_model_dir
from components.sft.main import SFTConfig
from components.sft.main import run as run_sft
from components.tasks import get_task
from components.training.loop import TrainConfig
from components.yamlread import read_yaml

DEMO_SPEC = Path(__file__).parent / "specs" / "sft-psft-demo.yaml"


def evaluate_all(out: Path, models: dict[str, Path], spec: dict) -> dict[str, dict]:
    """One run of the evaluate stage: the last model as the candidate, the others as baselines, on the same
    prompts; writes out/eval/{eval.json, report.html} and returns {model: {"id"|"ood": {accuracy, ...}}}."""
    from components.evaluate.main import EvaluateConfig
    from components.evaluate.main import run as run_evaluate

    *others, last = models
    suites = [{"task": spec["task"], "split": split, "n_prompts": spec["eval_prompts"], "seed": spec["seed"] + 1}
              for split in ("id", "ood")]
    cfg = from_mapping(EvaluateConfig, {
        "model": str(models[last]), "name": last, "baselines": {n: str(models[n]) for n in others},
        "output_dir": str(out / "eval"), "suites": suites, "max_new_tokens": spec["max_new_tokens"],
        "seed": spec["seed"] + 1,
        "training_metrics": {n: str(out / n / "metrics.jsonl") for n in models
                             if (out / n / "metrics.jsonl").exists()}})
    run_evaluate(cfg)
    doc = json.loads((out / "eval" / "eval.json").read_text())
    per_model = {last: doc["metrics"], **doc["baselines"]}
    return {name: {split: {"accuracy": m[f"{spec['task']}-{split}/accuracy"],
                           "accuracy_ci": [m[f"{spec['task']}-{split}/accuracy_ci_low"],
                                           m[f"{spec['task']}-{split}/accuracy_ci_high"]],
                           "entropy": m[f"{spec['task']}-{split}/entropy"], "n": spec["eval_prompts"]}
                   for split in ("id", "ood")} for name, m in per_model.items()}


STAGES = ("sft", "psft", "dpo", "grpo")
SPEC_KEYS = ("task", "seed", "base_model", "train_rows", "eval_prompts", "max_new_tokens", "train", "sft", "psft",
             "reward_scoring", "dpo", "grpo")


def load_demo_spec(spec_path: str | Path, out: str | Path, overrides: dict | None = None) -> dict:
    """The demo settings with `overrides` applied, checked: the top-level keys (each stage's keys are checked
    by its config when it runs) and `base_model`, which must be a model directory outside `out`."""
    spec = read_yaml(spec_path)  # bounded, and every error one line naming the file
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_path}: a mapping of demo settings expected, got {type(spec).__name__}")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in spec:
        if key not in SPEC_KEYS:
            hint = " (a training setting: put it under `train:`)" if key in train_keys else ""
            raise ValueError(f"{spec_path}: unknown key {key!r}{hint}; allowed: {', '.join(SPEC_KEYS)}")
    for key in ("train", "sft", "psft", "reward_scoring", "dpo", "grpo"):
        if not isinstance(spec.get(key, {}), dict):
            raise ValueError(f"{spec_path}: {key}: a mapping of that stage's settings expected")
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = merge(spec[k], v)  # e.g. {"grpo": {"train": {"max_steps": 10}}}
        else:
            (spec["train"] if k in train_keys else spec)[k] = v
    if spec.get("base_model"):
        given, out = check_model_dir(spec["base_model"]).resolve(), Path(out).resolve()
        if given == out or out in given.parents:  # the runs write there: the model would be replaced
            raise ValueError(f"{spec_path}: base_model {spec['base_model']} is inside the output directory {out}; "
                             "copy it elsewhere or choose another --out")
    return spec


def run_demo(out: str | Path, spec_path: str | Path = DEMO_SPEC, overrides: dict | None = None,
             stages: tuple[str, ...] = ("sft", "psft")) -> dict:
    """Train and evaluate the demo's `stages`; dpo and grpo start from the SFT model (trained here, or
    reused from an earlier run in the same output directory)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown demo stages {unknown}: choose from {', '.join(STAGES)}")
    spec = load_demo_spec(spec_path, out, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(spec["task"])
    base = out / "base"
    if spec.get("base_model"):  # a copy in the output, like the built one
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(spec["base_model"], base)
    else:
        build_tiny_model(base, seed=spec["seed"])
    data = out / "data" / "train.jsonl"
    write_jsonl(data, task.generate(spec["train_rows"], seed=spec["seed"], split="id", part="train"))

    models = {"base": base}

    def timed(name: str, fn, model_dir: Path) -> None:
        t0 = time.perf_counter()
        summary = fn()
        results[name] = {"train_seconds": time.perf_counter() - t0, "final": summary.get("final")}
        models[name] = model_dir

    results = {"base": {}}
    for name in ("sft", "psft"):
        if name not in stages:
            continue
        settings = merge({"train": {**spec["train"], "seed": spec["seed"]}}, spec[name])
        cfg = from_mapping(SFTConfig, {**settings, "model": str(base), "train_data": str(data),
                                       "output_dir": str(out / name)}, f"{spec_path}:{name}")
        timed(name, lambda: run_sft(cfg), out / name / "model")
    start = out / "sft" / "model"
    if ("dpo" in stages or "grpo" in stages) and "sft" not in results:
        if not (start / "config.json").exists():
            raise ValueError(f"dpo and grpo start from the SFT model: add sft to the stages (no {start} yet)")
        results["sft"] = {}
        models["sft"] = start
    for name in ("dpo", "grpo"):
        if name in stages:
            timed(name, lambda name=name: run_from_sft(name, spec, spec_path, out, start), out / name / "model")
    for name, ev in evaluate_all(out, models, spec).items():
        results[name]["eval"] = ev
    (out / "demo_summary.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"report: {out / 'eval' / 'report.html'}")
    return results


def run_from_sft(name: str, spec: dict, spec_path, out: Path, start: Path) -> dict:
    """DPO (on pairs reward_scoring samples from the SFT model) or GRPO, starting from the SFT model."""
    if name == "dpo":
        from components.dpo.main import DPOConfig
        from components.dpo.main import run as run_dpo
        from components.reward_scoring.main import RewardScoringConfig
        from components.reward_scoring.main import run as run_scoring

        run_scoring(from_mapping(RewardScoringConfig, merge(spec["reward_scoring"], {
            "model": str(start), "prompts": {"task": spec["task"]}, "output_dir": str(out / "scoring"),
            "seed": spec["seed"]}), f"{spec_path}:reward_scoring"))
        return run_dpo(from_mapping(DPOConfig, merge(spec["dpo"], {
            "model": str(start), "train": {"seed": spec["seed"]}, "train_data": str(out / "scoring" / "pairs.jsonl"),
            "output_dir": str(out / "dpo")}), f"{spec_path}:dpo"))
    from components.grpo.main import GRPOConfig
    from components.grpo.main import run as run_grpo

    return run_grpo(from_mapping(GRPOConfig, merge(spec["grpo"], {
        "model": str(start), "prompts": {"task": spec["task"]}, "output_dir": str(out / "grpo"),
        "train": {"seed": spec["seed"]}}), f"{spec_path}:grpo"))


def format_table(results: dict) -> str:
    rows = [f"{'model':<6} {'train s':>8} {'id acc':>7} {'ood acc':>8} {'id entropy':>11} {'ood entropy':>12}"]
    for name, r in results.items():
        ev = r["eval"]
        secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"
        rows.append(f"{name:<6} {secs:>8} {ev['id']['accuracy']:>7.1%} {ev['ood']['accuracy']:>8.1%} "
                    f"{ev['id']['entropy']:>11.3f} {ev['ood']['entropy']:>12.3f}")
    return "\n".join(rows)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    run_demo(Path(".posttrain/demo"))
