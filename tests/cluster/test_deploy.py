"""Serving the champion on KServe against the emulated cluster (tests/cluster/kube.py): the InferenceService the
deploy stage makes (components/kserve.py) as the pipeline runner of a rendered install with k8s/overlays/kserve,
checked by the pinned KServe CRD schema and KServe's webhook rules, reconciled by the emulated controller, whose
predictor pod downloads the registered version from S3 with its service account's Secret through the network's
policies (the model server itself, vLLM, is not run: the files it would load must be there). Also: the deadline,
RBAC and NetworkPolicy refusals, and `posttrain models rollback` pointing the InferenceService back.

The registry is the session's MLflow server, whose artifacts are proxied to the session's S3 (tests/conftest.py),
as k8s/base's MLflow proxies them to MinIO."""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest

from cluster import installs
from cluster.kserve_env import NS, READER, REPO, RUNNER, emulated_kserve, kserve_objects, validate
from cluster.kube import rbac_allows
from cluster.network import Network
from components import kserve
from components.deploy.config import DeployConfig
from components.trainjob import API_ENV

SERVER_POD = {"posttrain.io/model-server": "true", "sidecar.istio.io/inject": "false",
              "serving.kserve.io/inferenceservice": "m", "component": "predictor", "app": "isvc.m-predictor"}


@pytest.fixture
def cluster(tmp_path, monkeypatch, s3_server, secrets):
    """The emulated API (plain install + kserve overlay) with MinIO behind the network's policies; the process
    talks to it as the pipeline runner."""
    with emulated_kserve(tmp_path / "cluster", s3_server[1], secrets, monkeypatch) as api:
        yield api


@pytest.fixture(scope="module")
def versions(tmp_path_factory, servers, tiny_model_dir):
    """A registered model with two versions, v1 then v2 champion (registered through the register stage)."""
    import os

    from mlflow import MlflowClient

    from components import promotion
    from components.config import from_mapping
    from components.register.config import RegisterConfig
    from components.register.main import run

    before = {k: os.environ.get(k) for k in servers.env}
    os.environ.update(servers.env)
    try:
        client, name, tmp = MlflowClient(), f"deploy-{time.time_ns()}", tmp_path_factory.mktemp("versions")
        parent = client.create_run(client.create_experiment(name)).info.run_id
        for i in (1, 2):
            (tmp / f"e{i}.json").write_text(json.dumps({"metrics": {"a/accuracy": 0.2 * i}}))
            cfg = {"model": str(tiny_model_dir), "name": name, "eval": str(tmp / f"e{i}.json"),
                   "output_dir": str(tmp / f"r{i}"), "parent_run_id": parent}
            run(from_mapping(RegisterConfig, cfg, "register"))
            promotion.promote(name, str(i), reason=f"test v{i}", client=client)
        return name
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serving(name: str, **overrides) -> kserve.Serving:
    """The deploy stage's defaults (components/deploy/config.py) but for `overrides`, unchecked: a test may ask for
    what the stage's config refuses, to see the cluster refuse it."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(DeployConfig) if f.name in kserve.Serving.__dataclass_fields__
                and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
    values = dict(name=name, service="m", namespace=NS, cpu="2", memory="8Gi", timeout=20, poll_seconds=0.1)
    return kserve.Serving(**{**defaults, **values, **overrides})


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _champion(client, name: str, version: str) -> None:
    """Make `version` champion (the tests of this module share the registered model)."""
    from components import promotion

    if promotion.alias_version(client, name, promotion.CHAMPION) != version:
        promotion.promote(name, version, reason="test setup", client=client)


# --- the manifests against the pinned CRDs ---------------------------------------------------------------------


def test_the_inferenceservice_and_servingruntime_validate_against_the_pinned_crds():
    uri = "s3://posttrain-mlflow/1/models/m-1/artifacts"
    for serving in (_serving("m"), _serving("m", deployment_mode="Knative", canary_traffic_percent=10,
                                           accelerator="nvidia.com/gpu", node_selector={"pool": "gpu"},
                                           tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                                         "effect": "NoSchedule"}])):
        assert validate.crd_errors(kserve.manifest(serving, "3", uri)) == []
    count, problems = validate.check(REPO / "k8s" / "overlays" / "kserve")
    assert problems == [] and count == 7
    runtime = next(r for r in validate.render(REPO / "k8s" / "overlays" / "kserve") if r["kind"] == "ServingRuntime")
    assert validate.crd_errors(runtime) == []
    # what the schema refuses
    bad = kserve.manifest(_serving("m"), "3", uri)
    bad["spec"]["predictor"]["model"]["storageURI"] = uri
    assert any("storageURI" in e for e in validate.crd_errors(bad))
    bad = kserve.manifest(_serving("m"), "3", uri)
    bad["spec"]["predictor"]["canaryTrafficPercent"] = "10"
    assert any("canaryTrafficPercent" in e for e in validate.crd_errors(bad))
    broken = copy.deepcopy(runtime)
    broken["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot")
    assert validate.policy_violations([broken]) == [
        "ServingRuntime/posttrain-vllm: container kserve-container: may run as root: set runAsNonRoot: true (pod or "
        "container securityContext)"]


# --- RBAC and the network ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("install", ["plain", "profile"])
def test_the_runner_may_create_get_and_patch_inferenceservices_and_nothing_more(install):
    objects, _ = kserve_objects(install)
    runner = (NS, RUNNER)
    for verb in ("create", "get", "patch"):
        assert rbac_allows(objects, NS, runner, verb, "serving.kserve.io", "inferenceservices", "m")
    for verb in ("delete", "list", "watch", "update", "deletecollection"):
        assert not rbac_allows(objects, NS, runner, verb, "serving.kserve.io", "inferenceservices", "m"), verb
    assert not rbac_allows(objects, "kubeflow", runner, "create", "serving.kserve.io", "inferenceservices")
    assert not rbac_allows(objects, NS, runner, "create", "serving.kserve.io", "servingruntimes")
    assert not rbac_allows(objects, NS, runner, "get", "", "secrets", READER)
    # without the overlay's Role the runner may not
    without = [o for o in objects if o["metadata"].get("name") != "posttrain-inferenceservices"]
    assert not rbac_allows(without, NS, runner, "patch", "serving.kserve.io", "inferenceservices", "m")


@pytest.mark.parametrize("install", ["plain", "profile"])
def test_the_predictor_pods_reach_minio_and_nothing_else_new(install):
    objects, namespaces = kserve_objects(install)
    rendered = installs.render(install)
    net = Network(objects, {**namespaces, "elsewhere": {}})
    minio, mlflow = rendered.services["minio"], rendered.services["mlflow"]
    assert net.allowed(NS, SERVER_POD, NS, minio.labels, minio.port, src_service_account="posttrain-model-reader") \
        == (True, "allowed")
    assert not net.allowed(NS, SERVER_POD, NS, mlflow.labels, mlflow.port)[0]  # MLflow: not for the model server
    assert not net.allowed("elsewhere", SERVER_POD, NS, minio.labels, minio.port)[0]  # only this namespace's
    assert not net.allowed(NS, SERVER_POD, NS, minio.labels, 9001)[0]  # MinIO's console: no
    without = [o for o in objects if o["metadata"].get("name") != "minio-model-servers"]
    ok, why = Network(without, namespaces).allowed(NS, SERVER_POD, NS, minio.labels, minio.port)
    assert not ok and "ingress of posttrain" in why


# --- deploy, patch, roll back ------------------------------------------------------------------------------------


def test_deploy_then_canary_then_rollback(cluster, versions, tracking_env, secrets, capsys):
    from components import promotion
    from components.trainjob import kube_client
    from pipelines import models

    name, client = versions, _client()
    _champion(client, name, "2")
    record = kserve.deploy(kube_client(), _serving(name), client, "1", via="test")
    assert record["action"] == "created" and record["url"] == f"http://m-{NS}.example.com"
    assert record["storage_uri"].startswith("s3://posttrain-mlflow/") and record["previous"] is None
    assert client.get_model_version(name, "1").tags[kserve.URL_TAG] == record["url"]
    (pod,) = cluster.list("pods", NS, selector="serving.kserve.io/inferenceservice=m")
    assert pod["metadata"]["labels"]["posttrain.io/model-server"] == "true"
    assert pod["spec"]["serviceAccountName"] == "posttrain-model-reader"
    env = pod["spec"]["initContainers"][0]["env"]
    assert {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": READER,
                                                                             "key": "AWS_SECRET_ACCESS_KEY"}}} in env
    assert {"name": "S3_ENDPOINT", "value": "minio.posttrain.svc.cluster.local:9000"} in env
    (download,) = cluster.kserve_downloads
    assert download[1] == record["storage_uri"] and "config.json" in download[2]
    assert cluster.network.denied == []
    # Ready is not enough: the Ready predictor pods must serve the version waited for
    services = kserve.InferenceServices(kube_client(), NS)
    assert services.serving("m", record["storage_uri"]) and not services.serving("m", "s3://posttrain-mlflow/v9")
    with pytest.raises(kserve.DeployFailed, match=r"^InferenceService posttrain/m was not Ready within 1s \(deploy "
                                                  r"timeout\): Ready=True, but no Ready predictor pod serves "
                                                  r"s3://posttrain-mlflow/v9 yet"):
        services.wait_ready("m", kserve.Rollout(uri="s3://posttrain-mlflow/v9"), 1, 0.1)

    # v2 as a canary: a patch (Knative mode from the start), the previous revision keeps 80%
    cluster.kserve_downloads.clear()
    knative = _serving(name, deployment_mode="Knative")
    with pytest.raises(kserve.DeployFailed, match="deploymentMode cannot be changed from 'Standard' to 'Knative'"):
        kserve.deploy(kube_client(), knative, client, "2", via="test")
    canary = _serving(name, service="m2", deployment_mode="Knative")
    kserve.deploy(kube_client(), canary, client, "1", via="test")
    record = kserve.deploy(kube_client(), _serving(name, service="m2", deployment_mode="Knative",
                                                   canary_traffic_percent=20), client, "2", via="test")
    assert record["action"] == "patched" and record["previous"] == "1"
    traffic = cluster.get("inferenceservices", NS, "m2", "serving.kserve.io")["status"]["components"]["predictor"]
    assert [(t["revisionName"], t["percent"]) for t in traffic["traffic"]] == [("m2-predictor-00002", 20),
                                                                               ("m2-predictor-00001", 80)]
    v2_uri = record["storage_uri"]
    # the previous revision keeps its Ready pods (and 80% of the traffic): only the new revision's were checked
    pods = {p["metadata"]["labels"]["serving.knative.dev/revision"]: p
            for p in cluster.list("pods", NS, selector="serving.kserve.io/inferenceservice=m2")}
    assert sorted(pods) == ["m2-predictor-00001", "m2-predictor-00002"]
    assert pods["m2-predictor-00002"]["spec"]["initContainers"][0]["args"][0] == v2_uri
    assert pods["m2-predictor-00001"]["spec"]["initContainers"][0]["args"][0] != v2_uri
    assert pods["m2-predictor-00001"]["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert not services.serving("m2", v2_uri) and services.serving("m2", v2_uri, "m2-predictor-00002")

    # posttrain models rollback: champion v2 → v1, and the InferenceService with it (all traffic, v1's files)
    assert models.main(["rollback", "--name", name, "--to", "1", "--reason", "canary regressed"]) == 0
    out = capsys.readouterr().out
    assert f"{name}: champion v2 -> v1 (rollback)" in out
    assert f"InferenceService {NS}/m2 v2 -> v1 at http://m2-{NS}.example.com" in out
    isvc = cluster.get("inferenceservices", NS, "m2", "serving.kserve.io")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] != v2_uri
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["labels"][kserve.VERSION_LABEL] == "1"
    assert [t["percent"] for t in isvc["status"]["components"]["predictor"]["traffic"]] == [100]
    trail = promotion.audit_log(client, name)
    assert [(r["action"], r["previous"], r["version"]) for r in trail[-2:]] == [
        ("rollback", "2", "1"), ("rollback-deployment", "2", "1")]
    assert trail[-1]["service"] == f"{NS}/m2" and trail[-1]["reason"] == "canary regressed"
    # no credential anywhere the step writes: the objects, the registry's tags
    written = json.dumps(cluster.kserve_writes) + json.dumps(client.get_registered_model(name).tags)
    written += json.dumps([v.tags for v in client.search_model_versions(f"name='{name}'")])
    assert not [k for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID") if secrets[k] in written]


def _without_patch(objects: list[dict]) -> list[dict]:
    """The objects with the overlay's Role for InferenceServices lacking the verb `patch`."""
    out = copy.deepcopy(objects)
    role = next(o for o in out if o["kind"] == "Role" and o["metadata"]["name"] == "posttrain-inferenceservices")
    for rule in role["rules"]:
        rule["verbs"] = [v for v in rule["verbs"] if v != "patch"]
    return out


def test_a_rollback_whose_inferenceservice_cannot_follow_fails_and_says_so(cluster, versions, tracking_env):
    """The runner's Role without `patch`: the alias moves, the InferenceService does not, the CLI says so in one line
    and the trail records the failure."""
    from components import promotion
    from components.trainjob import kube_client

    name, client = versions, _client()
    _champion(client, name, "2")
    kserve.deploy(kube_client(), _serving(name, service="m3"), client, "2", via="test")
    cluster.rbac = type(cluster.rbac)(_without_patch(cluster.rbac_objects))
    with pytest.raises(kserve.DeployFailed) as failed:
        promotion.rollback(name, to="1", reason="bad", client=client)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"{name}: champion is v1, but its InferenceService was not "
                                                      f"pointed back: patching InferenceService {NS}/m3 failed: 403")
    assert 'cannot patch resource "inferenceservices" in API group "serving.kserve.io"' in message
    assert promotion.audit_log(client, name)[-1]["action"] == "rollback-deployment-failed"


def test_a_rollback_without_a_kubernetes_api_is_one_line_and_recorded(cluster, versions, tracking_env, monkeypatch,
                                                                       tmp_path, capsys):
    """No POSTTRAIN_KUBE_API, no service account, no kubeconfig: the alias moves, the CLI says why the
    InferenceService did not follow in one line, and the trail records it."""
    from components import promotion
    from components.trainjob import kube_client
    from pipelines import models

    name, client = versions, _client()
    _champion(client, name, "2")
    kserve.deploy(kube_client(), _serving(name, service="m4"), client, "2", via="test")
    monkeypatch.delenv(API_ENV)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert models.main(["rollback", "--name", name, "--to", "1", "--reason", "no api"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"posttrain models rollback: {name}: champion is v1, but its "
                                              "InferenceService was not pointed back: no Kubernetes API to reach: ")
    assert promotion.audit_log(client, name)[-1]["action"] == "rollback-deployment-failed"
    assert promotion.alias_version(client, name, promotion.CHAMPION) == "1"


def test_an_unreachable_or_hung_api_fails_in_one_line_within_the_deadline(versions, tracking_env):
    """A refused connection, and an API server that accepts and never answers: DeployFailed, one line, and the hung
    one within the deadline (each call's timeout), not when the socket gives up."""
    import socket

    from kubernetes import client

    def api(port: int):
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{port}"
        configuration.retries = 0
        return client.ApiClient(configuration)

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(kserve.DeployFailed) as failed:
        kserve.deploy(api(port), _serving(versions, service="gone", timeout=5), _client(), "2", via="test")
    assert "\n" not in str(failed.value) and str(failed.value).startswith(
        f"reading InferenceService {NS}/gone failed: ")
    hung = socket.socket()  # listening, never accepting: the connection opens, no answer ever comes
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        start = time.monotonic()
        with pytest.raises(kserve.DeployFailed) as failed:
            kserve.deploy(api(hung.getsockname()[1]), _serving(versions, service="hung", timeout=2), _client(), "2",
                          via="test")
        elapsed = time.monotonic() - start
    finally:
        hung.close()
    assert "\n" not in str(failed.value) and str(failed.value).startswith(
        f"reading InferenceService {NS}/hung failed: ") and "timed out" in str(failed.value).lower()
    assert elapsed < 6


# --- the controller's and the webhook's refusals ------------------------------------------------------------------


def test_an_inferenceservice_that_never_becomes_ready_fails_within_the_deadline(cluster, versions, tracking_env):
    """A GPU node pool the spec does not tolerate: the predictor pod is never scheduled."""
    from components.trainjob import kube_client

    cluster.nodes = [{"name": "gpu-1", "labels": {"pool": "gpu"}, "allocatable": {"nvidia.com/gpu": "8"},
                      "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}]
    serving = _serving(versions, service="late", accelerator="nvidia.com/gpu", node_selector={"pool": "gpu"},
                       timeout=3)
    start = time.monotonic()
    with pytest.raises(kserve.DeployFailed) as failed:
        kserve.deploy(kube_client(), serving, _client(), "2", via="test")
    elapsed = time.monotonic() - start
    assert str(failed.value) == (f"InferenceService {NS}/late was not Ready within 3s (deploy timeout): "
                                 "PredictorReady=False (MinimumReplicasUnavailable: Deployment does not have minimum "
                                 "availability.)")
    assert 3 <= elapsed < 8  # the deadline, and the registry and API calls before the wait
    (pod,) = cluster.list("pods", NS, selector="serving.kserve.io/inferenceservice=late")
    assert pod["status"]["conditions"][0]["message"] == ("0/1 nodes are available: 1 node(s) had untolerated taint "
                                                         "{nvidia.com/gpu: present}.")
    # the spec's tolerations: scheduled, Ready
    tolerated = _serving(versions, service="late", accelerator="nvidia.com/gpu", node_selector={"pool": "gpu"},
                         tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert kserve.deploy(kube_client(), tolerated, _client(), "2", via="test")["action"] == "patched"


def test_a_predictor_minio_refuses_never_becomes_ready(cluster, versions, tracking_env):
    """Without the overlay's NetworkPolicy the storage initializer's connection is refused: the model fails to load,
    and the step names it."""
    from components.trainjob import kube_client

    net = cluster.network
    net.network_policies = [p for p in net.network_policies if p["metadata"]["name"] != "minio-model-servers"]
    with pytest.raises(kserve.DeployFailed) as failed:
        kserve.deploy(kube_client(), _serving(versions, service="cut", timeout=4), _client(), "2", via="test")
    assert "PredictorReady=False" in str(failed.value) and "model: ModelLoadFailed: " in str(failed.value)
    assert net.denied and all("cut-predictor-00001 → minio.posttrain.svc.cluster.local:9000" in d for d in net.denied)


def _create(body: dict, strict: bool = True):
    """Create as the deploy step does (fieldValidation=Strict), or with the API server's default."""
    from kubernetes import client

    from components.trainjob import kube_client

    return client.CustomObjectsApi(kube_client()).create_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", NS, "inferenceservices", body,
        **({"field_validation": "Strict"} if strict else {}))


def _canary(name: str, percent: int = 10) -> dict:
    """An entry of spec.canary (KServe v0.20's canary predictors, Standard mode) the schema takes."""
    return {"trafficPercent": percent, "predictor": {"name": name, "model": {
        "name": name, "modelFormat": {"name": "huggingface"}, "storageUri": "s3://b/k"}}}


@pytest.mark.parametrize("change, code, message", [
    (lambda m: m["metadata"].update(name="9lives"), 403, 'the InferenceService "9lives" is invalid: a '
     "InferenceService name must consist of lower case alphanumeric characters or '-'"),
    (lambda m: m["spec"]["predictor"]["model"].update(env=[{"name": "PYTHONPATH", "value": "/x"}]), 403,
     'setting PYTHONPATH in container "kserve-container" is not allowed for security reasons'),
    (lambda m: m["spec"]["predictor"].update(huggingface={"storageUri": "s3://b/k"}), 403,
     "exactly one of [Name, SKLearn, XGBoost, Tensorflow, PyTorch, Triton, ONNX, HuggingFace, PMML, LightGBM, Paddle, "
     "Model, StorageUris, StorageContainerName, WorkerSpec, PodSpec] must be specified in PredictorSpec"),
    (lambda m: m["spec"]["predictor"]["model"].update(name="x"), 403,
     "the 'name' field is not allowed in standard predictor"),
    (lambda m: m["spec"]["predictor"].update(minReplicas=3, maxReplicas=2), 403,
     "'MinReplicas' cannot be greater than MaxReplicas"),
    (lambda m: m["metadata"]["annotations"].update({"serving.kserve.io/autoscalerClass": "kpa"}), 403,
     "[kpa] is not a supported autoscaler class type"),
    (lambda m: m["spec"]["predictor"].update(replicas=2), 400, 'InferenceService in version "v1beta1" cannot be '
     'handled as a InferenceService: strict decoding error: unknown field "spec.predictor.replicas"'),
    (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent="10"), 422, "spec.predictor.canaryTrafficPercent"),
    (lambda m: m["spec"].update(canary=[_canary("c")]) or m["metadata"].pop("annotations"), 403,
     "canary is only supported in Standard deployment mode"),  # no annotation: not Standard, whatever the default
    (lambda m: m["spec"].update(canary=[_canary("c", 60), _canary("d", 50)]), 403,
     "sum of canary trafficPercent values (110) must be <= 100"),
    (lambda m: m["spec"].update(canary=[_canary("c"), _canary("c")]), 403, 'canary predictor.name "c" is duplicated'),
])
def test_the_webhook_and_the_schema_refuse_what_kserve_refuses(cluster, change, code, message):
    from kubernetes.client.exceptions import ApiException

    body = kserve.manifest(_serving("m"), "1", "s3://posttrain-mlflow/1/models/m-1/artifacts")
    change(body)
    with pytest.raises(ApiException) as refused:
        _create(body)
    assert refused.value.status == code and message in json.loads(refused.value.body)["message"]
    assert cluster.kserve_writes == []


def test_the_controller_refuses_a_missing_runtime_or_service_account(cluster, versions, tracking_env):
    from components.trainjob import kube_client

    with pytest.raises(kserve.DeployFailed, match=r"PredictorReady=False \(RuntimeNotRecognized: "
                                                  r'servingruntimes.serving.kserve.io "nope" not found\)'):
        kserve.deploy(kube_client(), _serving(versions, service="r", runtime="nope", timeout=2), _client(), "1",
                      via="test")
    with pytest.raises(kserve.DeployFailed, match='serviceaccount "nobody" not found'):
        kserve.deploy(kube_client(), _serving(versions, service="s", service_account="nobody", timeout=2),
                      _client(), "1", via="test")


def test_another_models_inferenceservice_of_that_name_is_not_taken_over(cluster, versions, tracking_env):
    from components.trainjob import kube_client

    other = kserve.manifest(_serving("someone-else"), "1", "s3://posttrain-mlflow/x")
    other["metadata"]["name"] = "taken"
    _create(other)
    with pytest.raises(kserve.DeployFailed, match=f"InferenceService {NS}/taken exists and serves another model"):
        kserve.deploy(kube_client(), _serving(versions, service="taken"), _client(), "1", via="test")


def test_the_secret_template_holds_kserve_s3_settings_and_placeholders_only():
    (reader,) = [s for s in validate.secret_templates() if s["metadata"]["name"] == READER]
    assert set(reader["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert reader["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == \
        "minio.posttrain.svc.cluster.local:9000"
    assert validate.policy_violations([reader]) == []
    account = next(o for o in validate.render(REPO / "k8s" / "overlays" / "kserve") if o["kind"] == "ServiceAccount")
    assert account["secrets"] == [{"name": READER}] and account["automountServiceAccountToken"] is False


# --- patching: what the new manifest drops, concurrent writers, a champion that moves -----------------------------


def test_a_patch_removes_what_the_new_manifest_no_longer_has(cluster, versions, tracking_env):
    """A merge patch keeps what it does not name: the GPU limit, the Recreate strategy, the node pool and a label
    added by hand would outlive a deploy without an accelerator; the patch sets each to null."""
    from kubernetes import client

    from components.trainjob import kube_client

    gpu = _serving(versions, service="g", accelerator="nvidia.com/gpu", gpus=2, node_selector={"pool": "gpu"})
    kserve.deploy(kube_client(), gpu, _client(), "1", via="test")
    predictor = cluster.get("inferenceservices", NS, "g", "serving.kserve.io")["spec"]["predictor"]
    assert predictor["deploymentStrategy"] == {"type": "Recreate"}  # one GPU node: the old pod must go first
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    client.CustomObjectsApi(kube_client()).patch_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", NS, "inferenceservices", "g",
        {"spec": {"predictor": {"labels": {"team": "x"}, "model": {"env": [{"name": "A", "value": "1"}]}}}})
    kserve.deploy(kube_client(), _serving(versions, service="g"), _client(), "2", via="test")
    predictor = cluster.get("inferenceservices", NS, "g", "serving.kserve.io")["spec"]["predictor"]
    assert predictor["model"]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert "deploymentStrategy" not in predictor and "nodeSelector" not in predictor
    assert "env" not in predictor["model"] and "team" not in predictor["labels"]
    (pod,) = cluster.list("pods", NS, selector="serving.kserve.io/inferenceservice=g")
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}


def test_a_patch_after_a_concurrent_write_is_refused(cluster, versions, tracking_env):
    """The patch carries the resourceVersion read: a write in between makes it fail (409), as the API server's
    optimistic concurrency makes it, instead of overwriting that write."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from components.trainjob import kube_client

    kserve.deploy(kube_client(), _serving(versions, service="c"), _client(), "1", via="test")
    services = kserve.InferenceServices(kube_client(), NS)
    stale = services.get("c")
    custom = client.CustomObjectsApi(kube_client())
    custom.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", NS, "inferenceservices", "c",
                                          {"metadata": {"labels": {"touched": "yes"}}})
    body = kserve.manifest(_serving(versions, service="c"), "2", "s3://posttrain-mlflow/x")
    with pytest.raises(kserve.DeployFailed, match=rf'^patching InferenceService {NS}/c failed: 409 Conflict: '
                                                  r'Operation cannot be fulfilled on inferenceservices'):
        services.apply(body, versions, stale)
    # the emulated API server's rule itself
    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", NS, "inferenceservices", "c",
                                              {"metadata": {"resourceVersion": stale["metadata"]["resourceVersion"]}})
    assert refused.value.status == 409
    assert services.apply(body, versions, services.get("c"))[0] == "patched"


def test_a_deploy_whose_version_stops_being_champion_is_superseded(cluster, versions, tracking_env):
    """The champion is re-checked under the promotion lock before the write and before the recording: moved before
    the write, nothing is written; moved while the service rolled out, nothing is recorded."""
    import contextlib

    from components import promotion
    from components.trainjob import kube_client

    name, client = versions, _client()
    _champion(client, name, "2")
    with pytest.raises(kserve.Superseded, match="champion is now v2, no longer v1"):
        kserve.deploy(kube_client(), _serving(name, service="s1"), client, "1", via="test",
                      guard=lambda: promotion.while_champion(client, name, "1"))
    assert cluster.get("inferenceservices", NS, "s1", "serving.kserve.io") is None
    before = kserve.deployment_record(client, name)
    entered = []

    @contextlib.contextmanager
    def moved_while_waiting():
        entered.append(1)
        if len(entered) == 2:  # the write is done: a rollback moves the champion while the service rolls out
            promotion.promote(name, "1", reason="concurrent move", client=client)
        with promotion.while_champion(client, name, "2"):
            yield

    with pytest.raises(kserve.Superseded, match="champion is now v1, no longer v2"):
        kserve.deploy(kube_client(), _serving(name, service="s2"), client, "2", via="test", guard=moved_while_waiting)
    assert cluster.get("inferenceservices", NS, "s2", "serving.kserve.io") is not None
    assert kserve.deployment_record(client, name) == before
    assert client.get_model_version(name, "2").tags.get(kserve.URL_TAG) != "http://s2-posttrain.example.com"


def test_the_deploy_stage_reports_a_superseded_deploy_and_records_nothing(cluster, versions, tracking_env,
                                                                         monkeypatch, tmp_path):
    from components.deploy.config import DeployConfig
    from components.deploy.main import run

    name, client = versions, _client()
    _champion(client, name, "2")
    real = kserve.deploy

    def deploy_then_moved(*args, guard, **kwargs):
        from components import promotion

        promotion.promote(name, "1", reason="concurrent move", client=client)
        return real(*args, guard=guard, **kwargs)

    monkeypatch.setattr(kserve, "deploy", deploy_then_moved)
    before = kserve.deployment_record(client, name)
    summary = run(DeployConfig(name=name, version="2", output_dir=str(tmp_path), service="s3", cpu="2",
                               memory="8Gi", timeout=20, poll_seconds=0.1))
    assert summary["deployed"] is False and summary["reason"].startswith("superseded: ")
    assert json.loads((tmp_path / "deployment.json").read_text()) == summary
    assert kserve.deployment_record(client, name) == before
    assert cluster.get("inferenceservices", NS, "s3", "serving.kserve.io") is None


def test_knative_waits_for_a_new_revision_and_its_share_of_the_traffic(cluster, versions, tracking_env):
    """The status read right after a write may be the previous revision's (Ready, UpToDate; with no pod to check when
    scaled to zero): Knative mode waits for a new latestCreatedRevision that is Ready with the canary's share."""
    from components.trainjob import kube_client

    services = kserve.InferenceServices(kube_client(), NS)
    old = {"url": "http://k", "conditions": [{"type": "Ready", "status": "True"}],
           "components": {"predictor": {"latestCreatedRevision": "k-1", "latestReadyRevision": "k-1",
                                        "traffic": [{"latestRevision": True, "percent": 100, "revisionName": "k-1"}]}}}
    rollout = kserve.Rollout(uri="s3://b/m", pods=False, knative=True, before="k-1", share=20)
    assert services._not_rolled_out("k", old, rollout).startswith("Ready=True, but no new revision yet")
    new = copy.deepcopy(old)
    new["components"]["predictor"].update(latestCreatedRevision="k-2")
    assert "revision k-2 is not Ready yet" in services._not_rolled_out("k", new, rollout)
    new["components"]["predictor"].update(latestReadyRevision="k-2")
    new["components"]["predictor"]["traffic"] = [{"latestRevision": True, "percent": 100, "revisionName": "k-2"}]
    assert "revision k-2 has 100% of the traffic, not 20%" in services._not_rolled_out("k", new, rollout)
    new["components"]["predictor"]["traffic"] = [{"latestRevision": True, "percent": 20, "revisionName": "k-2"},
                                                 {"latestRevision": False, "percent": 80, "revisionName": "k-1"}]
    assert services._not_rolled_out("k", new, rollout) is None


def test_an_artifact_uri_naming_the_server_maps_to_its_s3_key():
    class Registry:
        def get_model_version(self, name, version):
            from types import SimpleNamespace

            return SimpleNamespace(source="models:/m-abc", model_id="m-abc")

        def __init__(self, location):
            self.location = location

        def get_logged_model(self, model_id):
            from types import SimpleNamespace

            return SimpleNamespace(artifact_location=self.location)

    for location in ("mlflow-artifacts://mlflow.posttrain:5000/1/models/m-abc/artifacts",
                     "mlflow-artifacts:/1/models/m-abc/artifacts"):
        assert kserve.storage_uri(Registry(location), "m", "1", "s3://posttrain-mlflow") == \
            "s3://posttrain-mlflow/1/models/m-abc/artifacts"


# --- the emulated KServe against v0.20 -----------------------------------------------------------------------------


def test_the_emulated_kserve_follows_upstream_on_secrets_endpoints_labels_versions_and_sidecars(cluster, versions,
                                                                                                tracking_env):
    """A Secret the service account references but that does not exist: no pod (mountSecretCredential fails). An
    endpoint annotation with a scheme: S3_USE_HTTPS from it, S3_ENDPOINT without it (s3/utils.go). The pod carries
    the InferenceService's labels (buildObjectMeta). A version the CRD does not serve: 404. A sidecar beside the
    model is no second implementation (GetImplementations)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from components.trainjob import kube_client

    annotations = cluster.objects[("", "secrets", NS, READER)]["metadata"]["annotations"]
    annotations["serving.kserve.io/s3-endpoint"] = "http://" + annotations["serving.kserve.io/s3-endpoint"]
    annotations["serving.kserve.io/s3-verifyssl"] = "0"
    kserve.deploy(kube_client(), _serving(versions, service="e"), _client(), "1", via="test")
    (pod,) = cluster.list("pods", NS, selector="serving.kserve.io/inferenceservice=e")
    env = {e["name"]: e.get("value") for e in pod["spec"]["initContainers"][0]["env"]}
    assert env["S3_ENDPOINT"] == "minio.posttrain.svc.cluster.local:9000" and env["S3_USE_HTTPS"] == "0"
    assert env["AWS_ENDPOINT_URL"] == "http://minio.posttrain.svc.cluster.local:9000" and env["S3_VERIFY_SSL"] == "0"
    assert pod["metadata"]["labels"][kserve.MODEL_LABEL] == kserve.manifest(
        _serving(versions), "1", "")["metadata"]["labels"][kserve.MODEL_LABEL]
    cluster.objects[("", "serviceaccounts", NS, "posttrain-model-reader")]["secrets"].append({"name": "not-there"})
    with pytest.raises(kserve.DeployFailed, match=r'PredictorReady=False \(MinimumReplicasUnavailable: secrets '
                                                  r'"not-there" not found\)'):
        kserve.deploy(kube_client(), _serving(versions, service="e2", timeout=3), _client(), "1", via="test")
    assert cluster.list("pods", NS, selector="serving.kserve.io/inferenceservice=e2") == []
    with pytest.raises(ApiException) as missing:
        client.CustomObjectsApi(kube_client()).get_namespaced_custom_object(
            "serving.kserve.io", "v1alpha9", NS, "inferenceservices", "e")
    assert missing.value.status == 404
    body = kserve.manifest(_serving("m", service="side"), "1", "s3://posttrain-mlflow/x")
    body["spec"]["predictor"]["containers"] = [{"name": "proxy", "image": "envoy"}]
    assert _create(body)["metadata"]["name"] == "side"


def test_unknown_fields_are_dropped_unless_strict_validation_is_asked(cluster):
    """The API server's default fieldValidation (Warn) prunes a field the CRD does not declare; Strict, what the
    deploy step asks, refuses it."""
    body = kserve.manifest(_serving("m", service="loose"), "1", "s3://posttrain-mlflow/1/models/m-1/artifacts")
    body["spec"]["predictor"]["replicas"] = 2
    created = _create(body, strict=False)
    assert "replicas" not in created["spec"]["predictor"]
    assert "replicas" not in cluster.get("inferenceservices", NS, "loose", "serving.kserve.io")["spec"]["predictor"]


@pytest.mark.parametrize("annotations, predictor, message", [
    ({}, {"deploymentStrategy": {"type": "Recreate"}}, "customizing deploymentStrategy is only supported for raw "
     "deployment mode"),
    ({"serving.kserve.io/deploymentMode": "Standard"}, {"deploymentStrategy": {"type": "Recreate"}}, None),
])
def test_the_webhook_reads_the_deployment_mode_annotation_as_given(cluster, annotations, predictor, message):
    """validateAutoScalingCompExtension compares the annotation itself: none (the default config, Serverless) is
    not Standard."""
    from kubernetes.client.exceptions import ApiException

    body = kserve.manifest(_serving("m", service="raw"), "1", "s3://posttrain-mlflow/x")
    body["metadata"]["annotations"] = annotations
    body["spec"]["predictor"].update(predictor)
    if message is None:
        assert _create(body)["metadata"]["name"] == "raw"
        return
    with pytest.raises(ApiException) as refused:
        _create(body)
    assert refused.value.status == 403 and message in json.loads(refused.value.body)["message"]
