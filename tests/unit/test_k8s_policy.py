"""k8s/: every kustomize target renders, validates against the Kubernetes schemas and meets the policies;
and each policy check fires on a manifest that breaks it (k8s/validate.py, also `make k8s-validate`)."""

from __future__ import annotations

import base64
import copy

import pytest
import yaml
from k8s_tools import ROOT, load_validate

validate = load_validate()

SHARED_SECRETS = {
    "posttrain-minio": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "posttrain-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
}


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return validate.render(ROOT / "k8s" / "base")


def _find(resources: list[dict], kind: str, name: str) -> dict:
    return copy.deepcopy(next(r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name))


@pytest.fixture
def mlflow(base) -> dict:
    """A good Deployment to break: the MLflow server."""
    deployment = _find(base, "Deployment", "mlflow")
    assert validate.policy_violations([deployment]) == []
    return deployment


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


# --- the manifests as committed --------------------------------------------------------------------


def test_targets_are_base_and_every_overlay():
    assert [t.relative_to(ROOT / "k8s").as_posix() for t in validate.targets()] == [
        "base", "overlays/external-s3", "overlays/gpu", "overlays/kserve", "overlays/kubeflow-profile",
        "overlays/kueue", "overlays/standalone-kfp", "overlays/standalone-kfp-kueue", "overlays/trainer",
        "overlays/workspace-fsgroup"]


@pytest.mark.parametrize("target, least", [
    ("base", 14), ("overlays/external-s3", 14), ("overlays/gpu", 14), ("overlays/kubeflow-profile", 14),
    ("overlays/kueue", 14),  # external-s3: the base (no Namespace) without MinIO, its Service, Job, ConfigMap, policy
    ("overlays/standalone-kfp", 9), ("overlays/standalone-kfp-kueue", 12)])  # the runner's part, in kubeflow
def test_target_renders_validates_and_meets_policies(target, least):
    count, problems = validate.check(ROOT / "k8s" / target)
    assert problems == []
    assert count >= least


def test_external_s3_overlay_drops_minio_and_points_everything_elsewhere():
    resources = validate.render(ROOT / "k8s" / "overlays" / "external-s3")
    assert not [r for r in resources if r["metadata"]["name"] in ("minio", "minio-buckets")]
    text = yaml.safe_dump(resources)
    assert "minio:9000" not in text and "minio.posttrain" not in text  # the Secret keeps its shared name
    assert "s3.us-east-1.amazonaws.com" in text


CLUSTER_SCOPED = {"Namespace", "ClusterQueue", "ResourceFlavor", "ClusterRole", "ClusterRoleBinding"}


@pytest.mark.parametrize("target", ["overlays/kueue", "overlays/trainer"])
def test_every_namespaced_resource_is_in_namespace_posttrain(target):
    """`kubectl apply -k` puts a resource that names no namespace in kubectl's current one, wherever that is."""
    for resource in validate.render(ROOT / "k8s" / target):
        if resource["kind"] not in CLUSTER_SCOPED:
            assert resource["metadata"].get("namespace") == "posttrain", validate.name_of(resource)


@pytest.mark.parametrize("target", ["overlays/standalone-kfp", "overlays/standalone-kfp-kueue"])
def test_standalone_overlays_put_the_runners_part_in_kubeflow_and_no_service(target):
    """Standalone KFP runs the pods and their TrainJobs in kubeflow: the runner's account and Roles, the launcher
    config, the TrainingRuntime (and the LocalQueue) go there; MinIO, Postgres and MLflow stay in posttrain."""
    resources = validate.render(ROOT / "k8s" / target)
    for resource in resources:
        if resource["kind"] not in CLUSTER_SCOPED:
            assert resource["metadata"].get("namespace") == "kubeflow", validate.name_of(resource)
    names = {validate.name_of(r) for r in resources}
    assert {"ServiceAccount/posttrain-pipeline-runner", "ConfigMap/kfp-launcher", "TrainingRuntime/posttrain-trainer",
            "Role/posttrain-trainjobs", "Role/posttrain-pipeline-secrets"} <= names
    assert not [r for r in resources if r["kind"] in ("Service", "StatefulSet", "Deployment", "Job",
                                                      "NetworkPolicy")]
    binding = next(r for r in resources if validate.name_of(r) == "RoleBinding/posttrain-trainjobs")
    assert {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"} in binding["subjects"]
    if target.endswith("kueue"):
        (queue,) = [r for r in resources if r["kind"] == "LocalQueue"]
        assert queue["metadata"]["namespace"] == "kubeflow"
        (cluster_queue,) = [r for r in resources if r["kind"] == "ClusterQueue"]
        assert not cluster_queue["metadata"].get("namespace")


def test_the_cluster_queue_admits_posttrain_and_kubeflow():
    resources = validate.render(ROOT / "k8s" / "overlays" / "kueue")
    (cluster_queue,) = [r for r in resources if r["kind"] == "ClusterQueue"]
    assert cluster_queue["spec"]["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["posttrain", "kubeflow"]}]}


def test_versioned_buckets_expire_noncurrent_versions(base):
    """Versioning keeps every overwritten object: each bucket gets a lifecycle rule expiring noncurrent versions
    (mc ilm rule add --noncurrent-expire-days), added once (a re-run of the Job finds it)."""
    config = _find(base, "ConfigMap", "minio-buckets")["data"]
    script = config["create.sh"]
    start = script.index("for bucket in")
    loop = script[start:script.index("\ndone", start)]
    assert 'mc version enable "store/$bucket"' in loop
    assert 'mc ilm rule add --noncurrent-expire-days "$(cat /config/noncurrent-expire-days)" "store/$bucket"' in loop
    assert 'mc ilm rule export "store/$bucket"' in loop and "grep -q NoncurrentDays" in loop
    assert int(config["noncurrent-expire-days"]) >= 1


def test_secret_templates_define_the_shared_secrets_with_placeholders_only():
    templates = validate.secret_templates()
    assert validate.schema_errors(templates) == []
    assert validate.policy_violations(templates) == []
    keys = {s["metadata"]["name"]: {k for k, _ in validate.secret_values(s)} for s in templates}
    for name, wanted in SHARED_SECRETS.items():
        assert keys[name] == wanted
    assert all(s["metadata"]["namespace"] == "posttrain" for s in templates)


def test_no_secret_is_applied_by_kustomize():
    """Applying the manifests must never overwrite the real Secrets created in the cluster."""
    for target in validate.targets():
        assert [r for r in validate.render(target) if r["kind"] == "Secret"] == []


def test_pipeline_runner_reads_only_the_two_shared_secrets(base):
    rules = [rule for r in base if r["kind"] == "Role" for rule in r["rules"] if "secrets" in rule["resources"]]
    assert rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": sorted(SHARED_SECRETS),
                      "verbs": ["get"]}]
    bound = {b["roleRef"]["name"] for b in base if b["kind"] == "RoleBinding"
             for s in b["subjects"] if s["name"] == "posttrain-pipeline-runner"}
    assert {r["metadata"]["name"] for r in base if r["kind"] == "Role"} <= bound


def test_postgres_and_minio_admit_only_mlflow_and_pipeline_pods(base):
    policies = {r["metadata"]["name"]: r for r in base if r["kind"] == "NetworkPolicy"}
    postgres_peers = policies["postgres"]["spec"]["ingress"][0]["from"]
    assert postgres_peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    minio_peers = policies["minio"]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}} in minio_peers
    assert {"namespaceSelector": {"matchLabels": {"posttrain.io/pipeline-runs": "true"}},
            "podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}} in minio_peers
    assert all(p.get("podSelector") for p in minio_peers)  # no peer admits a whole namespace


@pytest.mark.parametrize("target", ["base", "overlays/kubeflow-profile"])
def test_minio_and_mlflow_admit_trainjob_nodes_in_their_own_namespace(target):
    """A TrainJob's pods carry the runtime template's labels (kubeflow/trainer
    pkg/runtime/framework/plugins/jobset/builder.go), not KFP's v2_component: the runtime labels them, and MinIO and
    MLflow admit that label from their own namespace (tests/cluster/test_installs.py checks every install)."""
    runtime = next(r for r in validate.render(ROOT / "k8s" / "overlays" / "trainer") if r["kind"] == "TrainingRuntime")
    template = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert template["metadata"]["labels"]["posttrain.io/trainjob-node"] == "true"
    rendered = validate.render(ROOT / "k8s" / target)
    policies = {r["metadata"]["name"]: r for r in rendered if r["kind"] == "NetworkPolicy"}
    for name in ("minio", "mlflow"):
        peers = policies[name]["spec"]["ingress"][0]["from"]
        assert {"podSelector": {"matchLabels": {"posttrain.io/trainjob-node": "true"}}} in peers, name


# --- each policy fires ---------------------------------------------------------------------------


@pytest.mark.parametrize("image, why", [
    ("ghcr.io/posttrain/posttrain-mlflow:latest", "uses the tag `latest`"),
    ("ghcr.io/posttrain/posttrain-mlflow", "has no tag"),
    ("registry.local:5000/posttrain-mlflow", "has no tag"),
])
def test_unpinned_image_is_a_violation(mlflow, image, why):
    _container(mlflow)["image"] = image
    assert validate.policy_violations([mlflow]) == [
        f"Deployment/mlflow: container mlflow: image {image!r} {why} (pin a release tag or a digest)"]


def test_image_pinned_by_digest_is_fine(mlflow):
    _container(mlflow)["image"] = "ghcr.io/posttrain/posttrain-mlflow@sha256:" + "0" * 64
    assert validate.policy_violations([mlflow]) == []


@pytest.mark.parametrize("drop, message", [
    (("limits",), "has no limits for cpu, memory"),
    (("requests",), "has no requests for cpu, memory"),
    (("requests", "memory"), "has no requests for memory"),
    (("limits", "cpu"), "has no limits for cpu"),
])
def test_missing_resources_are_a_violation(mlflow, drop, message):
    resources = _container(mlflow)["resources"]
    if len(drop) == 1:
        del resources[drop[0]]
    else:
        del resources[drop[0]][drop[1]]
    assert validate.policy_violations([mlflow]) == [f"Deployment/mlflow: container mlflow: {message}"]


def _pod(d):
    return d["spec"]["template"]["spec"]


@pytest.mark.parametrize("breaks, message", [
    (lambda d: _pod(d)["securityContext"].pop("runAsNonRoot"), "may run as root"),
    (lambda d: _container(d)["securityContext"].update(runAsNonRoot=False), "may run as root"),
    (lambda d: _container(d)["securityContext"].update(runAsUser=0), "runs as root: runAsUser is 0"),
    (lambda d: _container(d)["securityContext"].update(privileged=True), "is privileged"),
    (lambda d: _container(d)["securityContext"].pop("allowPrivilegeEscalation"), "allows privilege escalation"),
    (lambda d: _container(d)["securityContext"].pop("capabilities"), "keeps Linux capabilities"),
    (lambda d: _pod(d)["securityContext"].pop("seccompProfile"), "has no seccomp profile"),
    (lambda d: _pod(d).pop("securityContext"), "may run as root"),
])
def test_root_or_unrestricted_container_is_a_violation(mlflow, breaks, message):
    breaks(mlflow)
    found = validate.policy_violations([mlflow])
    assert found and all(f.startswith("Deployment/mlflow: container mlflow: ") for f in found)
    assert any(message in f for f in found), found


def test_init_containers_are_checked_too(mlflow):
    _pod(mlflow)["initContainers"] = [{"name": "setup", "image": "busybox:latest"}]
    found = validate.policy_violations([mlflow])
    assert "Deployment/mlflow: container setup: image 'busybox:latest' uses the tag `latest` " \
           "(pin a release tag or a digest)" in found
    assert any("container setup: has no limits" in f for f in found)


def _secret(**values) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "posttrain-minio", "namespace": "posttrain"},
            "type": "Opaque", **values}


@pytest.mark.parametrize("secret", [
    _secret(stringData={"AWS_SECRET_ACCESS_KEY": "minioadmin"}),
    _secret(stringData={"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE"}),
    _secret(data={"AWS_SECRET_ACCESS_KEY": base64.b64encode(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY").decode()}),
    _secret(stringData={"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "hunter2hunter2"}),
])
def test_secret_with_real_looking_credentials_is_a_violation(secret):
    found = validate.policy_violations([secret])
    assert len(found) == 1 and found[0].startswith("Secret/posttrain-minio: ") and "looks real" in found[0]


def test_secret_with_placeholders_is_fine():
    encoded = base64.b64encode(b"REPLACE_ME").decode()
    assert validate.policy_violations([_secret(stringData={"A": "REPLACE_ME_LONG"}, data={"B": encoded})]) == []


def test_literal_credential_in_env_is_a_violation(mlflow):
    _container(mlflow)["env"].append({"name": "MINIO_ROOT_PASSWORD", "value": "s3cr3t-value"})
    assert validate.policy_violations([mlflow]) == [
        "Deployment/mlflow: container mlflow: sets the credential MINIO_ROOT_PASSWORD to a literal value "
        "(use valueFrom.secretKeyRef)"]


def test_unknown_secret_or_key_is_a_violation(mlflow):
    env = _container(mlflow)["env"]
    env.append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "posttrain-minio", "key": "TYPO"}}})
    env.append({"name": "Y", "valueFrom": {"secretKeyRef": {"name": "posttrain-s3", "key": "AWS_ACCESS_KEY_ID"}}})
    assert validate.reference_problems([mlflow], validate.secret_templates()) == [
        "Deployment/mlflow: container mlflow: reads key TYPO of Secret posttrain-minio, which k8s/secrets/ "
        "does not define",
        "Deployment/mlflow: container mlflow: reads key AWS_ACCESS_KEY_ID of Secret posttrain-s3, which k8s/secrets/ "
        "does not define"]


def test_launcher_config_secret_is_checked(base):
    launcher = _find(base, "ConfigMap", "kfp-launcher")
    assert validate.reference_problems([launcher], validate.secret_templates()) == []
    launcher["data"]["providers"] = launcher["data"]["providers"].replace('"posttrain-minio"', '"minio-creds"')
    assert len(validate.reference_problems([launcher], validate.secret_templates())) == 2


def test_schema_rejects_an_unknown_field(mlflow):
    _container(mlflow)["imagePullPolice"] = "Always"
    errors = validate.schema_errors([mlflow])
    assert len(errors) == 2 and all("imagePullPolice" in e for e in errors), errors
    assert [e.split(" schema:")[0] for e in errors] == [
        "Deployment/mlflow: Kubernetes 1.31", "Deployment/mlflow: Kubernetes 1.37"]


def test_schema_rejects_a_wrong_type(mlflow):
    mlflow["spec"]["replicas"] = "one"
    assert validate.schema_errors([mlflow], versions=("1.37",)) == [
        "Deployment/mlflow: Kubernetes 1.37 schema: spec.replicas: 'one' is not of type 'integer', 'null'"]


def test_schema_rejects_an_unknown_kind():
    thing = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    [error] = validate.schema_errors([thing], versions=("1.37",))
    assert error.startswith("Widget/w: Couldn't find schema for kind Widget")


def test_kueue_references_are_checked():
    resources = validate.render(ROOT / "k8s" / "overlays" / "kueue")
    queue = next(r for r in resources if r["kind"] == "LocalQueue")
    queue["spec"]["clusterQueue"] = "elsewhere"
    assert validate.reference_problems(resources, validate.secret_templates()) == [
        "LocalQueue/posttrain-gpu: spec.clusterQueue 'elsewhere' is no ClusterQueue rendered here"]


def test_a_bad_overlay_fails_the_command(tmp_path, capsys, mlflow):
    """What `make k8s-validate` runs: a kustomize directory with a bad Deployment makes it exit 1."""
    container = _container(mlflow)
    container["image"] = "ghcr.io/posttrain/posttrain-mlflow:latest"
    del container["resources"]
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(mlflow))
    (tmp_path / "kustomization.yaml").write_text("resources: [deployment.yaml]\n")
    assert validate.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "uses the tag `latest`" in out and "has no requests for cpu, memory" in out
    assert "3 problem(s) in 1 kustomize target(s)" in out


def test_the_committed_targets_pass_the_command(capsys):
    assert validate.main([]) == 0
    assert f"0 problem(s) in {len(validate.targets())} kustomize target(s)" in capsys.readouterr().out
