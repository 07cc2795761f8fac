"""The emulated Kubernetes API (tests/cluster/kube.py) refuses what a cluster refuses: RBAC as rbac.go evaluates it
(kubernetes/kubernetes plugin/pkg/auth/authorizer/rbac), 401/403 with Kubernetes' Status body over the in-cluster
HTTPS path, Trainer's webhook without the TrainingRuntime in the TrainJob's namespace, the pinned CRD schema,
Kueue without a LocalQueue or a ClusterQueue that selects the namespace, pods without their Secrets or PVC, and
the garbage collector's rules on owners."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import installs
from cluster.kube import ApiError, KubeApi, Rbac, aggregated_cluster_roles, rbac_allows, rule_allows, strategic_merge
from components.trainjob import Placement, trainjob_manifest, trainjob_name

NS = "posttrain"
SECRETS = {"posttrain-minio": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
           "posttrain-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]}
"""The Secrets a TrainJob's nodes read (the bundled specs' secrets)."""


def _role(kind, name, rules=None, namespace=None, labels=None, aggregate=None):
    meta = {"name": name, **({"namespace": namespace} if namespace else {}), **({"labels": labels} if labels else {})}
    obj = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules or []}
    if aggregate:
        obj["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": aggregate}]}
    return obj


def _binding(kind, name, role_kind, role, subjects, namespace=None):
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": subjects}


def test_rule_matching_is_rbacs():
    """evaluation_helpers.go: a subresource needs its own entry (or */sub), resourceNames restrict named requests
    and never match a list or create."""
    pods = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
    assert rule_allows(pods, "get", "", "pods", None, "p")
    assert not rule_allows(pods, "get", "", "pods", "log", "p")
    assert rule_allows({**pods, "resources": ["*/log"]}, "get", "", "pods", "log", "p")
    assert not rule_allows(pods, "delete", "", "pods", None, "p")
    assert not rule_allows(pods, "get", "apps", "pods", None, "p")
    named = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["posttrain-minio"],
             "verbs": ["get", "list"]}
    assert rule_allows(named, "get", "", "secrets", None, "posttrain-minio")
    assert not rule_allows(named, "get", "", "secrets", None, "posttrain-minio-root")
    assert not rule_allows(named, "list", "", "secrets", None, None)
    assert rule_allows({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, "create", "x.io", "ys", None, None)


def test_bindings_are_scoped_as_rbac_scopes_them():
    """A RoleBinding grants its (Cluster)Role in its own namespace only; a ServiceAccount subject without a
    namespace is the binding's namespace's; groups of service accounts; aggregated ClusterRoles to a fixed point
    (kubeflow-edit ← kubeflow-pipelines-edit ← aggregate-to-kubeflow-pipelines-edit, kubeflow/pipelines
    manifests/kustomize/base/installs/multi-user/view-edit-cluster-roles.yaml)."""
    workflows = {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["*"]}
    objects = [
        _role("ClusterRole", "kubeflow-edit", aggregate={"rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit":
                                                         "true"}),
        _role("ClusterRole", "kubeflow-pipelines-edit", labels={
            "rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit": "true"}, aggregate={
            "rbac.authorization.kubeflow.org/aggregate-to-kubeflow-pipelines-edit": "true"}),
        _role("ClusterRole", "aggregate-to-kubeflow-pipelines-edit", [workflows], labels={
            "rbac.authorization.kubeflow.org/aggregate-to-kubeflow-pipelines-edit": "true"}),
        _binding("RoleBinding", "default-editor", "ClusterRole", "kubeflow-edit",
                 [{"kind": "ServiceAccount", "name": "default-editor"}], namespace="team-a"),
        _role("Role", "reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}], namespace="team-b"),
        _binding("RoleBinding", "reader", "Role", "reader",
                 [{"kind": "Group", "name": "system:serviceaccounts:team-a"}], namespace="team-b"),
    ]
    assert aggregated_cluster_roles(objects)["kubeflow-edit"] == [workflows]
    assert rbac_allows(objects, "team-a", ("team-a", "default-editor"), "get", "argoproj.io", "workflows", "wf")
    assert not rbac_allows(objects, "team-b", ("team-a", "default-editor"), "get", "argoproj.io", "workflows", "wf")
    assert not rbac_allows(objects, "team-a", ("team-b", "default-editor"), "get", "argoproj.io", "workflows", "wf")
    assert rbac_allows(objects, "team-b", ("team-a", "anyone"), "get", "", "pods", "p")
    assert not rbac_allows(objects, "team-b", ("team-c", "anyone"), "get", "", "pods", "p")
    without_aggregation = [o for o in objects if o["metadata"]["name"] != "kubeflow-pipelines-edit"]
    assert not rbac_allows(without_aggregation, "team-a", ("team-a", "default-editor"), "get", "argoproj.io",
                           "workflows", "wf")


@pytest.mark.parametrize("name", installs.INSTALLS)
def test_each_installs_runner_may_do_what_the_trainjob_launcher_does(name):
    """components/trainjob.py, as the run's service account in the pods' namespace: TrainJobs, pods and their logs,
    and get on the run's Workflow (its owner): the plain install has it from k8s/overlays/trainer/rbac.yaml, the
    profile's default-editor from kubeflow-edit's aggregation, standalone KFP's pipeline-runner from its Role."""
    install = installs.render(name)
    rbac, who, where = Rbac(install.objects), (install.pods_namespace, install.service_account), install.pods_namespace
    for verb in ("create", "get", "delete"):
        assert rbac.allows(where, who, verb, "trainer.kubeflow.org", "trainjobs", None if verb == "create" else "t")
    assert rbac.allows(where, who, "list", "", "pods") and rbac.allows(where, who, "get", "", "pods", "p")
    assert rbac.allows(where, who, "get", "", "pods", "p", "log")
    assert rbac.allows(where, who, "get", "argoproj.io", "workflows", "wf")


def _plain(**kw) -> KubeApi:
    kw.setdefault("grace", 0.5)
    return KubeApi(installs.render("plain").objects, installs.render("plain").namespaces, **kw)


def test_requests_are_authenticated_and_authorized_over_https(tmp_path):
    """The pod's path: kubernetes.config.load_incluster_config reads KUBERNETES_SERVICE_HOST/PORT and the mounted
    token and CA; the server's certificate is verified. No token: 401; a service account without the rule: 403 with
    Kubernetes' Status body."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import incluster_config

    with _plain() as api:
        mounted = api.service_account_dir(NS, "posttrain-pipeline-runner", tmp_path / "sa")
        env = api.pod_env()
        loader = incluster_config.InClusterConfigLoader(
            token_filename=str(mounted / "token"), cert_filename=str(mounted / "ca.crt"), environ=env)
        configuration = client.Configuration()
        loader.load_and_set(configuration)
        assert configuration.host == api.url and configuration.verify_ssl
        core = client.CoreV1Api(client.ApiClient(configuration))
        assert core.list_namespaced_pod(NS).items == []
        with pytest.raises(ApiException) as refused:
            core.list_namespaced_secret(NS)
        assert refused.value.status == 403
        status = json.loads(refused.value.body)
        assert status["kind"] == "Status" and status["reason"] == "Forbidden" and status["code"] == 403
        assert status["message"] == ('secrets is forbidden: User "system:serviceaccount:posttrain:posttrain-pipeline-'
                                     'runner" cannot list resource "secrets" in API group "" in the namespace '
                                     '"posttrain"')
        assert core.read_namespaced_secret("posttrain-minio", NS).metadata.name == "posttrain-minio"  # resourceNames
        anonymous = client.Configuration()
        anonymous.host, anonymous.ssl_ca_cert = api.url, str(api.ca_file)
        with pytest.raises(ApiException) as unauthorized:
            client.CoreV1Api(client.ApiClient(anonymous)).list_namespaced_pod(NS)
        assert unauthorized.value.status == 401
        with pytest.raises(ApiError, match='serviceaccount "nobody" not found'):
            api.token(NS, "nobody")


def _manifest(namespace=NS, runtime="posttrain-trainer", queue=None, nodes=2) -> dict:
    placement = Placement(namespace=namespace, runtime=runtime, image="trainer:1", spec_name="t", cpu="2",
                          memory="4Gi", secrets={"posttrain-minio": ["AWS_ACCESS_KEY_ID"]}, queue=queue)
    return trainjob_manifest(placement, name=trainjob_name("r", "sft"), run_id="r", stage="sft", nodes=nodes,
                             nproc=1, command=["sleep", "30"], env={}, workspace="/w", workspace_pvc="ws")


def _create(api: KubeApi, manifest: dict, namespace: str, account: str):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = api.proxy(namespace, account)
    custom = client.CustomObjectsApi(client.ApiClient(configuration))
    return custom.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", namespace, "trainjobs", manifest)


def _sleeper(pod: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                                stdout=out, stderr=subprocess.STDOUT)


def _stubborn(pod: dict, log: Path) -> subprocess.Popen:
    """A pod that ignores SIGTERM from its first instruction (an ignored signal stays ignored across exec), so it
    ends only by the SIGKILL at the end of its grace period."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))


def _workspace(namespace=NS) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ws", "namespace": namespace},
            "spec": {}}


def test_a_trainjob_without_its_runtime_in_its_namespace_is_refused():
    """kubeflow/trainer pkg/runtime/core/trainingruntime.go ValidateObjects, through the TrainJob webhook: the
    TrainingRuntime must exist in the TrainJob's namespace (standalone KFP runs its pods in `kubeflow`)."""
    from kubernetes.client.exceptions import ApiException

    install = installs.render("plain")
    objects = [o for o in install.objects if o.get("kind") != "TrainingRuntime"]
    with KubeApi(objects, install.namespaces) as api:
        with pytest.raises(ApiException) as refused:
            _create(api, _manifest(), NS, "posttrain-pipeline-runner")
        message = json.loads(refused.value.body)["message"]
        assert refused.value.status == 403
        assert message.startswith('admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '
                                  "spec.runtimeRef: Invalid value:")
        assert ('trainingruntimes.trainer.kubeflow.org "posttrain-trainer" not found: specified trainingRuntime must '
                "be created before the TrainJob is created") in message
        assert api.created == []


def test_a_trainjob_the_crd_or_the_webhook_refuses():
    from kubernetes.client.exceptions import ApiException

    with _plain() as api:
        invalid = _manifest()
        invalid["spec"]["trainer"]["numNodes"] = "2"
        with pytest.raises(ApiException) as refused:
            _create(api, invalid, NS, "posttrain-pipeline-runner")
        assert refused.value.status == 422 and "'2' is not of type 'integer'" in refused.value.body
        patched = _manifest()
        rjob = patched["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        rjob["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
        with pytest.raises(ApiException) as refused:
            _create(api, patched, NS, "posttrain-pipeline-runner")
        assert refused.value.status == 403 and "must not have container that doesn't exist" in refused.value.body


def test_kueue_leaves_a_trainjob_without_its_queue_pending():
    """No LocalQueue of that name in the TrainJob's namespace, or a ClusterQueue whose namespaceSelector does not
    select it: the TrainJob stays suspended and no pod starts (kubernetes-sigs/kueue workload controller)."""
    install = installs.render("plain")
    lq = next(o for o in install.objects if o.get("kind") == "LocalQueue" and o["metadata"]["namespace"] == NS)
    name = trainjob_name("r", "sft")
    with KubeApi(install.objects, install.namespaces, on_pod=_sleeper) as api:
        api.add(_workspace())
        _create(api, _manifest(queue="no-such-queue"), NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: f"{NS}/{name}" in api.pending)
        assert api.pending[f"{NS}/{name}"] == "LocalQueue no-such-queue doesn't exist"
        assert api.trainjob(NS, name)["spec"]["suspend"] is True and api.trainjob_pods(NS, name) == []
    objects = copy.deepcopy(install.objects)
    for obj in objects:
        if obj.get("kind") == "ClusterQueue":
            obj["spec"]["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": "elsewhere"}}
    with KubeApi(objects, install.namespaces, on_pod=_sleeper) as api:
        api.add(_workspace())
        _create(api, _manifest(queue=lq["metadata"]["name"]), NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: f"{NS}/{name}" in api.pending)
        assert "doesn't match ClusterQueue selector" in api.pending[f"{NS}/{name}"]
    with KubeApi(install.objects, install.namespaces, on_pod=_sleeper) as api:
        api.add(_workspace())
        _create(api, _manifest(queue=lq["metadata"]["name"]), NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: len(api.trainjob_pods(NS, name)) == 2)  # admitted
        assert api.pending == {}


def test_a_pod_without_its_secret_or_pvc_never_starts():
    """The kubelet: CreateContainerConfigError for a missing Secret; the scheduler: Pending without the PVC."""
    install = installs.render("plain")
    objects = [o for o in install.objects if not (o.get("kind") == "Secret"
                                                  and o["metadata"]["name"] == "posttrain-minio")]
    name = trainjob_name("r", "sft")
    with KubeApi(objects, install.namespaces, on_pod=_sleeper) as api:
        api.add(_workspace())
        _create(api, _manifest(), NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: any(p["status"].get("containerStatuses") for p in api.trainjob_pods(NS, name)))
        for pod in api.trainjob_pods(NS, name):
            assert pod["status"]["phase"] == "Pending"
            assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == (
                'secret "posttrain-minio" not found')
    with KubeApi(install.objects, install.namespaces, on_pod=_sleeper) as api:
        _create(api, _manifest(), NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: any(p["status"].get("containerStatuses") for p in api.trainjob_pods(NS, name)))
        waiting = api.trainjob_pods(NS, name)[0]["status"]["containerStatuses"][0]["state"]["waiting"]
        assert waiting["message"] == 'persistentvolumeclaim "ws" not found'


def test_the_runtime_patch_merges_into_the_template():
    """Trainer merges each runtime patch as a strategic merge patch (trainingruntime.go mergeRuntimePatches):
    lists with a merge key keep the template's items (the runtime's /cache volume stays beside the workspace)."""
    template = {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": {
        "containers": [{"name": "node", "image": "a", "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}],
        "volumes": [{"name": "cache", "emptyDir": {}}], "tolerations": [{"key": "a"}]}}}}}]}
    patch = {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": {
        "containers": [{"name": "node", "volumeMounts": [{"name": "ws", "mountPath": "/w"}]}],
        "volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": "ws"}}], "tolerations": [{"key": "b"}]}}}}}]}
    pod = strategic_merge(template, patch)["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["cache", "ws"]
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/cache", "/w"]
    assert pod["containers"][0]["image"] == "a" and pod["tolerations"] == [{"key": "b"}]  # no merge key: replaced


def test_the_garbage_collector_follows_owners():
    """Deleting a Workflow collects the TrainJob it owns, and its pods; a TrainJob whose owner does not exist (by
    uid) is collected at once; blockOwnerDeletion needs update on the owner's finalizers (gc_admission.go)."""
    from kubernetes.client.exceptions import ApiException

    name = trainjob_name("r", "sft")
    with _plain(on_pod=_sleeper) as api:
        api.add(_workspace())
        workflow = api.add({"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                            "metadata": {"name": "wf", "namespace": NS}, "spec": {}})
        owned = _manifest()
        owned["metadata"]["ownerReferences"] = [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                                                 "name": "wf", "uid": workflow["metadata"]["uid"]}]
        _create(api, owned, NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: all(p["status"]["phase"] == "Running" for p in api.trainjob_pods(NS, name))
                     and len(api.trainjob_pods(NS, name)) == 2)
        api.delete("workflows", NS, "wf", "argoproj.io")
        api.wait_for(lambda: api.trainjob(NS, name) is None and api.trainjob_pods(NS, name) == [], 10)
        dangling = copy.deepcopy(owned)
        dangling["metadata"]["ownerReferences"][0]["uid"] = "not-the-workflows-uid"
        _create(api, dangling, NS, "posttrain-pipeline-runner")
        assert api.trainjob(NS, name) is None
        blocking = copy.deepcopy(owned)
        blocking["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] = True
        with pytest.raises(ApiException) as refused:
            _create(api, blocking, NS, "posttrain-pipeline-runner")
        assert refused.value.status == 403 and "cannot set blockOwnerDeletion" in refused.value.body


def test_foreground_deletion_waits_for_the_pods():
    """A TrainJob deleted in the foreground keeps deletionTimestamp until its pods have ended (SIGTERM, then
    SIGKILL after the grace period). Its pods ignore SIGTERM: a pod that ended at once would let the whole chain
    (pods, Job, JobSet, TrainJob) go before the TrainJob could be read back marked."""
    name = trainjob_name("r", "sft")
    with _plain(on_pod=_stubborn, grace=2.0) as api:
        api.add(_workspace())
        _create(api, _manifest(), NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: len(api.trainjob_pods(NS, name)) == 2
                     and all(p["status"]["phase"] == "Running" for p in api.trainjob_pods(NS, name)))
        api.delete("trainjobs", NS, name, "trainer.kubeflow.org", propagation="Foreground")
        job = api.trainjob(NS, name)
        assert job["metadata"]["deletionTimestamp"] and "foregroundDeletion" in job["metadata"]["finalizers"]
        started = time.monotonic()
        api.wait_for(lambda: api.trainjob(NS, name) is None, 10)
        assert api.trainjob_pods(NS, name) == [] and time.monotonic() - started < 5


def test_trainjob_pods_run_isolated_through_the_pod_runtime(tmp_path):
    """The node pods run through tests/cluster/pods.py: as the runtime's user, with the workspace PVC at its mount
    path, PET_NODE_RANK resolved from the completion index, and no service account token (the runtime sets
    automountServiceAccountToken: false)."""
    from cluster.pods import Runtime

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "config.yaml").write_text("x")
    probe = ("import json, os, pathlib; print(json.dumps({'rank': os.environ['PET_NODE_RANK'], 'uid': os.getuid(), "
             "'token': pathlib.Path('/var/run/secrets/kubernetes.io/serviceaccount').exists(), "
             f"'workspace': sorted(os.listdir('/w')), 'tmp': pathlib.Path({str(tmp_path)!r}).exists()}}))")
    manifest = _manifest()
    manifest["spec"]["trainer"]["command"] = ["python", "-c", probe]
    name = trainjob_name("r", "sft")
    with _plain() as api:
        api.run_pods_with(Runtime(tmp_path / "pods", tokens=api.tokens_for), {"ws": workspace})
        api.add(_workspace())
        _create(api, manifest, NS, "posttrain-pipeline-runner")
        api.wait_for(lambda: (api.trainjob(NS, name).get("status") or {}).get("conditions"), 60)
        (condition,) = api.trainjob(NS, name)["status"]["conditions"]
        pods = api.trainjob_pods(NS, name)
        seen = sorted((json.loads(api.container_log(NS, p["metadata"]["name"])[-1]) for p in pods),
                      key=lambda s: s["rank"])
        assert condition["type"] == "Complete", [api.container_log(NS, p["metadata"]["name"]) for p in pods]
    assert [s["rank"] for s in seen] == ["0", "1"]
    assert all(s["uid"] == 10001 and not s["token"] and not s["tmp"] and s["workspace"] == ["config.yaml"]
               for s in seen)


@pytest.mark.parametrize("name", installs.INSTALLS)
def test_each_install_admits_and_starts_a_trainjob_in_its_pods_namespace(name):
    """What a TrainJob of the bundled multi-node specs needs in the namespace the run's pods run in: the
    TrainingRuntime (Trainer's webhook), the LocalQueue posttrain-gpu whose ClusterQueue selects the namespace
    (Kueue), the Secrets its nodes read and the workspace PVC (the kubelet): created by the run's service
    account, admitted, and its two pods running."""
    install = installs.render(name)
    namespace, job = install.pods_namespace, trainjob_name("r", "sft")
    manifest = _manifest(namespace=namespace, queue="posttrain-gpu")
    manifest["spec"]["trainer"]["env"] = [{"name": key, "valueFrom": {"secretKeyRef": {
        "name": secret, "key": key, "optional": False}}} for secret, keys in SECRETS.items() for key in keys]
    with KubeApi(install.objects, install.namespaces, on_pod=_sleeper, grace=0.5) as api:
        api.add(_workspace(namespace))
        _create(api, manifest, namespace, install.service_account)
        api.wait_for(lambda: f"{namespace}/{job}" in api.pending or (
            len(api.trainjob_pods(namespace, job)) == 2
            and all(p["status"]["phase"] != "Pending" for p in api.trainjob_pods(namespace, job))), 20)
        assert api.pending == {}
        assert [p["status"]["phase"] for p in api.trainjob_pods(namespace, job)] == ["Running", "Running"], [
            p["status"] for p in api.trainjob_pods(namespace, job)]
