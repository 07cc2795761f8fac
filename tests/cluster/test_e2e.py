"""The bundled multi-node specs end to end in the emulated cluster, on CPU: every KFP task a pod
(tests/cluster/kfp.py), every training stage a TrainJob of 2 nodes × 1 process whose pods kube.py's Trainer,
JobSet and Job controllers make from posttrain's TrainingRuntime and the launcher's runtime patch, every pod seeing
only its declared volumes (pods.py) and reaching MLflow, MinIO and the Kubernetes API only through the rendered
NetworkPolicies (network.py), the API enforcing the rendered RBAC (kube.py), the install's admission policies
applied (the workspace's fsGroup), the workspace volume's root fresh as a block-backed StorageClass makes it
(root:root 0755).

The specs are `cluster-7b` (PSFT then GRPO under ZeRO-3) and `cluster-70b-lora` (LoRA PSFT then GRPO under ZeRO-3),
read from pipelines/specs/ and changed only in size (and cluster-70b-lora given the register stage it lacks): the
tiny model in place of the 7B/70B one (uploaded where the spec's base_model points), general_points data generated
where the spec's sources point, a few steps, short completions, a few evaluation prompts, fp32 where a CPU has no
fast bf16, and ZeRO-3 partitioning every parameter (`zero3_param_persistence_threshold: 0`, as DeepSpeed does for 7B
matrices). Storage, tracking, resources (nodes, queue, runtime, secrets, tolerations) and the DAG are the bundled
spec's.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from tests.cluster import installs, kfp, kube, pods
from tests.cluster.kube import KubeApi
from tests.cluster.network import Network

REPO = Path(__file__).resolve().parents[2]
API_NAMES = ("kubernetes.default.svc", "kubernetes.default.svc.cluster.local")


def _shrink(name: str) -> dict:
    """The bundled spec `name`, at the tiny model's size (module docstring)."""
    spec = yaml.safe_load((REPO / "pipelines" / "specs" / f"{name}.yaml").read_text())
    spec["data"]["max_length"] = 64
    for stage in spec["stages"]:
        settings = stage.setdefault("settings", {})
        train = settings.get("train")
        if train is not None:
            train.update(batch_size=8, token_budget=512, checkpoint_every=1, warmup_steps=0,
                         zero3_param_persistence_threshold=0, log_every=1)
            train.pop("precision", None)  # fp32: bf16 matmuls are slow on this CPU; LoRA + bf16 base: test_zero3
        if stage["stage"] == "psft":
            settings["max_length"] = 64
        if stage["stage"] == "grpo":
            settings.update(num_generations=2, prompts_per_round=4)
            settings["sampling"] = {"max_new_tokens": 8}
            train["batch_size"] = 8
        if stage["stage"] == "evaluate":
            settings.update(samples=1, k=[1], max_new_tokens=8, temperature=0.0)
            if "rollout" in settings:  # vLLM over 8 GPUs: the hf engine on this CPU
                settings.pop("rollout")
    for suite in spec["eval_suites"]:
        suite["n_prompts"] = 8
    spec.pop("schedule", None)
    if not any(stage["stage"] == "register" for stage in spec["stages"]):  # cluster-70b-lora stops at evaluate
        spec["stages"].append({"stage": "register"})
        spec["promotion"] = {"metric": "general_points-id/accuracy", "direction": "max"}
    spec["resources"]["timeout"] = 600  # a stage that cannot finish fails the test instead of hanging it
    return spec


def _upload_inputs(spec: dict, tiny_model_dir: Path) -> None:
    """The base model and the data where the spec's URIs point (MinIO: the session's S3 endpoint)."""
    import pandas as pd

    from components import storage
    from components.datasets import write_jsonl
    from components.tasks import get_task

    storage.upload(tiny_model_dir, spec["base_model"])
    task = get_task("general_points")
    for source in spec["data"]["sources"]:
        fields = source["fields"]
        rows = task.generate(64, seed=3, split="id", part="train")
        if source["shape"] == "sft":
            local = Path(os.environ["POSTTRAIN_E2E_TMP"]) / "sft"  # a directory of JSONL files, as the spec says
            write_jsonl(local / "part-000.jsonl",
                        [{fields["prompt"]: r["prompt"], fields["completion"]: r["completion"]} for r in rows])
            storage.upload(local, source["uri"].rstrip("/"))
        else:
            local = Path(os.environ["POSTTRAIN_E2E_TMP"]) / "prompts.parquet"
            pd.DataFrame([{fields["prompt"]: r["prompt"], fields["answer"]: r["answer"]} for r in rows]).to_parquet(
                local)
            storage.upload(local, source["uri"])


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """MLflow as k8s/base/mlflow.yaml runs it: its --allowed-hosts (MLflow 3's Host-header check,
    mlflow/server/fastapi_security.py) from the rendered Deployment, so a pod reaching it by its in-cluster name is
    refused exactly when the manifest would refuse it."""
    from pipelines import stack

    deployment = next(o for o in installs.render("plain").objects
                      if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    (allowed,) = [a.split("=", 1)[1] for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
                  if a.startswith("--allowed-hosts=")]
    root, endpoint, creds = s3_server
    root = tmp_path_factory.mktemp("e2e-mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stack.start_mlflow(root, port, endpoint, env={**creds, "MLFLOW_SERVER_ALLOWED_HOSTS": allowed})
    try:
        yield port
    finally:
        stack.stop(root, "mlflow")


@pytest.fixture
def emulated(tmp_path, servers, mlflow_server, deepspeed_comm_op, monkeypatch):
    """The plain install (k8s/README.md: namespace posttrain, the gpu, kueue and trainer overlays, the
    workspace-fsgroup policy), its API, its network with MLflow, MinIO and the API server behind their in-cluster
    names, and KFP running on it as the install's pipeline runner."""
    install = installs.render("plain")
    # node 0 of every TrainJob listens on Trainer's master port: on a cluster at its pod's own address, here on the
    # loopback the pods share, so each emulated cluster's Trainer gets a port of its own (this file's tests run side
    # by side on the suite's workers)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(kube, "TRAINER_PORT", s.getsockname()[1])
    creds = {k: servers.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for k, v in {**creds, "MLFLOW_S3_ENDPOINT_URL": servers.s3_endpoint, "POSTTRAIN_E2E_TMP": str(tmp_path),
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    network = Network(install.objects, install.namespaces)
    api = KubeApi(install.objects, install.namespaces, grace=1.0, workdir=tmp_path / "kube")
    upstreams = {"mlflow": ("127.0.0.1", mlflow_server),
                 "minio": tuple(servers.s3_endpoint.split("://", 1)[1].rsplit(":", 1))}
    with network, api:
        upstreams["kubernetes"] = (api.host, api.port)
        for key in ("mlflow", "minio", "kubernetes"):
            service = install.services[key]
            host, port = upstreams[key]
            network.add_service(service.host, service.port, service.namespace, service.labels, (host, int(port)))
        objects, labels = install.objects, install.namespaces
        cluster = kfp.KFPCluster(
            runtime=pods.Runtime(tmp_path / "pods", tokens=api.tokens_for), root=tmp_path / "cluster",
            namespace=install.pods_namespace, service_account=install.service_account, api=api, network=network,
            admit=lambda pod: pods.admit(pod, objects, labels[pod.namespace]),
            env={"KUBERNETES_SERVICE_HOST": API_NAMES[0], "KUBERNETES_SERVICE_PORT": "443",
                 "KUBERNETES_SERVICE_PORT_HTTPS": "443", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"},
            s3_endpoint=servers.s3_endpoint, s3_credentials=creds)
        api.on_pod = cluster.start_pod  # the TrainJobs' node pods run as pods of this cluster
        try:
            yield cluster, install, network, api
        finally:
            cluster.runtime.stop_all()


@pytest.mark.parametrize("name", ["cluster-7b", "cluster-70b-lora"])
def test_a_multi_node_spec_runs_to_a_registered_model(name, emulated, tiny_model_dir, tmp_path):
    cluster, install, network, api = emulated
    spec = _shrink(name)
    _upload_inputs(spec, tiny_model_dir)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from pipelines.spec import load_spec

    result = kfp.run_pipeline(load_spec(path), {"psft_nodes": 2, "psft_gpus_per_node": 1, "grpo_nodes": 2,
                                                "grpo_gpus_per_node": 1, "psft_max_steps": 2, "grpo_max_steps": 2,
                                                **({"evaluate_gpus_per_node": 1} if name.endswith("lora") else {})},
                              cluster)
    failed = {t: r.log.read_text()[-4000:] for t, r in result.tasks.items() if r.phase != "Succeeded"}
    assert result.status == "succeeded", (result.error, failed, network.denied, api.refused)
    # each training stage ran as a TrainJob of 2 node pods, ranks 0 and 1, and was deleted when its step ended
    assert len(api.created) == 2 and sorted(api.deleted) == sorted(api.created), (api.created, api.deleted)
    assert not network.denied, network.denied
    registration = json.loads(next((result.store / "posttrain-pipelines").rglob("registration")).read_text())
    assert registration["name"] == spec["tracking"]["registered_model"] and registration["version"] == "1"
