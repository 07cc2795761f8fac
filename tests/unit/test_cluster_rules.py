"""What a stock KFP 2.17 backend and a Kubeflow profile namespace's admission chain check, encoded as rules on the
compiled pipelines (the bundled `cluster` spec, and `demo` where it applies) and on every rendered kustomize target
of k8s/. Schema validation (k8s/validate.py) says a manifest is well formed; these say it is deployable.

Each test names the upstream file its rule comes from (kubeflow/pipelines at tag 2.17.0, kubeflow/manifests,
kubeflow/dashboard, kubernetes-sigs/kueue); issue items: 1 workspace PVC, 2 profile namespaces (Istio), 3 the
namespace's labels, 5 Kueue, 6 the pipeline runner, 7 the KFP UI's artifact reads, 11 pod security.
"""

import re

import pytest
import yaml
from k8s_tools import ROOT, load_validate

validate = load_validate()

from pipelines.kfp_client import RUNNER_SERVICE_ACCOUNT  # noqa: E402
from pipelines.posttrain import compile_spec  # noqa: E402
from pipelines.spec import load_spec  # noqa: E402

# every target is an install of posttrain, but the cluster-scoped admission policy (tests/cluster/test_pods.py)
TARGETS = [t.relative_to(ROOT / "k8s").as_posix() for t in validate.targets() if t.name != "workspace-fsgroup"]
INSTALLS = [t for t in TARGETS if t != "overlays/kserve"]
"""The targets that are an install of their own; overlays/kserve is applied after one (it brings the runner's
InferenceService rights, not the runner, MinIO or their policies)."""
ISTIO_INJECT = "sidecar.istio.io/inject"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# the labels a Kubeflow profile's namespace carries (kubeflow/manifests applications/profiles/pss/namespace-labels.yaml,
# and istio-injection from kubeflow/dashboard components/profile-controller/controllers/profile_controller.go)
PROFILE_NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "posttrain", "istio-injection": "enabled",
                            "app.kubernetes.io/part-of": "kubeflow-profile", "pipelines.kubeflow.org/enabled": "true",
                            "pod-security.kubernetes.io/enforce": "baseline"}
# a v2 pipeline step's pod (kubeflow/pipelines backend/src/cache/server/mutation.go: V2ComponentAnnotationKey)
PIPELINE_POD = {"pipelines.kubeflow.org/v2_component": "true"}
# the KFP UI's server (kubeflow/pipelines manifests/kustomize/base/pipeline/ml-pipeline-ui-deployment.yaml), in
# KFP's namespace, kubeflow
KFP_UI_POD, KFP_NAMESPACE = {"app": "ml-pipeline-ui"}, {"kubernetes.io/metadata.name": "kubeflow"}


# --- what is checked: the compiled pipelines and the rendered targets ---------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {target: validate.render(ROOT / "k8s" / target) for target in TARGETS}


def _compile(name: str, tmp_path_factory) -> dict:
    out = compile_spec(name, tmp_path_factory.mktemp(name) / "pipeline.yaml")
    pipeline, platform = yaml.safe_load_all(out.read_text())
    kubernetes = platform["platforms"]["kubernetes"]
    return {"spec": load_spec(name), "pipeline": pipeline, "workspace": kubernetes["pipelineConfig"]["workspace"],
            "executors": pipeline["deploymentSpec"]["executors"],
            "k8s": kubernetes["deploymentSpec"]["executors"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    return _compile("cluster", tmp_path_factory)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return _compile("demo", tmp_path_factory)


@pytest.fixture(scope="module")
def cluster_7b(tmp_path_factory) -> dict:
    return _compile("cluster-7b", tmp_path_factory)


@pytest.fixture(scope="module")
def cluster_70b_lora(tmp_path_factory) -> dict:
    return _compile("cluster-70b-lora", tmp_path_factory)


COMPILED = ["cluster", "demo", "cluster_7b", "cluster_70b_lora"]
"""Every bundled spec's fixture; the multi-node ones run their training stages as TrainJobs."""
MULTI_NODE = ["cluster_7b", "cluster_70b_lora"]


def _steps(compiled: dict) -> dict[str, dict]:
    """The steps' kfp-kubernetes configs, by executor (importer executors have none and run no user container)."""
    return {name: config for name, config in compiled["k8s"].items() if "container" in compiled["executors"][name]}


def _pod_templates(resources: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod template {metadata, spec}) of every workload."""
    out = []
    for r in resources:
        spec = validate.pod_spec(r)
        if spec is None:
            continue
        if r["kind"] == "TrainingRuntime":  # the pod template of its JobSet's replicated job
            template = r["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        elif r["kind"] == "ServingRuntime":  # its predictor pods take spec.labels (kserve predictor.go buildObjectMeta)
            template = {"metadata": {"labels": r["spec"].get("labels") or {}}, "spec": spec}
        else:
            template = r if r["kind"] == "Pod" else r["spec"].get("jobTemplate", {}).get("spec", r["spec"])["template"]
        out.append((validate.name_of(r), template))
    return out


def _selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector's matchLabels (and In/Exists expressions) against labels; {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        ok = {"In": lambda: labels.get(e["key"]) in e["values"],
              "NotIn": lambda: labels.get(e["key"]) not in e["values"],
              "Exists": lambda: e["key"] in labels, "DoesNotExist": lambda: e["key"] not in labels}[e["operator"]]()
        if not ok:
            return False
    return True


def admits(policy: dict, port: int, pod: dict, namespace: dict, same_namespace: bool) -> bool:
    """Whether a NetworkPolicy's ingress admits a pod (its labels, its namespace's labels) on a port
    (kubernetes/api networking/v1 types.go, NetworkPolicyPeer: a podSelector alone selects in the policy's namespace;
    with a namespaceSelector, in the namespaces it selects)."""
    for rule in policy["spec"].get("ingress") or []:
        if rule.get("ports") and port not in [p.get("port") for p in rule["ports"]]:
            continue
        for peer in rule.get("from") or [{}]:
            if "ipBlock" in peer:
                continue
            in_namespace = (_selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer
                            else same_namespace)
            if in_namespace and ("podSelector" not in peer or _selects(peer["podSelector"], pod)):
                return True
    return False


QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def quantity(text) -> float:
    number, suffix = QUANTITY.match(str(text)).groups()
    return float(number) * FACTORS[suffix]


# --- 1. the workspace PVC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPILED)
def test_1_workspace_pvc_is_one_kfp_creates(name, request):
    """kubeflow/pipelines backend/src/v2/compiler/argocompiler/argo.go (GetWorkspacePVC, convertStructToPVCSpec;
    from 2.15): the size is a quantity ≥ 0, the patch may hold only accessModes and storageClassName, accessModes must
    not be empty ("workspace PVC spec must specify accessModes"), and storageClassName is omitted or non-empty."""
    compiled = request.getfixturevalue(name)
    workspace, storage = compiled["workspace"], compiled["spec"].storage
    assert quantity(workspace["size"]) >= 0 and workspace["size"] == storage.workspace_size
    patch = workspace["kubernetes"]["pvcSpecPatch"]
    assert set(patch) <= {"accessModes", "storageClassName"}, f"unknown fields in PVC spec patch: {sorted(patch)}"
    assert patch.get("accessModes"), "workspace PVC spec must specify accessModes"
    assert set(patch["accessModes"]) <= {"ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"}
    # one step at a time: ReadWriteOnce; every node of a TrainJob mounts it at once: ReadWriteMany
    assert patch["accessModes"] == storage.workspace_access_modes == (
        ["ReadWriteMany"] if name in MULTI_NODE else ["ReadWriteOnce"])
    assert patch.get("storageClassName", "unset") != ""


def test_1_storage_class_and_access_modes_come_from_the_spec(tmp_path):
    from pipelines.spec import SpecError, parse_spec

    data = yaml.safe_load((ROOT / "pipelines" / "specs" / "cluster.yaml").read_text())
    data["storage"].update(workspace_storage_class="fast-ssd", workspace_access_modes=["ReadWriteMany"])
    out = compile_spec(parse_spec(data), tmp_path / "p.yaml")
    patch = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["pipelineConfig"]["workspace"]
    assert patch["kubernetes"]["pvcSpecPatch"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast-ssd"}
    for key, value in (("workspace_storage_class", ""), ("workspace_access_modes", []),
                       ("workspace_access_modes", ["ReadWrite"])):
        bad = yaml.safe_load((ROOT / "pipelines" / "specs" / "cluster.yaml").read_text())
        bad["storage"][key] = value
        with pytest.raises(SpecError, match=f"storage.{key}: .* is invalid"):
            parse_spec(bad)


def test_1_minimum_kfp_version_is_stated():
    """The workspace needs KFP ≥ 2.15 (kubeflow/pipelines backend/src/v2/compiler/argocompiler/argo.go at 2.15.0)."""
    for doc in ("README.md", "k8s/README.md"):
        assert "KFP 2.15" in (ROOT / doc).read_text(), doc


# --- 2. Kubeflow profile namespaces: Istio ----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_2_no_pod_takes_an_istio_sidecar(target, rendered):
    """A profile's namespace is labelled istio-injection: enabled (kubeflow/dashboard
    components/profile-controller/controllers/profile_controller.go, setNamespaceLabelsAndServiceMesh) and enforces
    pod security `baseline` (kubeflow/manifests applications/profiles/pss/namespace-labels.yaml). An injected pod
    gets istio-init, which adds NET_ADMIN and NET_RAW (refused by baseline), and a sidecar that keeps a Job's pod
    running. Every pod here opts out with the pod label, as Kubeflow's own do (kubeflow/manifests
    applications/pipeline/upstream/base/metadata/base/metadata-envoy-deployment.yaml), and adds no capability."""
    baseline_caps = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                     "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
    templates = _pod_templates(rendered[target])
    assert templates
    for name, template in templates:
        assert template["metadata"]["labels"].get(ISTIO_INJECT) == "false", name
        for c in validate.containers(template["spec"]):
            added = set((c.get("securityContext") or {}).get("capabilities", {}).get("add") or [])
            assert added <= baseline_caps, f"{name}: {c['name']} adds {added - baseline_caps}"


@pytest.mark.parametrize("name", COMPILED)
def test_2_no_pipeline_step_takes_an_istio_sidecar(name, request):
    """The steps opt out too (kfp-kubernetes add_pod_label): no sidecar is injected into them, so none is needed in
    MinIO and MLflow, whose callers then carry no mTLS identity that an AuthorizationPolicy could match."""
    for executor, config in _steps(request.getfixturevalue(name)).items():
        assert config["podMetadata"]["labels"].get(ISTIO_INJECT) == "false", executor


def test_2_profile_overlay_admits_pipeline_pods_without_namespace_labels(rendered):
    """In a profile's namespace the pipeline pods run beside MinIO and MLflow, and the namespace carries only the
    profile's labels (above), not posttrain.io/pipeline-runs: the NetworkPolicies of the kubeflow-profile overlay
    admit them anyway, and still refuse other pods of that namespace. The profile's own AuthorizationPolicy
    (ns-owner-access-istio, profile_controller.go getAuthorizationPolicy) is enforced by sidecars only: with none on
    MinIO and MLflow (test above) it does not apply to them."""
    policies = {r["metadata"]["name"]: r for r in rendered["overlays/kubeflow-profile"] if r["kind"] == "NetworkPolicy"}
    for name, port in (("minio", 9000), ("mlflow", 5000)):
        assert admits(policies[name], port, PIPELINE_POD, PROFILE_NAMESPACE_LABELS, same_namespace=True), name
        assert not admits(policies[name], port, {"app": "jupyter"}, PROFILE_NAMESPACE_LABELS, same_namespace=True)
        assert not admits(policies[name], port, PIPELINE_POD, {"kubernetes.io/metadata.name": "elsewhere"},
                          same_namespace=False)
    # the plain base: pipeline pods of a namespace labelled posttrain.io/pipeline-runs (this one, or KFP's own)
    base = {r["metadata"]["name"]: r for r in rendered["base"] if r["kind"] == "NetworkPolicy"}
    labelled = {"kubernetes.io/metadata.name": "kubeflow", "posttrain.io/pipeline-runs": "true"}
    for name, port in (("minio", 9000), ("mlflow", 5000)):
        assert admits(base[name], port, PIPELINE_POD, labelled, same_namespace=False), name
        assert not admits(base[name], port, PIPELINE_POD, PROFILE_NAMESPACE_LABELS, same_namespace=False), name


# --- 3. the namespace's labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_3_no_target_owns_or_labels_the_namespace(target, rendered):
    """Kubeflow's PodDefault webhook selects namespaces by app.kubernetes.io/part-of: kubeflow-profile
    (kubeflow/manifests applications/admission-webhook/upstream/base/mutating-webhook-configuration.yaml), which a
    kustomize `labels:` on a Namespace would overwrite; and a Profile refuses a namespace it did not create
    ("namespace already exist, but not owned by profile creator", kubeflow/dashboard profile_controller.go). No
    target renders a Namespace."""
    assert [validate.name_of(r) for r in rendered[target] if r["kind"] == "Namespace"] == []


def test_3_the_plain_namespace_file_leaves_part_of_alone():
    """k8s/base/namespace.yaml, applied on its own for a plain namespace, sets no app.kubernetes.io/part-of and is
    schema-valid; it labels the namespace for the NetworkPolicies and pod security only."""
    (namespace,) = validate.load(ROOT / "k8s" / "base" / "namespace.yaml")
    assert validate.schema_errors([namespace]) == []
    assert "app.kubernetes.io/part-of" not in namespace["metadata"]["labels"]
    assert namespace["metadata"]["labels"]["posttrain.io/pipeline-runs"] == "true"


# --- 5. Kueue ---------------------------------------------------------------------------------------------------


def _pod_requests(executor: dict) -> dict[str, float]:
    """What Kueue counts for a step's pod: the larger of the main container's requests and of KFP's launcher init
    container's (kubeflow/pipelines backend/src/v2/compiler/argocompiler/argo.go, launcherResources: cpu 0.1, memory
    limit 256Mi, which is also its request); Argo's containers request nothing by default (kubeflow/pipelines
    manifests/kustomize/third-party/argo/base/workflow-controller-configmap-patch.yaml sets no executor resources)."""
    resources = executor["container"]["resources"]
    main = {"cpu": quantity(resources["resourceCpuRequest"]), "memory": quantity(resources["resourceMemoryRequest"]),
            resources["accelerator"]["resourceType"]: float(resources["accelerator"]["resourceCount"])}
    launcher = {"cpu": 0.1, "memory": quantity("256Mi")}
    return {k: max(v, launcher.get(k, 0.0)) for k, v in main.items()}


@pytest.mark.parametrize("name, expected", [("cluster", {"sft", "grpo", "evaluate"}),  # psft runs the sft component
                                            ("cluster_70b_lora", {"evaluate"})])  # the training steps: TrainJobs
def test_5_every_gpu_step_is_queued_and_fits_the_quota(name, expected, request, rendered):
    """Kueue's pod integration admits a pod by its label kueue.x-k8s.io/queue-name (kubernetes-sigs/kueue
    pkg/controller/constants/constants.go, QueueLabel) naming a LocalQueue of its namespace, against its
    ClusterQueue's nominal quota: a step that asks for more than the quota is never admitted."""
    compiled = request.getfixturevalue(name)
    resources = rendered["overlays/kueue"]
    local = {r["metadata"]["name"]: r for r in resources if r["kind"] == "LocalQueue"}
    queues = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ClusterQueue"}
    flavors = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ResourceFlavor"}
    namespace = compiled["spec"].storage.namespace
    gpu_steps = {n: e for n, e in compiled["executors"].items()
                 if e.get("container", {}).get("resources", {}).get("accelerator")}
    assert {n.removeprefix("exec-") for n in gpu_steps} == expected
    for name, executor in gpu_steps.items():
        labels = compiled["k8s"][name]["podMetadata"]["labels"]
        queue = local[labels[QUEUE_LABEL]]
        assert queue["metadata"]["namespace"] == namespace
        cq = queues[queue["spec"]["clusterQueue"]]
        assert _selects(cq["spec"]["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
        requests = _pod_requests(executor)
        (group,) = [g for g in cq["spec"]["resourceGroups"] if set(requests) <= set(g["coveredResources"])]
        fits = False
        for flavor in group["flavors"]:
            quota = {r["name"]: quantity(r["nominalQuota"]) for r in flavor["resources"]}
            node_labels = flavors[flavor["name"]]["spec"].get("nodeLabels", {})
            selector = compiled["k8s"][name]["nodeSelector"]["labels"]
            fits |= all(requests[k] <= quota[k] for k in requests) and node_labels.items() <= selector.items()
        assert fits, f"{name} asks {requests}, more than {cq['metadata']['name']} can admit"
    for name in set(compiled["executors"]) - set(gpu_steps):  # CPU steps do not take GPU quota
        assert QUEUE_LABEL not in compiled["k8s"].get(name, {}).get("podMetadata", {}).get("labels", {}), name


def test_the_70b_evaluate_step_splits_the_model_over_its_node(cluster_70b_lora):
    """A 70B model in bf16 fits on no single H100: evaluate runs one process per GPU of its node (torchrun, the
    run parameter evaluate_gpus_per_node, at most the spec's 8) and vLLM splits each model over
    tensor_parallel_size of them, a divisor of the GPUs (components/training/parallel.py)."""
    import json

    tasks = _tasks(cluster_70b_lora["pipeline"])
    (key,) = [k for k in tasks if k.endswith("/evaluate")]
    parameters = tasks[key]["inputs"]["parameters"]
    gpus = int(cluster_70b_lora["executors"]["exec-evaluate"]["container"]["resources"]["accelerator"]
               ["resourceCount"])
    assert parameters["nproc"]["componentInputParameter"] == "pipelinechannel--evaluate_gpus_per_node"
    defaults = cluster_70b_lora["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["evaluate_gpus_per_node"]["defaultValue"] == gpus == 8
    assert json.loads(parameters["launch"]["runtimeValue"]["constant"]) == {"max_nodes": 1, "max_nproc": gpus}
    settings = json.loads(parameters["settings"]["runtimeValue"]["constant"])
    assert settings["rollout"]["engine"] == "vllm" and gpus % settings["rollout"]["tensor_parallel_size"] == 0
    assert settings["rollout"]["tensor_parallel_size"] > 1 and settings["teacher_forced"] is False


# --- 6. the pipeline runner -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", INSTALLS)
def test_6_runs_use_a_service_account_every_target_binds(target, rendered):
    """Runs and recurring runs name their service account (kubeflow/pipelines backend/api/v2beta1/run.proto and
    recurring_run.proto, `service_account`; else the namespace's `pipeline-runner`, backend/src/apiserver/common/
    const.go, which a profile does not have). pipelines/kfp_client.py passes posttrain-pipeline-runner: every target
    has it, bound to the Roles that let KFP's driver create the workspace PVC (kubeflow/pipelines
    backend/src/v2/driver/k8s.go) and a step read its two Secrets."""
    resources = rendered[target]
    assert ("ServiceAccount", RUNNER_SERVICE_ACCOUNT) in {(r["kind"], r["metadata"]["name"]) for r in resources}
    roles = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Role"}
    bound = [roles[b["roleRef"]["name"]] for b in resources if b["kind"] == "RoleBinding"
             if any(s["kind"] == "ServiceAccount" and s["name"] == RUNNER_SERVICE_ACCOUNT for s in b["subjects"])]
    rules = [rule for role in bound for rule in role["rules"]]
    assert any("persistentvolumeclaims" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert any("secrets" in r["resources"] for r in rules)


def test_6_the_schedule_is_a_kfp_cron_in_utc(cluster):
    """KFP's cron has 6 fields, seconds first (kfp.Client.create_recurring_run, robfig/cron), evaluated in the
    scheduled-workflow controller's zone: UTC unless CRON_SCHEDULE_TIMEZONE is set (kubeflow/pipelines
    backend/src/crd/controller/scheduledworkflow/util/const.go, GetLocation). The docs say UTC."""
    assert len(cluster["spec"].schedule.cron.split()) == 6
    assert "UTC" in (ROOT / "k8s" / "README.md").read_text() and "UTC" in (ROOT / "docs" / "spec.md").read_text()


# --- 7. the KFP UI reads artifacts ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [t for t in INSTALLS if t != "overlays/external-s3"
                                    and not t.startswith("overlays/standalone-kfp")])  # no MinIO there
def test_7_minio_admits_the_kfp_ui_server(target, rendered):
    """KFP 2.17's UI server reads HTML and Markdown artifacts itself: the per-namespace artifact proxy
    (ml-pipeline-ui-artifact) is off unless ARTIFACTS_PROXY_ENABLED is true (kubeflow/pipelines
    manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py). The server's pods are
    app: ml-pipeline-ui (manifests/kustomize/base/pipeline/ml-pipeline-ui-deployment.yaml) in namespace kubeflow."""
    (minio,) = [r for r in rendered[target] if r["kind"] == "NetworkPolicy" and r["metadata"]["name"] == "minio"]
    assert admits(minio, 9000, KFP_UI_POD, KFP_NAMESPACE, same_namespace=False)
    assert not admits(minio, 9000, {"app": "ml-pipeline"}, KFP_NAMESPACE, same_namespace=False)  # not all of kubeflow
    assert admits(minio, 9000, {"app": "ml-pipeline-ui-artifact"}, {}, same_namespace=True)


# --- 11. pod security -------------------------------------------------------------------------------------------


def _image_users() -> set[str]:
    users = set()
    for dockerfile in (ROOT / "images").glob("*/Dockerfile"):
        users |= set(re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE))
    return users


@pytest.mark.parametrize("name", COMPILED)
def test_11_every_step_runs_as_the_images_non_root_user(name, request):
    """kfp-kubernetes 2.17 sets runAsUser, runAsGroup and runAsNonRoot (kubeflow/pipelines
    kubernetes_platform/python/kfp/kubernetes/security_context.py); KFP 2.17's compiler adds no privilege
    escalation, all capabilities dropped and RuntimeDefault seccomp to every step's container but not runAsNonRoot
    (backend/src/v2/compiler/argocompiler/security_context.go, applySecurityContextToExecutorTemplate), and its
    driver applies the step's values (backend/src/v2/driver/k8s.go). Together: `restricted`. Older backends ignore
    the field (their driver discards unknown fields): k8s/README.md says what the namespace does instead."""
    users = _image_users()
    assert users == {"10001:10001"}
    for executor, config in _steps(request.getfixturevalue(name)).items():
        context = config["securityContext"]
        assert context["runAsNonRoot"] is True, executor
        assert f"{context['runAsUser']}:{context['runAsGroup']}" in users, executor
        assert int(context["runAsUser"]) != 0


def test_11_the_namespace_level_alternative_is_documented():
    """Pod Security Admission (kubernetes/pod-security-admission; the labels of k8s/base/namespace.yaml)."""
    text = (ROOT / "k8s" / "README.md").read_text()
    assert "pod-security.kubernetes.io/enforce" in text and "KFP 2.17" in text


@pytest.mark.parametrize("target", TARGETS)
def test_11_every_pod_of_k8s_is_restricted(target, rendered):
    """The pod security standard `restricted` on what k8s/ runs itself (k8s/validate.py, policy_violations)."""
    assert [p for p in validate.policy_violations(rendered[target]) if "container" in p] == []


# --- 9: the demo compiled for a cluster requests CPU and memory and is retried ------------------------------------


def _tasks(pipeline: dict) -> dict[str, dict]:
    """Every task of every DAG (the root's and each sub-DAG's, e.g. the exit handler's), by DAG and task name."""
    dags = {"root": pipeline["root"]["dag"]} | {name: c["dag"] for name, c in pipeline["components"].items()
                                                  if "dag" in c}
    return {f"{dag}/{name}": task for dag, spec in dags.items() for name, task in spec["tasks"].items()}


def test_9_every_demo_step_requests_cpu_and_memory_and_is_retried(demo):
    """kubeflow/pipelines api/v2alpha1/pipeline_spec.proto: PipelineContainerSpec.ResourceSpec
    (resource_cpu_request, resource_memory_request) becomes the container's requests, PipelineTaskSpec.RetryPolicy
    (max_retry_count) the Argo template's retryStrategy (backend/src/v2/compiler/argocompiler). Without requests a
    pod is BestEffort: the first evicted under node pressure, and refused by a namespace ResourceQuota."""
    for name, executor in demo["executors"].items():
        if "container" not in executor:
            continue  # the importer runs no user container
        resources = executor["container"].get("resources", {})
        assert quantity(resources.get("resourceCpuRequest", "0")) > 0, name
        assert quantity(resources.get("resourceMemoryRequest", "0")) > 0, name
    container_components = {f"comp-{n.removeprefix('exec-')}" for n, e in demo["executors"].items()
                            if "container" in e}
    steps = {key: task for key, task in _tasks(demo["pipeline"]).items()
             if task["componentRef"]["name"] in container_components}
    assert len(steps) >= 9  # preflight, data_prep, the six stages, promote, close-run
    for key, task in steps.items():
        assert task.get("retryPolicy", {}).get("maxRetryCount", 0) >= 1, key


@pytest.mark.parametrize("name", COMPILED)
def test_4_cached_data_prep_keys_on_the_datas_fingerprint(name, request):
    """KFP's cache key is the task's input parameters and artifacts, never the bytes behind a URI
    (kubeflow/pipelines backend/src/v2/cacheutils/cache.go, GenerateCacheKey). data_prep is the one cached
    step, so it must take preflight's fingerprint of the sources as a parameter: changed data under the same
    s3:// URIs then changes the key and re-runs it (kfp.local test: tests/e2e/test_local_run.py)."""
    pipeline = request.getfixturevalue(name)["pipeline"]
    outer = pipeline["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    tasks = pipeline["components"][outer]["dag"]["tasks"]
    cached = {task: spec.get("cachingOptions", {}).get("enableCache", False) for task, spec in tasks.items()
              if not spec["componentRef"]["name"].startswith("comp-importer")}  # the base model's import: no step
    assert [task for task, on in cached.items() if on] == ["data-prep"]
    digest = tasks["data-prep"]["inputs"]["parameters"]["sources_digest"]["taskOutputParameter"]
    assert digest == {"outputParameterKey": "sources_digest", "producerTask": "preflight"}
    assert "cachingOptions" not in tasks["preflight"] or not tasks["preflight"]["cachingOptions"].get("enableCache")


# --- several nodes: Kubeflow Trainer TrainJobs (k8s/overlays/trainer) ------------------------------------------------


def _trainjobs(compiled: dict) -> list[dict]:
    """The TrainJob each multi-node training step creates, at its spec's max_nodes, as components/trainjob.py
    builds it from the step's compiled `launch` parameter."""
    import json

    from components.trainjob import Placement, trainjob_manifest

    out = []
    for key, task in _tasks(compiled["pipeline"]).items():
        launch = task.get("inputs", {}).get("parameters", {}).get("launch")
        if launch is None:
            continue
        settings = json.loads(launch["runtimeValue"]["constant"])
        if "trainjob" not in settings:
            continue
        placement = Placement.from_json(settings["trainjob"])
        out.append(trainjob_manifest(placement, name="pt-rule-check", run_id="run", stage=key.split("/")[-1],
                                     nodes=settings["max_nodes"], nproc=settings["max_nproc"],
                                     command=["python"], env={}, workspace="/kfp-workspace", workspace_pvc="ws"))
    return out


@pytest.mark.parametrize("name", MULTI_NODE)
def test_5_every_trainjob_is_queued_and_fits_the_quota(name, request, rendered):
    """Kueue admits a TrainJob (its trainer.kubeflow.org/trainjob integration, kubernetes-sigs/kueue
    pkg/controller/jobs/trainjob) as one workload: all its nodes' requests together (numNodes × resourcesPerNode),
    against the quota of the ClusterQueue behind the LocalQueue its kueue.x-k8s.io/queue-name label names."""
    resources = rendered["overlays/kueue"]
    local = {r["metadata"]["name"]: r for r in resources if r["kind"] == "LocalQueue"}
    queues = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ClusterQueue"}
    jobs = _trainjobs(request.getfixturevalue(name))
    assert len(jobs) == 2  # psft and grpo
    for job in jobs:
        queue = local[job["metadata"]["labels"][QUEUE_LABEL]]
        assert queue["metadata"]["namespace"] == job["metadata"]["namespace"]
        trainer = job["spec"]["trainer"]
        per_node = {k: quantity(v) for k, v in trainer["resourcesPerNode"]["limits"].items()}
        total = {k: v * trainer["numNodes"] for k, v in per_node.items()}
        (group,) = queues[queue["spec"]["clusterQueue"]]["spec"]["resourceGroups"]
        quotas = [{r["name"]: quantity(r["nominalQuota"]) for r in f["resources"]} for f in group["flavors"]]
        assert any(all(total[k] <= quota[k] for k in total) for quota in quotas), f"{total} exceeds {quotas}"


@pytest.mark.parametrize("name", MULTI_NODE)
def test_trainjobs_reference_the_runtime_the_trainer_overlay_renders(name, request, rendered):
    """kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go: runtimeRef names a TrainingRuntime of the
    TrainJob's namespace; the torch plugin (pkg/runtime/framework/plugins/torch/torch.go) sets PET_* in the container
    named `node`, which the runtime patch's volume mounts also target; the TrainJob's name is a DNS-1035 label
    (the CRD's CEL rule)."""
    from components.trainjob import NODE

    runtimes = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in rendered["overlays/trainer"]
                if r["kind"] == "TrainingRuntime"}
    for job in _trainjobs(request.getfixturevalue(name)):
        ref = job["spec"]["runtimeRef"]
        assert ref["kind"] == "TrainingRuntime"
        runtime = runtimes[(job["metadata"]["namespace"], ref["name"])]
        assert "torch" in runtime["spec"]["mlPolicy"]
        (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        assert replicated["name"] == NODE
        assert [c["name"] for c in replicated["template"]["spec"]["template"]["spec"]["containers"]] == [NODE]
        assert validate.crd_errors(job) == []
        name = job["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63


def test_6_the_runner_may_manage_trainjobs_and_nothing_more(rendered):
    """The trainer overlay's Role: create, get, list, watch and delete on trainjobs, reading pods and their logs;
    no other trainer.kubeflow.org resource (runtimes are the admin's), no ClusterRole, nothing outside the
    namespace."""
    resources = rendered["overlays/trainer"]
    assert not [r for r in resources if r["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Role"}
    bound = [roles[b["roleRef"]["name"]] for b in resources if b["kind"] == "RoleBinding"
             if any(s["kind"] == "ServiceAccount" and s["name"] == RUNNER_SERVICE_ACCOUNT for s in b["subjects"])]
    rules = [rule for role in bound for rule in role["rules"]]
    trainer = [r for r in rules if "trainer.kubeflow.org" in r["apiGroups"]]
    assert trainer == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                        "verbs": ["create", "get", "list", "watch", "delete"]}]
    assert any("pods/log" in r["resources"] and "get" in r["verbs"] for r in rules)
    assert all(r["apiGroups"] in ([""], ["trainer.kubeflow.org"], ["argoproj.io"]) for r in rules)
