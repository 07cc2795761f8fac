"""Tracking under Kubeflow Pipelines' MLflow plugin (KFP 2.17, KEP-12862), against a real `mlflow server`, and the
experiment page MLflow's UI opens for a posttrain experiment.

The plugin is played here as KFP does it (kubeflow/pipelines at 7b70c7b, the files named where each part is made):
- the API server (backend/src/apiserver/plugins/mlflow/handler.go, OnBeforeRunCreation) creates the experiment and
  one run per pipeline run, tagged kfp.pipeline_run_id, and marshals KFP_MLFLOW_CONFIG from MLflowRuntimeConfig
  (backend/src/common/plugins/mlflow/config.go): endpoint, parentRunId, experimentId, authType, timeout, ...;
  InjectMLflowRuntimeEnv (backend/src/apiserver/plugins/mlflow/config.go) puts it on the driver and the launcher, the
  step's container (whose command inherits it);
- the driver (backend/src/v2/common/plugins/mlflow/handler.go, OnTaskStart) creates the task's nested run, named
  after the task, tagged mlflow.parentRunId, once per task: every retry of the pod gets the same one; with
  injectUserEnvVars it sets MLFLOW_RUN_ID, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID (RetrieveUserContainerEnvVars);
- the launcher (OnTaskEnd) closes the task's run after each attempt, FAILED when the attempt failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ATTEMPT = """
import sys, time
from mlflow import MlflowClient
from components import tracking
with tracking.stage_run("sft", {"lr": 0.1}) as run:
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 10.0 - step})
    while len(MlflowClient().get_metric_history(run.run_id, "loss")) < 3:
        time.sleep(0.2)
    print("LOGGED", run.run_id, flush=True)
    time.sleep(600)  # killed here, like a pod whose node went away
"""


def run_chromium(tmp_path: Path, *args: str) -> str:
    """Headless Chromium (Debian's) with a fresh profile: no stored choice of the UI's view."""
    exe = shutil.which("chromium")
    if not exe:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Kfp:
    """What KFP's API server and driver do for one pipeline run, over MLflow's REST API."""

    def __init__(self, uri: str, experiment: str):
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, tags={"mlflow.note.content": "Created by Kubeflow Pipelines"})
        self.kfp_run_id = f"kfp-{time.time_ns()}"
        self.root = self.client.create_run(self.experiment_id, run_name="posttrain-demo",
                                           tags={"kfp.pipeline_run_id": self.kfp_run_id}).info.run_id

    def config(self, **extra) -> str:
        """KFP_MLFLOW_CONFIG as json.Marshal(MLflowRuntimeConfig) writes it (omitempty fields left out)."""
        return json.dumps({"endpoint": self.uri, "parentRunId": self.root, "experimentId": self.experiment_id,
                           "authType": "none", "timeout": "30s", "injectUserEnvVars": True, **extra})

    def task_run(self, task: str) -> str:
        return self.client.create_run(self.experiment_id, run_name=task,
                                      tags={"mlflow.parentRunId": self.root}).info.run_id

    def task_env(self, task_run: str) -> dict[str, str]:
        return {"KFP_MLFLOW_CONFIG": self.config(), "MLFLOW_RUN_ID": task_run, "MLFLOW_TRACKING_URI": self.uri,
                "MLFLOW_EXPERIMENT_ID": self.experiment_id}

    def runs(self) -> list:
        """Every run of the experiment (made for this pipeline run alone)."""
        return self.client.search_runs([self.experiment_id], "")


@pytest.fixture
def kfp(tracking_env, monkeypatch):
    """A pipeline run under KFP's plugin, on the MLflow server the spec names too (the usual cluster)."""
    plugin = Kfp(tracking_env.tracking_uri, f"kfp-experiment-{time.time_ns()}")
    monkeypatch.setenv("POSTTRAIN_KFP_RUN_ID", plugin.kfp_run_id)
    monkeypatch.setenv("POSTTRAIN_SYSTEM_METRICS_INTERVAL", "0")
    monkeypatch.setenv("POSTTRAIN_TRACKING_CONNECT_TIMEOUT", "5")
    monkeypatch.setenv("KFP_MLFLOW_CONFIG", plugin.config())
    for k in ("MLFLOW_RUN_ID", "MLFLOW_WORKSPACE", "MLFLOW_TRACKING_AUTH", "POSTTRAIN_PARENT_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    return plugin


def test_one_tree_the_task_run_reused_across_retries(kfp, monkeypatch, tmp_path):
    """Preflight opens no run of its own (KFP's pipeline run is the parent, tagged with the lineage); a stage logs
    into KFP's run for its task; the task's retry (same MLFLOW_RUN_ID, after KFP's launcher closed the killed
    attempt's run FAILED) reopens it and its metrics continue; the tree is KFP's root and its task runs, nothing
    else, and the experiment is marked as model training."""
    from components import tracking
    from components.preflight.main import PreflightConfig, check_mlflow

    cfg = PreflightConfig(base_model_uri="s3://models/base", tracking_uri=kfp.uri, experiment="posttrain-kfp",
                          kfp_run_id=kfp.kfp_run_id,
                          tags={"posttrain.spec": "demo", "posttrain.spec_hash": "sha256:kfp"})
    _, parent = check_mlflow(cfg)
    assert parent == kfp.root
    assert tracking.start_parent() == kfp.root  # returned, not created
    root_tags = kfp.client.get_run(kfp.root).data.tags
    assert root_tags["posttrain.spec_hash"] == "sha256:kfp" and root_tags["posttrain.kfp_run_id"] == kfp.kfp_run_id
    assert "posttrain.role" not in root_tags  # posttrain's exit handler leaves KFP's run to KFP

    psft = kfp.task_run("psft")
    for k, v in kfp.task_env(psft).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", kfp.uri)  # as the step sets it from the spec
    proc = subprocess.Popen([sys.executable, "-c", ATTEMPT], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "POSTTRAIN_TASK": "psft"})
    try:
        assert proc.stdout.readline().split() == ["LOGGED", psft]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    kfp.client.set_terminated(psft, "FAILED")  # KFP's launcher, at the end of the failed attempt

    monkeypatch.setenv("POSTTRAIN_TASK", "psft")  # the retry, as components.step sets it
    with tracking.stage_run("sft", {"lr": 0.1}) as run:
        assert kfp.client.get_run(psft).info.status == "RUNNING"
        for step in (4, 5, 6):
            run.log_metrics({"step": step, "loss": 10.0 - step})
    tracking.end_parent(parent, "FINISHED")  # KFP closes its own pipeline run: left as it is

    assert run.run_id == psft
    task = kfp.client.get_run(psft)
    assert task.info.status == "FINISHED" and task.info.run_name == "psft"
    assert task.data.tags["posttrain.stage"] == "sft" and task.data.tags["posttrain.attempt"] == "2"
    assert task.data.tags["posttrain.kfp_run_id"] == kfp.kfp_run_id
    assert task.data.params["lr"] == "0.1"
    assert sorted(m.step for m in kfp.client.get_metric_history(psft, "loss")) == [1, 2, 3, 4, 5, 6]
    runs = kfp.runs()
    assert sorted(r.info.run_id for r in runs) == sorted([kfp.root, psft])  # one tree, no run of posttrain's own
    assert kfp.client.get_run(kfp.root).info.status == "RUNNING"
    assert not kfp.client.search_runs(
        [e.experiment_id for e in kfp.client.search_experiments()],
        f"tags.`posttrain.kfp_run_id` = '{kfp.kfp_run_id}' and tags.`posttrain.role` = 'pipeline'")
    assert kfp.client.get_experiment(kfp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_without_the_task_run_id_the_stage_nests_under_kfps_run(kfp, monkeypatch):
    """KFP_MLFLOW_CONFIG without MLFLOW_RUN_ID (injectUserEnvVars off): the stage's run is a child of KFP's
    pipeline run, in KFP's experiment, on KFP's server (not the one the spec names)."""
    from components import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the spec's: nothing answers there

    with tracking.stage_run("dpo", {"beta": 0.1}) as run:
        run.log_metrics({"step": 1, "loss": 0.5})
    child = kfp.client.get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == kfp.root and child.info.experiment_id == kfp.experiment_id
    assert child.info.status == "FINISHED" and child.data.metrics["loss"] == 0.5


def test_without_kfp_variables_the_parent_run_is_posttrains(tracking_env, monkeypatch):
    """No KFP_MLFLOW_CONFIG: preflight opens posttrain's parent run (posttrain.role pipeline), the stage run is its
    child in the spec's experiment, and the exit handler closes the parent, as before."""
    from mlflow import MlflowClient

    from components import tracking
    from components.preflight.main import PreflightConfig, check_mlflow, close_pipeline_runs

    monkeypatch.delenv("KFP_MLFLOW_CONFIG", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("POSTTRAIN_SYSTEM_METRICS_INTERVAL", "0")
    kfp_run_id = f"kfp-plain-{time.time_ns()}"
    monkeypatch.setenv("POSTTRAIN_KFP_RUN_ID", kfp_run_id)
    experiment = f"posttrain-plain-{time.time_ns()}"
    _, parent = check_mlflow(PreflightConfig(base_model_uri="s3://models/base", tracking_uri=tracking_env.tracking_uri,
                                             experiment=experiment, kfp_run_id=kfp_run_id))
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    assert client.get_run(parent).data.tags["posttrain.role"] == "pipeline"
    assert client.get_run(parent).info.experiment_id == exp.experiment_id
    monkeypatch.setenv("POSTTRAIN_PARENT_RUN_ID", parent)
    with tracking.stage_run("sft", {"lr": 0.1}) as run:
        run.log_metrics({"step": 1, "loss": 1.0})
    assert client.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent
    assert close_pipeline_runs(client, experiment, kfp_run_id, "SUCCEEDED") == [parent]
    runs = client.search_runs([exp.experiment_id], "")
    assert sorted(r.info.run_id for r in runs) == sorted([parent, run.run_id])
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_kfp_auth_modes_and_workspace(monkeypatch):
    """authType and workspace as KFP's driver maps them for user code (RetrieveUserContainerEnvVars): kubernetes
    reads the pod's token per request through MLflow's kubernetes auth provider (namespaced when a workspace is
    set); bearer and basic-auth need the variables KFP sets from the Secret kfp-mlflow-credentials."""
    from components import tracking
    from components.config import UserError

    base = {"endpoint": "https://mlflow.example.com", "parentRunId": "r1", "experimentId": "7", "timeout": "30s"}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_AUTH", "MLFLOW_WORKSPACE", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_INSECURE_TLS"):
        monkeypatch.setenv(k, "")  # so that what use_kfp sets is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("KFP_MLFLOW_CONFIG", json.dumps({**base, "authType": "kubernetes", "workspacesEnabled": True,
                                                        "workspace": "team-a", "insecureSkipVerify": True}))
    assert tracking.use_kfp().parent_run_id == "r1"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert os.environ["MLFLOW_WORKSPACE"] == "team-a"
    assert os.environ["MLFLOW_TRACKING_AUTH"] == "kubernetes-namespaced"
    assert os.environ["MLFLOW_TRACKING_INSECURE_TLS"] == "true"
    assert tracking.experiment_url("7") == ("https://mlflow.example.com/#/experiments/7"
                                            "?workflowType=machine_learning&workspace=team-a")

    monkeypatch.setenv("KFP_MLFLOW_CONFIG", json.dumps({**base, "authType": "bearer"}))
    with pytest.raises(UserError, match="MLFLOW_TRACKING_TOKEN"):
        tracking.use_kfp()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken-value")
    assert tracking.use_kfp().auth_type == "bearer"
    monkeypatch.setenv("KFP_MLFLOW_CONFIG", "{not json")
    with pytest.raises(UserError, match="KFP_MLFLOW_CONFIG"):
        tracking.kfp_config()


def test_mlflow_ui_opens_a_posttrain_experiment_on_its_runs(tracking_env, tmp_path, monkeypatch):
    """An experiment posttrain creates carries MLflow's model-training kind, and the link posttrain gives for it
    opens, in headless Chromium, the runs table with the stage's run, not the GenAI traces view ("No data
    available"). MLflow 3.17's UI picks the view from the link's workflowType (else the browser's last choice,
    GenAI at first), not from the experiment's tag: the link carries it."""
    from mlflow import MlflowClient

    from components import tracking

    monkeypatch.delenv("KFP_MLFLOW_CONFIG", raising=False)
    monkeypatch.setenv("POSTTRAIN_SYSTEM_METRICS_INTERVAL", "0")
    monkeypatch.setenv("POSTTRAIN_EXPERIMENT", f"posttrain-ui-{time.time_ns()}")
    parent = tracking.start_parent(run_name="ui-check")
    monkeypatch.setenv("POSTTRAIN_PARENT_RUN_ID", parent)
    monkeypatch.setenv("POSTTRAIN_TASK", "psft-ui-check")
    with tracking.stage_run("sft", {"lr": 0.1}) as run:
        run.log_metrics({"step": 1, "loss": 1.0})
    tracking.end_parent(parent)
    experiment_id = MlflowClient().get_run(parent).info.experiment_id
    assert MlflowClient().get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    url = tracking.experiment_url(experiment_id)
    dom = run_chromium(tmp_path, "--virtual-time-budget=15000", "--window-size=1400,900", "--dump-dom", url)
    (tmp_path / "experiment.html").write_text(dom)
    assert "Run Name" in dom and ">ui-check<" in dom, tmp_path / "experiment.html"  # the parent: its child folded
    assert "No data available" not in dom
    shot = tmp_path / "experiment.png"
    run_chromium(tmp_path, "--virtual-time-budget=15000", "--window-size=1400,900", f"--screenshot={shot}", url)
    assert shot.stat().st_size > 10_000
