"""The demo's workflow with `deploy` on, run with kfp.local (pipelines/local.py) against the emulated cluster's API
(tests/cluster/kube.py: a plain install with k8s/overlays/kserve, its RBAC, the pinned KServe CRDs, KServe's webhook
rules and an emulated controller whose predictor fetches the model from S3 through the NetworkPolicies; no vLLM
runs) and the session's MLflow server with S3 artifacts. Shortened as tests/e2e/test_local_run.py shortens the
demo: psft for a few steps, then evaluate, register and deploy (reward_scoring, dpo and grpo add minutes and nothing
to what is checked here).

- A run that promotes (the rule: lower held-out entropy than the base model, which a few steps of training always
  give the tiny model at initialization) creates the InferenceService, waits for Ready and records its URL on the
  registered version and the deploy step's MLflow run.
- A run that does not promote (the same rule with a ceiling no model clears) never reaches the deploy step: the
  InferenceService is not written.
- `posttrain models promote` and the deploy stage's command line serve v2; `posttrain models rollback` moves the
  champion back to v1 and the InferenceService with it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest
import yaml

from cluster.kserve_env import NS, RUNNER, emulated_kserve
from components import kserve
from pipelines.spec import SPECS_DIR, parse_spec


def _spec(model: str, ceiling: float | None = None):
    data = copy.deepcopy(yaml.safe_load((SPECS_DIR / "demo.yaml").read_text()))
    data["name"] = "deploy-demo"
    data["tracking"] = {"registered_model": model}
    data["data"]["sources"][0]["rows"] = 400
    data["data"]["sources"] = data["data"]["sources"][:1]
    psft = data["stages"][0]
    psft["settings"]["train"].update(max_steps=8, batch_size=32, log_every=4)
    data["stages"] = [psft, {"stage": "evaluate"}, {"stage": "register"},
                      {"stage": "deploy", "settings": {"service": "deploy-demo", "cpu": "2", "memory": "8Gi",
                                                       "timeout": 120, "poll_seconds": 0.5}}]
    data["rewards"] = []
    for suite in data["eval_suites"]:
        suite["n_prompts"] = 16
    data["promotion"] = {"metric": "arithmetic-id/entropy", "direction": "min", "min_improvement": 0.0}
    if ceiling is not None:
        data["promotion"]["min_value"] = ceiling
    return parse_spec(data, "demo.yaml (shortened, deploy on)")


@pytest.fixture
def cluster(tmp_path, monkeypatch, s3_server, secrets):
    with emulated_kserve(tmp_path / "cluster", s3_server[1], secrets, monkeypatch) as api:  # as the runner
        yield api


def test_the_demo_with_deploy_serves_the_champion_only_when_it_moved_and_rolls_back(
        cluster, tracking_env, secrets, tmp_path, capsys):
    from mlflow import MlflowClient

    from components import promotion
    from pipelines import models
    from pipelines.local import run_local

    name = f"deploy-demo-{time.time_ns()}"
    client, state = MlflowClient(), tmp_path / "state"
    args = {"tracking_uri": tracking_env.tracking_uri}

    # 1: promotes (no champion yet, lower entropy than the base model): the InferenceService is created, Ready
    first = run_local(_spec(name), tmp_path / "out1", state=state, arguments=args)
    assert first["status"] == "succeeded", first["error"]
    assert first["promotion"]["promoted"] is True and first["registered"]["version"] == "1"
    assert [w[:2] for w in cluster.kserve_writes] == [("create", "deploy-demo")]
    isvc = cluster.get("inferenceservices", NS, "deploy-demo", "serving.kserve.io")
    url = isvc["status"]["url"]
    assert url == f"http://deploy-demo-{NS}.example.com"
    assert isvc["metadata"]["labels"][kserve.VERSION_LABEL] == "1"
    assert client.get_model_version(name, "1").tags[kserve.URL_TAG] == url
    record = json.loads(client.get_registered_model(name).tags[kserve.DEPLOYMENT_TAG])
    assert record["version"] == "1" and record["url"] == url and record["via"].startswith("deploy stage, run ")
    (deploy_run,) = client.search_runs([client.get_experiment_by_name("deploy-demo").experiment_id],
                                       f"tags.`posttrain.registered_model` = '{name}' and tags.`posttrain.stage` = "
                                       "'deploy'")
    assert deploy_run.data.tags[kserve.URL_TAG] == url and deploy_run.info.status == "FINISHED"
    (download,) = cluster.kserve_downloads
    assert download[1] == record["storage_uri"] and "model.safetensors" in download[2]
    assert cluster.network.denied == []
    requests = {(who, method) for who, method, path in cluster.requests if "inferenceservices" in path}
    assert requests <= {(f"{NS}/{RUNNER}", "GET"), (f"{NS}/{RUNNER}", "POST")}

    # 2: does not promote (a ceiling no entropy clears): the deploy step does not run, nothing is written
    second = run_local(_spec(name, ceiling=0.0), tmp_path / "out2", state=state, arguments=args)
    assert second["status"] == "succeeded", second["error"]
    assert second["promotion"]["promoted"] is False and second["registered"]["version"] == "2"
    assert len(cluster.kserve_writes) == 1 and promotion.alias_version(client, name, promotion.CHAMPION) == "1"

    # v2 served by hand (the deploy stage's command line), then rolled back: champion and InferenceService → v1
    assert models.main(["promote", "--name", name, "--version", "2", "--reason", "manual canary"]) == 0
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"name": name, "version": "2", "output_dir": str(tmp_path / "deploy"),
                                      "service": "deploy-demo", "timeout": 60, "poll_seconds": 0.5}))
    done = subprocess.run([sys.executable, "-m", "components.deploy", "--config", str(config)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "deploy" / "deployment.json").read_text())["action"] == "patched"
    v2_uri = cluster.get("inferenceservices", NS, "deploy-demo", "serving.kserve.io")["spec"]["predictor"]["model"][
        "storageUri"]
    assert v2_uri != record["storage_uri"]
    capsys.readouterr()
    assert models.main(["rollback", "--name", name, "--reason", "v2 regressed"]) == 0
    assert f"InferenceService {NS}/deploy-demo v2 -> v1 at {url}" in capsys.readouterr().out
    isvc = cluster.get("inferenceservices", NS, "deploy-demo", "serving.kserve.io")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == record["storage_uri"]
    assert isvc["status"]["conditions"][-1] == {**isvc["status"]["conditions"][-1], "type": "Ready", "status": "True"}
    trail = promotion.audit_log(client, name)
    assert [(r["action"], r["previous"], r["version"]) for r in trail] == [
        ("promote", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1"), ("rollback-deployment", "2", "1")]

    # no credential in the runs' logs, parameters, artifacts or MLflow
    values = [secrets[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")]
    texts = [p.read_text(errors="replace") for root in (state / "runs", tmp_path / "out1", tmp_path / "out2",
                                                        tmp_path / "deploy") for p in root.rglob("*") if p.is_file()
             and p.stat().st_size < 5_000_000]
    runs = client.search_runs([client.get_experiment_by_name("deploy-demo").experiment_id])
    texts += [json.dumps([r.data.params, r.data.tags]) for r in runs]
    texts += [json.dumps(cluster.kserve_writes), json.dumps(client.get_registered_model(name).tags)]
    assert not [v for v in values for t in texts if v in t]
