"""The compiled cluster pipeline refers only to what the deployment provides: images built by images/, Secrets
(and keys) that k8s/secrets/ defines and the pipeline runner may read, buckets the MinIO Job creates, in-cluster
endpoints that are Services of k8s/ (MLflow's among its allowed hosts), and the GPU pool of the gpu overlay.

The checks run on the compiled KFP YAML. They are proven here on a small pipeline compiled with kfp to the
same conventions (and broken on purpose), and applied to the real one: pipelines.posttrain.compile_spec on
the bundled spec `cluster`."""

# no `from __future__ import annotations`: kfp reads the probe components' annotations as types at compile time
import re
from pathlib import Path

import pytest
import yaml
from k8s_tools import ROOT, load_validate

from pipelines.posttrain import compile_spec

validate = load_validate()

S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])")
CLUSTER_URL = re.compile(r"https?://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)")
KFP_STUB_IMAGE = "argostub/"  # placeholder images of KFP's built-in steps (createpvc, deletepvc)


# --- what the deployment provides --------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment() -> dict:
    """The facts of k8s/ (base + gpu overlay) a pipeline may rely on."""
    from components.images import image

    resources = validate.render(ROOT / "k8s" / "overlays" / "gpu")
    by = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    mlflow_args = by["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    smoke = by["Job", "posttrain-gpu-smoke"]["spec"]["template"]["spec"]
    runner_rules = [rule for r in resources if r["kind"] == "Role" for rule in r["rules"]]
    return {
        "images": {image(d.parent.name) for d in (ROOT / "images").glob("*/Dockerfile")},
        "secrets": {s["metadata"]["name"]: {k for k, _ in validate.secret_values(s)}
                    for s in validate.secret_templates()},
        "readable_secrets": {n for rule in runner_rules if "secrets" in rule["resources"]
                             for n in rule["resourceNames"]},
        "can_create_pvcs": any("persistentvolumeclaims" in rule["resources"] and "create" in rule["verbs"]
                               for rule in runner_rules),
        "buckets": set(by["ConfigMap", "minio-buckets"]["data"]["buckets"].split()),
        "launcher_root": by["ConfigMap", "kfp-launcher"]["data"]["defaultPipelineRoot"],
        "services": {(r["metadata"]["name"], r["metadata"]["namespace"], p["port"])
                     for r in resources if r["kind"] == "Service" for p in r["spec"]["ports"]},
        "mlflow_hosts": next(a.split("=", 1)[1] for a in mlflow_args if a.startswith("--allowed-hosts=")).split(","),
        "gpu_node_selector": smoke["nodeSelector"],
        "gpu_tolerations": _tolerations(smoke["tolerations"]),
    }


def _tolerations(items: list[dict]) -> set[tuple]:
    return {(t.get("key", ""), t.get("operator", "Equal"), t.get("value", ""), t.get("effect", "")) for t in items}


def _strings(node) -> list[str]:
    """The string values of a compiled pipeline that configure it: parameter defaults, constants, env values.
    Descriptions and a component's command and args (its embedded source) are prose and code, not references."""
    if isinstance(node, dict):
        return [s for k, v in node.items() if k not in ("description", "command", "args") for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


# --- what a compiled pipeline refers to, and what does not match -------------------------------------


def consistency_problems(compiled: Path, deployment: dict) -> list[str]:
    """Every reference of the compiled pipeline that the deployment does not provide, as readable problems."""
    docs = [d for d in yaml.safe_load_all(compiled.read_text()) if d]
    pipeline = docs[0]
    platform = next((d["platforms"]["kubernetes"]["deploymentSpec"]["executors"] for d in docs[1:]
                     if "platforms" in d), {})
    problems = []
    executors = pipeline["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        image = executor.get("container", {}).get("image", "")
        if image and not image.startswith(KFP_STUB_IMAGE) and image not in deployment["images"]:
            problems.append(f"{name}: image {image} is not built by images/ ({sorted(deployment['images'])})")
    for name, config in platform.items():
        mounted = [(s["secretName"], [k["secretKey"] for k in s.get("keyToEnv", [])])
                   for s in config.get("secretAsEnv", [])]
        mounted += [(s["secretName"], []) for s in config.get("secretAsVolume", [])]
        for secret, keys in mounted:
            if secret not in deployment["secrets"]:
                problems.append(f"{name}: Secret {secret} is not one k8s/secrets/ defines")
                continue
            problems += [f"{name}: Secret {secret} has no key {k}"
                         for k in keys if k not in deployment["secrets"][secret]]
            if secret not in deployment["readable_secrets"]:
                problems.append(f"{name}: the pipeline runner may not read Secret {secret} (k8s/base/rbac.yaml)")
        accelerator = executors.get(name, {}).get("container", {}).get("resources", {}).get("accelerator")
        if accelerator:
            selector = config.get("nodeSelector", {}).get("labels", {})
            if selector != deployment["gpu_node_selector"]:
                problems.append(f"{name}: node selector {selector} is not the gpu overlay's "
                                f"{deployment['gpu_node_selector']} (k8s/overlays/gpu/gpu-pool.yaml)")
            tolerations = _tolerations(config.get("tolerations", []))
            if tolerations != deployment["gpu_tolerations"]:
                problems.append(f"{name}: tolerations {sorted(tolerations)} are not the gpu overlay's "
                                f"{sorted(deployment['gpu_tolerations'])} (k8s/overlays/gpu/gpu-pool.yaml)")
    if any(e.get("container", {}).get("image", "").startswith(KFP_STUB_IMAGE + "createpvc")
           for e in executors.values()) and not deployment["can_create_pvcs"]:
        problems.append("the pipeline creates a PVC, which the pipeline runner may not (k8s/base/rbac.yaml)")
    texts = _strings(docs)
    for bucket in sorted({m for t in texts for m in S3_URI.findall(t)}):
        if bucket not in deployment["buckets"]:
            problems.append(f"bucket {bucket} is not created by k8s/base/minio-buckets.yaml "
                            f"({sorted(deployment['buckets'])})")
    for service, namespace, port in sorted({m for t in texts for m in CLUSTER_URL.findall(t)}):
        if (service, namespace, int(port)) not in deployment["services"]:
            problems.append(f"{service}.{namespace}.svc.cluster.local:{port} is no Service port of k8s/")
        if service == "mlflow" and f"{service}.{namespace}.svc.cluster.local:{port}" not in deployment["mlflow_hosts"]:
            problems.append(f"MLflow's --allowed-hosts lacks {service}.{namespace}.svc.cluster.local:{port}")
    root = pipeline.get("defaultPipelineRoot", "")
    if S3_URI.match(root) is None:
        problems.append(f"the pipeline root {root!r} is not on S3")
    return problems


# --- the checks, proven on a pipeline compiled to the same conventions ---------------------------------


def _compile_probe(path: Path, *, secret="posttrain-minio", key="AWS_SECRET_ACCESS_KEY", image=None,
                   data_uri="s3://posttrain-data/models/base", endpoint="http://minio.posttrain.svc.cluster.local:9000",
                   pool=None) -> Path:
    """A two-step pipeline wired the way the cluster pipeline is: runtime and trainer images, both shared
    Secrets as environment, a workspace PVC, the MinIO and MLflow endpoints, a GPU step on the GPU pool."""
    from kfp import compiler, dsl, kubernetes

    from components.images import RUNTIME_IMAGE, TRAINER_IMAGE

    pool = pool or {"selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "posttrain/pool": "gpu-training"},
                    "tolerations": [("nvidia.com/gpu", "Exists", "", "NoSchedule"),
                                    ("posttrain/dedicated", "Equal", "gpu-training", "NoSchedule")]}

    @dsl.container_component
    def prepare(uri: str):
        return dsl.ContainerSpec(image=RUNTIME_IMAGE, command=["echo"], args=[uri])

    @dsl.container_component
    def train(uri: str):
        return dsl.ContainerSpec(image=image or TRAINER_IMAGE, command=["echo"], args=[uri])

    @dsl.pipeline(name="probe", pipeline_root="s3://posttrain-pipelines")
    def probe(base_model: str = data_uri):
        workspace = kubernetes.CreatePVC(pvc_name_suffix="-workspace", access_modes=["ReadWriteOnce"], size="1Gi")
        first = prepare(uri=base_model)
        second = train(uri=base_model).after(first)
        second.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.mount_pvc(second, pvc_name=workspace.outputs["name"], mount_path="/workspace")
        for label, value in pool["selector"].items():
            kubernetes.add_node_selector(second, label_key=label, label_value=value)
        for tkey, operator, value, effect in pool["tolerations"]:
            kubernetes.add_toleration(second, key=tkey, operator=operator, value=value or None, effect=effect)
        for task in (first, second):
            task.set_env_variable("MLFLOW_S3_ENDPOINT_URL", endpoint)
            task.set_env_variable("MLFLOW_TRACKING_URI", "http://mlflow.posttrain.svc.cluster.local:5000")
            kubernetes.use_secret_as_env(task, secret_name=secret,
                                         secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", key: key})
            kubernetes.use_secret_as_env(task, secret_name="posttrain-mlflow", secret_key_to_env={
                "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})

    compiler.Compiler().compile(probe, str(path))
    return path


def test_checks_pass_on_a_pipeline_built_to_the_conventions(tmp_path, deployment):
    assert consistency_problems(_compile_probe(tmp_path / "p.yaml"), deployment) == []


@pytest.mark.parametrize("change, problem", [
    ({"secret": "minio-credentials"}, "exec-prepare: Secret minio-credentials is not one k8s/secrets/ defines"),
    ({"key": "AWS_SECRET_KEY"}, "exec-prepare: Secret posttrain-minio has no key AWS_SECRET_KEY"),
    ({"image": "ghcr.io/posttrain/posttrain-trainer:latest"},
     "exec-train: image ghcr.io/posttrain/posttrain-trainer:latest is not built by images/"),
    ({"data_uri": "s3://posttrain-models/base"},
     "bucket posttrain-models is not created by k8s/base/minio-buckets.yaml"),
    ({"endpoint": "http://minio.storage.svc.cluster.local:9000"},
     "minio.storage.svc.cluster.local:9000 is no Service port of k8s/"),
    ({"pool": {"selector": {"posttrain/pool": "gpu"}, "tolerations": []}},
     "exec-train: node selector {'posttrain/pool': 'gpu'} is not the gpu overlay's"),
])
def test_checks_find_each_mismatch(tmp_path, deployment, change, problem):
    found = consistency_problems(_compile_probe(tmp_path / "p.yaml", **change), deployment)
    assert any(p.startswith(problem) for p in found), found


def test_a_secret_the_runner_may_not_read_is_a_mismatch(tmp_path, deployment):
    narrowed = deployment | {"readable_secrets": {"posttrain-minio"}}
    found = consistency_problems(_compile_probe(tmp_path / "p.yaml"), narrowed)
    assert "exec-prepare: the pipeline runner may not read Secret posttrain-mlflow (k8s/base/rbac.yaml)" in found


def test_a_pvc_the_runner_may_not_create_is_a_mismatch(tmp_path, deployment):
    found = consistency_problems(_compile_probe(tmp_path / "p.yaml"), deployment | {"can_create_pvcs": False})
    assert found == ["the pipeline creates a PVC, which the pipeline runner may not (k8s/base/rbac.yaml)"]


# --- the real pipeline ---------------------------------------------------------------------------


def test_compiled_cluster_pipeline_matches_the_manifests(tmp_path, deployment):
    out = tmp_path / "pipeline.yaml"
    compile_spec(ROOT / "pipelines" / "specs" / "cluster.yaml", out)
    assert consistency_problems(out, deployment) == []
    text = out.read_text()
    # it does refer to the deployment: both shared Secrets, the pipeline bucket, the trainer image
    for expected in ("posttrain-minio", "posttrain-mlflow", "s3://posttrain-pipelines", "posttrain-trainer"):
        assert expected in text
