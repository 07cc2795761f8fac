"""The TrainJob a multi-node step creates (components/trainjob.py) against Kubeflow Trainer's CRD, pinned in k8s/crds/
at the release whose API models (kubeflow-trainer-api) build it. The launcher end to end, against the emulated
cluster's API: tests/cluster/test_trainjob.py."""

import re
import tomllib

import pytest
from k8s_tools import ROOT, load_validate

from components.trainjob import Placement, forwarded_env, trainjob_manifest, trainjob_name

validate = load_validate()

FULL = Placement(namespace="posttrain", runtime="posttrain-trainer", image="ghcr.io/posttrain/posttrain-trainer:0.1.0",
                 spec_name="posttrain-points-7b", accelerator="nvidia.com/gpu", cpu="64", memory="900Gi",
                 shm_size="64Gi", node_selector={"posttrain/pool": "gpu-training"},
                 tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                              {"key": "posttrain/dedicated", "operator": "Equal", "value": "gpu-training",
                               "effect": "NoSchedule", "tolerationSeconds": 60}],
                 secrets={"posttrain-minio": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]},
                 pull_secrets=["registry"], queue="posttrain-gpu", timeout=86400)
MINIMAL = Placement(namespace="posttrain", runtime="posttrain-trainer", image="trainer:1", spec_name="demo")


def _manifest(placement: Placement, **kw) -> dict:
    args = dict(name=trainjob_name("0b7c5a9e-1f2d-4c3b-9a8e-7d6c5b4a3f21", "psft"),
                run_id="0b7c5a9e-1f2d-4c3b-9a8e-7d6c5b4a3f21", stage="psft", nodes=2, nproc=8,
                command=["python", "-m", "torch.distributed.run", "-m", "components.sft", "--config", "/w/c.yaml"],
                env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, workspace="/kfp-workspace", workspace_pvc="ws")
    return trainjob_manifest(placement, **(args | kw))


@pytest.mark.parametrize("placement", [FULL, MINIMAL], ids=["full", "minimal"])
def test_the_trainjob_validates_against_the_pinned_crd(placement):
    job = _manifest(placement)
    assert validate.crd_errors(job) == []
    name = job["metadata"]["name"]  # the CRD's CEL rules on the name (not evaluated by the schema)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63


def test_the_schema_check_catches_what_the_api_server_refuses():
    job = _manifest(FULL)
    job["spec"]["trainer"]["numNodes"] = "2"
    job["spec"]["trainer"]["gpus"] = 8
    del job["spec"]["runtimeRef"]["name"]
    errors = "\n".join(validate.crd_errors(job))
    assert "spec.trainer.numNodes: '2' is not of type 'integer'" in errors
    assert "'gpus' was unexpected" in errors and "'name' is a required property" in errors


def test_the_crd_is_the_release_of_the_pinned_models():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (models,) = [p for p in pins if p.startswith("kubeflow-trainer-api==")]
    version = models.split("==")[1]
    for crd in ("trainjobs", "trainingruntimes"):
        header = (ROOT / "k8s" / "crds" / f"trainer.kubeflow.org_{crd}.yaml").read_text().splitlines()[:2]
        assert f"Kubeflow Trainer v{version}" in header[0] and re.search(r"commit [0-9a-f]{40}", header[1])


def test_names_are_per_run_and_stage_and_short():
    assert trainjob_name("run-a", "psft") == trainjob_name("run-a", "psft")
    assert len({trainjob_name("run-a", "psft"), trainjob_name("run-b", "psft"), trainjob_name("run-a", "grpo")}) == 3
    long = trainjob_name("0b7c5a9e-1f2d-4c3b-9a8e-7d6c5b4a3f21", "reward_model")
    assert long.startswith("pt-reward-model-") and len(long) <= 30  # room for JobSet's pod name suffixes


def test_credentials_travel_as_secret_references_only():
    env = forwarded_env({"MLFLOW_TRACKING_URI": "http://m", "POSTTRAIN_KFP_RUN_ID": "r", "AWS_SECRET_ACCESS_KEY": "s",
                         "MLFLOW_TRACKING_PASSWORD": "p", "HOME": "/root"})
    assert env == {"MLFLOW_TRACKING_URI": "http://m", "POSTTRAIN_KFP_RUN_ID": "r"}
    trainer = _manifest(FULL, env=env)["spec"]["trainer"]
    secret = [e for e in trainer["env"] if "valueFrom" in e]
    assert {e["name"] for e in secret} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "posttrain-minio" and "value" not in e for e in secret)


def test_a_reconnect_reads_back_to_the_last_line_shown_with_a_margin():
    from datetime import UTC, datetime, timedelta

    from components.trainjob import _since_seconds

    ten_ago = (datetime.now(UTC) - timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"
    assert 70 <= _since_seconds(ten_ago) <= 72  # 10 s back, and 60 s for the clocks of the node and this pod
    assert _since_seconds("") is None and _since_seconds("no-timestamp") is None
