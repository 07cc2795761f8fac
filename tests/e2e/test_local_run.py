"""The whole DAG on this machine (kfp.local, MLflow in a sqlite file): what `posttrain run demo` does.

- A run whose data are missing stops at preflight, before any training, and the exit handler still closes the
  pipeline's MLflow run, as failed.
- A shortened demo runs every stage for real (data_prep → psft → reward_scoring → dpo → grpo → evaluate →
  register → the promotion gate) and writes run_summary.json.
"""

import copy
import json
from pathlib import Path

import yaml
from mlflow import MlflowClient

from components.promotion import CHAMPION, alias_version
from pipelines.local import run_local
from pipelines.spec import SPECS_DIR, parse_spec


def parent_runs(summary: dict, experiment: str):
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], "tags.`posttrain.role` = 'pipeline'")


def test_missing_data_stops_at_preflight_and_the_mlflow_run_is_closed(tmp_path):
    spec = parse_spec({
        "name": "broken", "base_model": "bundled:tiny",
        "data": {"sources": [{"uri": str(tmp_path / "nowhere" / "sft.jsonl"), "shape": "sft"}]},
        "stages": [{"stage": "psft", "settings": {"train": {"max_steps": 2}}}],
    }, "broken.yaml")
    summary = run_local(spec, tmp_path / "out", state=tmp_path / "state")

    assert summary["status"] == "failed" and summary["error"].startswith("preflight failed: PreflightError: ")
    assert "nowhere/sft.jsonl" in summary["error"]  # the step's own reason, not only "a task failed"
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["status"] == "failed"
    assert summary["stages"] == {}  # no stage ran
    report = (tmp_path / "state" / "runs").glob("broken-*/preflight/report")
    text = next(report).read_text()
    assert "❌ failed | data: " in text and "nowhere/sft.jsonl | DataError: no such file or directory" in text
    assert "✅ ok | model |" in text and "✅ ok | mlflow |" in text
    assert "⏭️ skipped | s3 | no S3 endpoint" in text
    assert "⏭️ skipped | secret posttrain-minio | not in a Kubernetes pod" in text
    client, runs = parent_runs(summary, "broken")
    (parent,) = runs
    assert parent.info.status == "FAILED"  # closed by the exit handler
    assert parent.data.tags["posttrain.final_state"] == "FAILED" and parent.data.tags["posttrain.spec"] == "broken"


def test_short_demo_runs_every_stage(tmp_path):
    data = yaml.safe_load((SPECS_DIR / "demo.yaml").read_text())
    data = copy.deepcopy(data)
    data["data"]["sources"][0]["rows"] = 2000
    data["data"]["sources"][1]["rows"] = 64
    for suite in data["eval_suites"]:
        suite["n_prompts"] = 20
    spec = parse_spec(data, "demo.yaml (shortened)")
    summary = run_local(spec, tmp_path / "out", state=tmp_path / "state",
                        arguments={"psft_max_steps": 40, "dpo_max_steps": 4, "grpo_max_steps": 4})

    assert summary["status"] == "succeeded", summary["error"]
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text()) == summary
    # every step (kfp.local's real `sh -ec` command) was forked from the step server: none ran on its own
    assert "step server:" not in (tmp_path / "out" / "run.log").read_text()
    stages = summary["stages"]
    assert list(stages) == ["base", "psft", "reward_scoring", "dpo", "grpo"]
    assert stages["psft"]["metrics"]["steps"] == 40 and stages["dpo"]["metrics"]["steps"] == 4
    for name in ("base", "psft", "dpo", "grpo"):
        for suite, split in (("arithmetic-id", "id"), ("arithmetic-ood", "ood")):
            ev = stages[name]["eval"][suite]
            assert ev["split"] == split, (name, suite)
            assert ev["accuracy_ci_low"] <= ev["accuracy"] <= ev["accuracy_ci_high"], (name, suite, ev)
    for name in ("psft", "dpo", "grpo"):  # the base model is the tiny model at initialization, nearly uniform
        assert stages[name]["eval"]["arithmetic-id"]["entropy"] < stages["base"]["eval"]["arithmetic-id"]["entropy"]
    assert summary["registered"]["name"] == "posttrain-demo" and summary["registered"]["version"] == "1"

    # The gate's decision is the spec's rule applied to the reported numbers, whatever 40 PSFT steps learned: with
    # no champion yet, grpo (the last stage, the candidate) against the base model.
    rule, promo = spec.promotion, summary["promotion"]
    cand, base = stages["grpo"]["eval"], stages["base"]["eval"]

    def gain(metric: str, direction: str) -> float:
        suite, name = metric.split("/")
        return (cand[suite][name] - base[suite][name]) * (1 if direction == "max" else -1)
    primary = gain(rule.metric, rule.direction)
    holds = primary > 0 and primary >= rule.min_improvement and all(
        -gain(g.metric, g.direction) <= g.max_drop for g in rule.guards)
    suite, metric = rule.metric.split("/")
    assert promo["decision"] == ("promote" if holds else "keep") and promo["promoted"] == holds, (promo, cand, base)
    assert promo["reason"].startswith(f"no champion yet, compared with the base model: {rule.metric} "
                                      f"{cand[suite][metric]:.4g} vs base model {base[suite][metric]:.4g}")
    client, (parent,) = parent_runs(summary, "posttrain-demo")
    assert alias_version(client, "posttrain-demo", CHAMPION) == ("1" if holds else None)  # the gate's doing
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["posttrain.stage"] for c in children} == {"sft", "reward_scoring", "dpo", "grpo", "evaluate",
                                                                   "register"}
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["posttrain.kfp_run_id"] for c in children} == {parent.data.tags["posttrain.kfp_run_id"]}


def test_data_prep_is_reused_while_the_data_are_the_same_and_rerun_when_a_byte_changes(tmp_path):
    """kfp.local's cache (run_local enables it) keys a step by its arguments; preflight's sources_digest (the
    sources' sha256s here, S3 ETags and sizes on a cluster) is one of data_prep's, so the same URIs with other
    bytes miss the cache."""
    source = tmp_path / "data" / "sft.jsonl"
    source.parent.mkdir()
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = parse_spec({
        "name": "cached", "base_model": "bundled:tiny",
        "data": {"max_length": 64, "sources": [{"uri": str(source), "shape": "sft"}]},
        "stages": [{"stage": "sft", "settings": {"max_length": 64, "train": {"max_steps": 1, "batch_size": 4}}}],
    }, "cached.yaml")

    def run() -> tuple[bool, str]:
        summary = run_local(spec, tmp_path / "out", state=tmp_path / "state")
        assert summary["status"] == "succeeded", summary["error"]
        run_dir = Path(summary["run_dir"])
        digest = json.loads((run_dir / "preflight" / "executor_output.json").read_text())
        return (run_dir / "data-prep").is_dir(), digest["parameterValues"]["sources_digest"]

    ran, first = run()
    assert ran and first.startswith("sha256:")
    ran, same = run()
    assert not ran and same == first  # the same bytes: data_prep's outputs are reused
    source.write_text(source.read_text().replace(" 2\"", " 3\"", 1))  # one byte of one row
    ran, changed = run()
    assert ran and changed != first  # the same URI, other bytes: data_prep runs again


def test_a_branching_spec_runs_each_arm_from_its_start_and_measures_each_effect(tmp_path):
    """Two arms from one SFT start (the compare spec's shape): a second sft stage under its own name and a psft
    branch; evaluate waits for both and measures each against the model it started from and against the base."""
    spec = parse_spec({
        "name": "branches", "base_model": "bundled:tiny",
        "data": {"max_length": 64, "sources": [{"task": "arithmetic", "rows": 300, "shape": "sft", "seed": 0}]},
        "stages": [{"stage": "sft", "settings": {"train": {"max_steps": 6, "batch_size": 16, "lr": 0.003}}},
                   {"stage": "sft", "name": "sft_more", "start_from": "sft",
                    "settings": {"train": {"max_steps": 3, "batch_size": 16, "lr": 0.001}}},
                   {"stage": "psft", "start_from": "sft",
                    "settings": {"train": {"max_steps": 3, "batch_size": 16, "lr": 0.001}}},
                   {"stage": "evaluate", "settings": {"max_new_tokens": 4}}],
        "eval_suites": [{"task": "arithmetic", "split": "id", "n_prompts": 10},
                        {"task": "arithmetic", "split": "ood", "n_prompts": 10}]}, "branches")
    summary = run_local(spec, tmp_path / "out", state=tmp_path / "state")

    assert summary["status"] == "succeeded", summary["error"]
    assert list(summary["stages"]) == ["base", "sft", "sft_more", "psft"]
    assert summary["stages"]["sft_more"]["metrics"]["steps"] == 3 and summary["stages"]["sft_more"]["kind"] == "sft"
    effects = {(e["stage"], e["against"], e["suite"]): e["reference"] for e in summary["effects"]}
    assert effects[("sft_more", "previous", "arithmetic-ood")] == effects[("psft", "previous", "arithmetic-id")] \
        == "sft"
    assert effects[("psft", "base", "arithmetic-id")] == "base" and len(effects) == 3 * 2 * 2
    assert (tmp_path / "out" / "report.html").is_file()


def test_a_diverging_stage_fails_the_run_in_one_line_and_nothing_is_registered(tmp_path):
    """`--param dpo_lr=1e30` with teacher-forced evaluation off: the demo's DAG from dpo on (dpo → grpo → evaluate
    → register, its pairs given as data instead of scored from a PSFT model: the failure needs no trained model)
    fails at dpo with the stage's one-line reason (training diverged, naming the step), no later stage runs, and
    no model version is registered."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"})
                             + "\n" for i in range(64)))
    data = copy.deepcopy(yaml.safe_load((SPECS_DIR / "demo.yaml").read_text()))
    prompts = {**data["data"]["sources"][1], "rows": 64}
    data["data"]["sources"] = [{"name": "pairs", "uri": str(pairs), "shape": "preference"}, prompts]
    data["stages"] = [stage for stage in data["stages"] if stage["stage"] not in ("psft", "reward_scoring")]
    for stage in data["stages"]:
        if stage["stage"] == "evaluate":
            stage["settings"] = {**(stage.get("settings") or {}), "teacher_forced": False}
    spec = parse_spec(data, "demo.yaml (diverging dpo)")
    assert [stage.stage for stage in spec.stages] == ["dpo", "grpo", "evaluate", "register"]
    summary = run_local(spec, tmp_path / "out", state=tmp_path / "state",
                        arguments={"dpo_max_steps": 4, "dpo_lr": 1e30})

    assert summary["status"] == "failed", summary
    assert summary["error"].startswith("dpo failed: ") and "training diverged" in summary["error"], summary["error"]
    assert "\n" not in summary["error"] and "Traceback" not in summary["error"]
    assert "grpo" not in summary["stages"] and not summary["stages"]["dpo"]["metrics"], summary["stages"]["dpo"]
    client = MlflowClient(summary["tracking_uri"])
    assert client.search_registered_models() == [] or not client.search_model_versions(
        f"name = '{spec.tracking.registered_model}'")
