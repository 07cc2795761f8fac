"""The compiled pipeline's tasks as KFP runs them (tests/cluster/kfp.py): each a pod that sees its declared volumes
only, its input artifacts downloaded by the launcher to /s3/<bucket>/<key> on the pod's own scratch volume
(kubeflow/pipelines backend/src/v2/component/launcher_v2.go downloadArtifacts, LocalPathForURI).

The TrainJob's nodes are the pods kube.py's Trainer/JobSet/Job controllers make (the runtime template's volumes and
the runtime patch's: the run's workspace PVC and /dev/shm), each seeing only those volumes.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from kfp import dsl

from components.trainjob import API_ENV
from tests.cluster import installs, kfp, pods
from tests.cluster.kube import KubeApi

REPO = Path(__file__).resolve().parents[2]
NS, RUNNER = "posttrain", "posttrain-pipeline-runner"

BASE_URI = "s3://posttrain-data/models/base"

# what a node runs instead of the stage: every absolute path its config names must be there (and under the
# workspace); node 0 then "trains" by copying the model it was given to the stage's output, as the stage would
NODE = r"""
import json, os, shutil, sys, yaml
config = sys.argv[sys.argv.index("--config") + 1]
workspace = os.environ["WORKSPACE"]
values = yaml.safe_load(open(config))
paths = []
def walk(v, key=""):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(x, f"{key}.{k}" if key else k)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            walk(x, f"{key}[{i}]")
    elif isinstance(v, str) and v.startswith("/"):
        paths.append((key, v))
walk(values)
bad = [f"{k}={p}" + ("" if os.path.exists(p) else " (missing)") for k, p in paths
       if not os.path.exists(p) or not (p + "/").startswith(workspace.rstrip("/") + "/")]
print("paths", json.dumps(dict(paths)), flush=True)
if bad:
    print("NOT READABLE IN THE WORKSPACE: " + "; ".join(bad), flush=True)
    sys.exit(1)
if os.environ["JOB_COMPLETION_INDEX"] == "0":
    out = values["output_dir"]
    shutil.copytree(values["model"], os.path.join(out, "model"), dirs_exist_ok=True)
    open(os.path.join(out, "summary.json"), "w").write(json.dumps({"final": {"nll": 1.0}}))
"""


def _checking_nodes(cluster: kfp.KFPCluster, logs: dict[str, Path]):
    """kube.py's kubelet for the TrainJob's node pods: the pod as Trainer and JobSet made it (its volumes: the
    runtime template's and the patch's), running the path check above instead of the trainer."""
    def on_pod(pod: dict, log: Path):
        pod = copy.deepcopy(pod)
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
        workspace = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "workspace")
        container["command"] = ["python", "-c", NODE, *container["command"][container["command"].index("--config"):]]
        container.pop("args", None)
        container.setdefault("env", []).append({"name": "WORKSPACE", "value": workspace})
        logs[pod["metadata"]["name"]] = log
        return cluster.start_pod(pod, log)
    return on_pod


@pytest.fixture
def cluster(tmp_path):
    return kfp.KFPCluster(runtime=pods.Runtime(tmp_path / "pods"), root=tmp_path / "cluster", namespace=NS,
                          service_account=RUNNER, workspace_owner=(pods.IMAGE_USER[1], pods.IMAGE_USER[2]))


@pytest.fixture
def ir(tmp_path):
    from pipelines.posttrain import compile_spec

    return compile_spec("cluster-7b", tmp_path / "cluster-7b.yaml")


def test_a_trainjob_stage_gives_its_nodes_only_workspace_paths(cluster, ir, tiny_model_dir, monkeypatch):
    """cluster-7b's psft step (a TrainJob of 2 nodes): the config its nodes read names the model and the data in
    the run's workspace, and the nodes, as pods that mount only the workspace, read them. The launcher pod
    downloads the data, not the model."""
    shutil.copytree(tiny_model_dir, cluster.store.local(BASE_URI))
    data = cluster.store.root / "posttrain-pipelines" / "run" / "data-prep" / "data"
    data.mkdir(parents=True)
    (data / "sft.train.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    logs: dict[str, Path] = {}
    install = installs.render("plain")  # the trainer, Kueue and GPU overlays, the Secrets, the runner's RBAC
    api = KubeApi(install.objects, install.namespaces, on_pod=_checking_nodes(cluster, logs), grace=1.0,
                  workdir=cluster.root / "kube")
    with api:
        cluster.api, cluster.env = api, {API_ENV: api.proxy(NS, RUNNER)}  # the step as the pipeline runner
        imported, _ = kfp.run_task(ir, "importer", cluster, {"uri": BASE_URI}, {})
        outputs, step = kfp.run_task(
            ir, "sft", cluster, {"lr": 1e-5, "max_steps": 2, "nproc": 1, "nodes": 2, "tracking_uri": "",
                                 "s3_endpoint": "", "parent_run_id": ""},
            {"model": imported["artifact"], "data": dsl.Dataset(name="data", uri=str(data))})
    results = {name: log.read_text() for name, log in logs.items()}
    log = step.log.read_text()
    assert len(results) == 2, log[-3000:]
    for name, text in results.items():
        assert "NOT READABLE" not in text, f"{name}: {text[-2000:]}"
        paths = json.loads(next(line.partition("paths ")[2] for line in text.splitlines() if "paths {" in line))
        assert paths["model"].startswith(kfp.WORKSPACE_MOUNT + "/") and paths["train_data"].startswith(
            kfp.WORKSPACE_MOUNT + "/"), paths
    assert step.exit_code == 0, log[-3000:]
    # the launcher pod mounts the workspace, and downloaded the data but no model weights
    mounts = {m["mountPath"] for m in step.pod["spec"]["containers"][0]["volumeMounts"]}
    assert kfp.WORKSPACE_MOUNT in mounts and "/s3" in mounts
    assert BASE_URI not in step.downloaded and any(u.endswith("/data") for u in step.downloaded), step.downloaded
    assert step.pod["metadata"]["labels"][kfp.V2_LABEL] == "true"
    # the stage's model stays in the workspace; the output artifact points there
    assert (cluster.claims[(NS, "run-kfp-workspace")] / "psft" / "model" / "config.json").is_file()
    assert outputs["trained_model"].metadata["workspace_path"] == f"{kfp.WORKSPACE_MOUNT}/psft/model"
    assert not list(Path(outputs["trained_model"].path).glob("*.safetensors"))


def test_a_step_sees_its_scratch_and_declared_volumes_only(cluster, ir, tmp_path):
    """A pod sees the volumes it declares: another pod's emptyDir and this test's directory are not there."""
    other = cluster.root / "emptydir" / "someone-else"
    other.mkdir(parents=True)
    (other / "secret.txt").write_text("not yours")
    manifest = {"metadata": {"name": "probe", "namespace": "posttrain", "labels": {}},
                "spec": {"automountServiceAccountToken": False, "volumes": [{"name": "s3-scratch", "emptyDir": {}}],
                         "containers": [{"name": "main", "volumeMounts": [{"name": "s3-scratch", "mountPath": "/s3"}],
                                         "command": ["python", "-c", f"import os, sys; print(os.path.exists("
                                                     f"{str(other / 'secret.txt')!r}), os.path.isdir('/s3'), "
                                                     f"os.path.exists({str(tmp_path)!r}))"]}]}}
    log = tmp_path / "probe.log"
    assert cluster.start_pod(manifest, log).wait(timeout=60) == 0, log.read_text()
    assert log.read_text().split() == ["False", "True", "False"]


def _mini_spec(tracking_uri: str, s3_endpoint: str):
    from pipelines.spec import parse_spec

    return parse_spec({
        "name": "kfp-mini", "base_model": "s3://posttrain-data/models/tiny",
        "data": {"sources": [{"task": "arithmetic", "rows": 48, "shape": "sft"}]},
        "stages": [{"stage": "psft", "settings": {"max_length": 64, "train": {
                       "max_steps": 2, "batch_size": 4, "token_budget": 256, "checkpoint_every": 1}}},
                   {"stage": "evaluate", "settings": {"samples": 1, "k": [1], "max_new_tokens": 4}},
                   {"stage": "register"}],
        "eval_suites": [{"task": "arithmetic", "split": "id", "n_prompts": 4}],
        "promotion": {"metric": "arithmetic-id/accuracy"},
        "tracking": {"uri": tracking_uri, "experiment": "kfp-mini", "registered_model": "kfp-mini"},
        "storage": {"s3_endpoint": s3_endpoint},
    }, "kfp-mini.yaml")


def test_a_pipeline_runs_every_step_as_a_pod_and_no_pod_downloads_weights(cluster, servers, tiny_model_dir,
                                                                         monkeypatch):
    """A short spec end to end, every task a pod (single-node stages): it succeeds, and no step pod's scratch volume
    ever holds model weights (the base model is imported into the workspace; each stage's model stays there)."""
    from components import storage

    creds = {k: servers.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for k, v in {**creds, "MLFLOW_S3_ENDPOINT_URL": servers.s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    storage.upload(tiny_model_dir, "s3://posttrain-data/models/tiny")
    cluster.secrets = {"posttrain-minio": creds, "posttrain-mlflow": {
        k: servers.env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}}
    cluster.store.endpoint, cluster.store.credentials = servers.s3_endpoint, creds
    cluster.env = {"OMP_NUM_THREADS": "1"}
    result = kfp.run_pipeline(_mini_spec(servers.tracking_uri, servers.s3_endpoint), {"psft_max_steps": 2}, cluster)
    tails = {t: r.log.read_text()[-1500:] for t, r in result.tasks.items() if r.phase != "Succeeded"}
    assert result.status == "succeeded", (result.error, tails)
    assert {"preflight", "data-prep", "sft", "evaluate", "register", "close-run"} <= set(result.tasks)
    weights = [p for p in (cluster.root / "emptydir").rglob("*.safetensors")]
    assert not weights, weights
    registration = json.loads((result.store / "posttrain-pipelines").rglob("registration").__next__().read_text())
    assert registration["name"] == "kfp-mini" and registration["version"] == "1"
