"""Tracking against a real `mlflow server`: parent and child runs, params, lineage, every step's metrics,
and a server killed in the middle of training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_stage_run_is_a_child_with_params_lineage_and_every_step(sft_run, tracking_env):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(sft_run.parent_run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sft_run.parent_run_id}' "
                                                "and tags.`posttrain.stage` = 'sft'")
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "sft"
    assert run.data.params["train.max_steps"] == "6" and run.data.params["train_data"] == str(sft_run.train_data)
    assert json.loads(run.data.params["train.adam_betas"]) == [0.9, 0.95]
    tags = run.data.tags
    assert tags["posttrain.kfp_run_id"] == "kfp-run-0001" and tags["posttrain.spec_hash"] == "sha256:spec0001"
    assert tags["posttrain.base_model"] == tags["posttrain.input.model"]
    from components.storage import sha256_file
    assert tags["posttrain.input.train_data.sha256"] == sha256_file(sft_run.train_data)
    assert tags["posttrain.code_version"]
    lines = [json.loads(ln) for ln in (sft_run.output_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "nll", "entropy", "grad_norm", "lr", "tokens_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, 7)), key
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r[key] for r in lines])
    assert "mfu" not in run.data.metrics  # None on CPU: skipped, not logged as a fake number
    assert "system/cpu_utilization_percentage" in run.data.metrics  # sampled every 0.5 s in this run
    import torch
    if torch.cuda.is_available():
        assert "system/gpu_0_memory_usage_megabytes" in run.data.metrics


def test_tracking_off_without_uri(monkeypatch, tmp_path):
    from components import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.stage_run("sft", {"lr": 1.0}) as run:
        run.log_metrics({"step": 1, "loss": 1.0})
        run.set_tags({"a": "b"})
        run.log_artifact(tmp_path)
    assert run.run_id is None
    assert tracking.start_parent() is None


def test_metrics_survive_mlflow_killed_and_restarted(tracking_env, tiny_model_dir, tmp_path, helpers):
    """300 steps; the server is SIGKILLed after step 20 and restarted; the stage finishes and every step is there."""
    from mlflow import MlflowClient

    from components import tracking

    steps = 300
    data = helpers.write_sft_data(tmp_path / "train.jsonl", n=32)
    out = tmp_path / "out"
    config = helpers.sft_config(tmp_path / "sft.yaml", tiny_model_dir, data, out, steps=steps)
    parent = tracking.start_parent(run_name="restart-test")
    env = {"POSTTRAIN_PARENT_RUN_ID": parent, "POSTTRAIN_SYSTEM_METRICS_INTERVAL": "0",
           # fail fast inside the client, so the stage's own retry loop is what rides out the outage
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    log = open(tmp_path / "sft.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "components.sft", "--config", str(config)], cwd=helpers.repo,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 20):
            assert proc.poll() is None, (tmp_path / "sft.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 20"
            time.sleep(0.05)
        tracking_env.kill_mlflow()
        killed_at = len(metrics.read_text().splitlines())
        time.sleep(2)
        tracking_env.start_mlflow()
        assert proc.wait(timeout=180) == 0, (tmp_path / "sft.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "sft.log").read_text()
    assert killed_at < steps, "the server was killed after training had ended"
    assert "MLflow unreachable" in output and "reachable again" in output  # the outage hit the writer
    client = MlflowClient()
    run = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")[0]
    assert run.info.status == "FINISHED"
    for key in ("loss", "entropy", "lr"):
        assert _steps(client, run.info.run_id, key) == list(range(1, steps + 1)), key
    tracking.end_parent(parent)


KILLED_ATTEMPT = """
import sys, time
from mlflow import MlflowClient
from components import tracking
with tracking.stage_run(sys.argv[1], {"lr": 0.1}) as run:
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 10.0 - step})
    while len(MlflowClient().get_metric_history(run.run_id, "loss")) < 3:
        time.sleep(0.2)
    print("LOGGED", flush=True)
    time.sleep(600)  # killed here, like a pod whose node went away
"""


def _killed_attempt(task: str) -> None:
    """An attempt of the step `task` that logs steps 1-3 and is then killed (SIGKILL: it cannot close its run)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ATTEMPT, task], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "POSTTRAIN_TASK": task})
    try:
        assert proc.stdout.readline().strip() == "LOGGED"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_retried_step_keeps_one_run_and_the_exit_handler_fails_leftovers(tracking_env, monkeypatch):
    """One MLflow run per pipeline step, keyed by KFP run id, parent and task: a retry reopens the killed
    attempt's run and its metrics continue there; a step killed with no retry left is marked FAILED by the exit
    handler's close_pipeline_runs. No run is left RUNNING."""
    from mlflow import MlflowClient

    from components import tracking
    from components.preflight.main import close_pipeline_runs

    kfp_run_id = f"kfp-retry-{time.time_ns()}"
    monkeypatch.setenv("POSTTRAIN_KFP_RUN_ID", kfp_run_id)
    monkeypatch.setenv("POSTTRAIN_SYSTEM_METRICS_INTERVAL", "0")
    parent = tracking.start_parent(tags={"posttrain.role": "pipeline", "posttrain.kfp_run_id": kfp_run_id})
    monkeypatch.setenv("POSTTRAIN_PARENT_RUN_ID", parent)
    client = MlflowClient()
    experiment = client.get_run(parent).info.experiment_id

    def children() -> dict[str, list]:
        runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
        return {task: [r for r in runs if r.data.tags["posttrain.task"] == task] for task in ("psft", "dpo")}

    _killed_attempt("psft")
    (killed,) = children()["psft"]
    assert killed.info.status == "RUNNING" and killed.info.run_name == "psft"
    monkeypatch.setenv("POSTTRAIN_TASK", "psft")  # the retry, as components.step sets it
    with tracking.stage_run("sft", {"lr": 0.1}) as run:
        for step in (4, 5, 6):
            run.log_metrics({"step": step, "loss": 10.0 - step})
    monkeypatch.delenv("POSTTRAIN_TASK")
    (psft,) = children()["psft"]
    assert psft.info.run_id == killed.info.run_id == run.run_id  # reopened, not a second run
    assert psft.info.status == "FINISHED" and psft.data.tags["posttrain.attempt"] == "2"
    assert _steps(client, psft.info.run_id, "loss") == [1, 2, 3, 4, 5, 6]  # continuous across the attempts
    assert psft.data.params["lr"] == "0.1"

    _killed_attempt("dpo")  # its last attempt: nothing reopens it
    assert children()["dpo"][0].info.status == "RUNNING"
    assert close_pipeline_runs(client, client.get_experiment(experiment).name, kfp_run_id, "FAILED") == [parent]
    runs = children()
    assert [r.info.status for r in runs["psft"]] == ["FINISHED"] and [r.info.status for r in runs["dpo"]] == ["FAILED"]
    assert client.get_run(parent).info.status == "FAILED"
    leftovers = client.search_runs([experiment], f"tags.`posttrain.kfp_run_id` = '{kfp_run_id}' "
                                                 "and attributes.status = 'RUNNING'")
    assert leftovers == []
