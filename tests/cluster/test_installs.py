"""Each documented install (tests/cluster/installs.py: plain namespace, Kubeflow profile, standalone KFP) passes the
emulator's network, RBAC and namespace checks with the rendered manifests, for every pod the project causes to be
created and every connection it makes.

The pods:
- KFP's pods of the compiled cluster-7b pipeline: each executor's pod with the labels of its Kubernetes platform
  config (podMetadata) plus pipelines.kubeflow.org/v2_component=true, which KFP's compiler puts on every pod of the
  workflow (kubeflow/pipelines backend/src/v2/compiler/argocompiler/argo.go, PodMetadata), and the driver and
  importer pods, which carry only that label.
- The TrainJob nodes: the pod template labels of the TrainingRuntime the install renders in the pods' namespace,
  plus what JobSet and the Job controller add (kubernetes-sigs/jobset pkg/controllers/jobset_controller.go
  labelAndAnnotateObject; kubernetes/kubernetes pkg/controller/job/indexed_job_utils.go) and the TrainJob's runtime
  patch (components/trainjob.py: no labels).

The connections (who opens them):
- every KFP pod: MinIO 9000 (the launcher's artifacts, the steps' data), MLflow 5000 (the steps' tracking), the
  Kubernetes API (driver and launcher; preflight and the TrainJob launcher), ml-pipeline 8887 and
  metadata-grpc-service 8080 (kubeflow/pipelines backend/src/v2/cmd/launcher-v2/main.go and cmd/driver/main.go
  flags ml_pipeline_server_port, mlmd_server_port);
- every TrainJob node: MinIO and MLflow (rank 0 logs to MLflow, components/training), and every other node on
  torchrun's rendezvous port 29400 and the master port 29500 (and gloo's, which a policy without ports admits alike).
"""

from __future__ import annotations

import pytest
import yaml

from . import installs
from .network import Network, selects

INSTALLS = installs.INSTALLS
V2_COMPONENT = {"pipelines.kubeflow.org/v2_component": "true"}
STEP_PORTS = ("minio", "mlflow", "kubernetes", "ml-pipeline", "metadata-grpc")
NODE_PORTS = ("minio", "mlflow")
RENDEZVOUS_PORTS = (29400, 29500)


class _Rendered(dict):
    """Each install rendered on first use (one that fails to render fails only its own tests)."""

    def __missing__(self, name: str) -> installs.Install:
        self[name] = installs.render(name)
        return self[name]


@pytest.fixture(scope="module")
def rendered() -> dict[str, installs.Install]:
    return _Rendered()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """The cluster-7b pipeline as compiled (the pods' labels do not depend on the namespace)."""
    from pipelines.posttrain import compile_spec

    out = compile_spec("cluster-7b", tmp_path_factory.mktemp("c7b") / "pipeline.yaml")
    pipeline, platform = yaml.safe_load_all(out.read_text())
    return {"pipeline": pipeline, "k8s": platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]}


def step_pods(compiled: dict) -> dict[str, dict[str, str]]:
    """Name → labels of every KFP pod of a run."""
    pods = {"driver": dict(V2_COMPONENT), "importer": dict(V2_COMPONENT)}
    for executor, config in compiled["k8s"].items():
        pods[executor] = {**((config.get("podMetadata") or {}).get("labels") or {}), **V2_COMPONENT}
    assert {"exec-sft", "exec-grpo", "exec-evaluate", "exec-register"} <= set(pods)
    return pods


def node_pods(install: installs.Install, nodes: int = 2) -> dict[str, dict[str, str]]:
    """Name → labels of the nodes of a TrainJob `pt-x` in the pods' namespace, from the runtime it references."""
    runtime = install.find("TrainingRuntime", "posttrain-trainer", install.pods_namespace)
    assert runtime is not None, f"no TrainingRuntime posttrain-trainer in {install.pods_namespace}"
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    template = (job["template"]["spec"]["template"].get("metadata") or {}).get("labels") or {}
    return {f"pt-x-node-0-{i}": {**template, "jobset.sigs.k8s.io/jobset-name": "pt-x",
                                 "jobset.sigs.k8s.io/replicatedjob-name": job["name"],
                                 "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-name": "pt-x-node-0",
                                 "batch.kubernetes.io/job-completion-index": str(i)} for i in range(nodes)}


def _connect(net: Network, install: installs.Install, labels: dict, service: str) -> tuple[bool, str]:
    s = install.services[service]
    return net.allowed(install.pods_namespace, labels, s.namespace, s.labels, s.port,
                       src_service_account=install.service_account)


# --- network ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INSTALLS)
def test_every_step_pod_reaches_every_service_it_uses(name, rendered, compiled):
    install = rendered[name]
    net = Network(install.objects, install.namespaces)
    refused = [f"{pod} → {service}: {why}" for pod, labels in step_pods(compiled).items() for service in STEP_PORTS
               for ok, why in [_connect(net, install, labels, service)] if not ok]
    assert refused == []


@pytest.mark.parametrize("name", INSTALLS)
def test_trainjob_nodes_reach_mlflow_and_minio(name, rendered):
    """Rank 0 opens its MLflow run synchronously and every node reads and writes S3: a node MinIO's or MLflow's
    NetworkPolicy refuses fails the stage (the policies admitted only KFP's v2_component pods)."""
    install = rendered[name]
    net = Network(install.objects, install.namespaces)
    refused = [f"{pod} → {service}: {why}" for pod, labels in node_pods(install).items() for service in NODE_PORTS
               for ok, why in [_connect(net, install, labels, service)] if not ok]
    assert refused == []


@pytest.mark.parametrize("name", INSTALLS)
def test_trainjob_nodes_reach_each_other(name, rendered):
    install = rendered[name]
    net = Network(install.objects, install.namespaces)
    pods = node_pods(install)
    for a, b in [(a, b) for a in pods for b in pods if a != b]:
        for port in RENDEZVOUS_PORTS:
            assert net.allowed(install.pods_namespace, pods[a], install.pods_namespace, pods[b], port) == \
                (True, "allowed"), (a, b, port)


@pytest.mark.parametrize("name", INSTALLS)
def test_other_pods_stay_out(name, rendered):
    """The policies still refuse what they should: a pod of another namespace, and (but in the pods' own
    namespace, where the policies admit by pod label) an unlabelled pod, reaching MinIO and MLflow; and nothing
    but MLflow reaches Postgres."""
    install = rendered[name]
    net = Network(install.objects, {**install.namespaces, "elsewhere": {}})
    for service in ("minio", "mlflow"):
        s = install.services[service]
        assert not net.allowed("elsewhere", V2_COMPONENT, s.namespace, s.labels, s.port)[0], service
        assert not net.allowed(s.namespace, {"app": "notebook"}, s.namespace, s.labels, s.port)[0], service
    postgres = {"app.kubernetes.io/name": "postgres", "app.kubernetes.io/part-of": "posttrain"}
    assert not net.allowed(install.pods_namespace, V2_COMPONENT, "posttrain", postgres, 5432)[0]


def test_the_profile_install_has_istio_where_kubeflow_has_it(rendered):
    """In the profile install ml-pipeline and metadata-grpc have sidecars (the kubeflow namespace is labelled
    istio-injection: enabled) and the steps do not: the steps get through because Kubeflow sets no STRICT
    PeerAuthentication and ml-pipeline's AuthorizationPolicy admits requests without a kubeflow-userid header. A
    STRICT mesh would refuse them, and a request carrying that header is refused."""
    install = rendered["profile"]
    net = Network(install.objects, install.namespaces)
    step = {"posttrain/stage": "psft", "sidecar.istio.io/inject": "false", **V2_COMPONENT}
    api = install.services["ml-pipeline"]
    assert net.has_sidecar(api.namespace, api.labels) and not net.has_sidecar("posttrain", step)
    assert _connect(net, install, step, "ml-pipeline")[0]
    assert not net.allowed("posttrain", step, api.namespace, api.labels, api.port,
                           request={"headers": {"kubeflow-userid": "someone@example.com"}})[0]
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}
    net = Network([*install.objects, strict], install.namespaces)
    for service in ("ml-pipeline", "metadata-grpc"):
        ok, why = _connect(net, install, step, service)
        assert not ok and "STRICT" in why
    # MinIO and MLflow carry no sidecar, so the Profile's ns-owner-access-istio does not apply to them
    assert _connect(net, install, step, "mlflow")[0]


# --- RBAC ---------------------------------------------------------------------------------------------------

# what the pods do with the run's service account in their namespace: (verb, group, resource, name, subresource)
STEP_REQUESTS = [
    # KFP's launcher reads the launcher config and the Secret its providers name (kubeflow/pipelines
    # backend/src/v2/config/env.go, objectstore); preflight checks both Secrets exist (components/preflight/main.py)
    ("get", "", "configmaps", "kfp-launcher", None),
    ("get", "", "secrets", "posttrain-minio", None),
    ("get", "", "secrets", "posttrain-mlflow", None),
    # KFP's driver creates and deletes the run's workspace PVC; Argo's executor reports results
    ("create", "", "persistentvolumeclaims", None, None),
    ("delete", "", "persistentvolumeclaims", "ws", None),
    ("create", "argoproj.io", "workflowtaskresults", None, None),
    ("patch", "argoproj.io", "workflowtaskresults", "r", None),
    # a multi-node stage's step (components/trainjob.py): its own pod (workspace_claim), the TrainJob, its pods' logs
    ("get", "", "pods", "step", None),
    ("list", "", "pods", None, None),
    ("get", "", "pods", "pt-x-node-0-0", "log"),
    ("create", "trainer.kubeflow.org", "trainjobs", None, None),
    ("get", "trainer.kubeflow.org", "trainjobs", "pt-x", None),
    ("list", "trainer.kubeflow.org", "trainjobs", None, None),
    ("delete", "trainer.kubeflow.org", "trainjobs", "pt-x", None),
    # ... owned by the run's Argo Workflow, which it reads for its uid (components/trainjob.py)
    ("get", "argoproj.io", "workflows", "run-abc", None),
]


@pytest.mark.parametrize("name", INSTALLS)
def test_the_run_service_accounts_may_do_what_the_pods_do(name, rendered):
    """KFP's default run account of the install (default-editor in a profile, pipeline-runner in standalone KFP)
    and the one the docs and `posttrain submit` name, posttrain-pipeline-runner, both may."""
    from .kube import rbac_allows

    install = rendered[name]
    ns = install.pods_namespace
    for account in {install.service_account, installs.RUNNER}:
        refused = [r for r in STEP_REQUESTS if not rbac_allows(install.objects, ns, (ns, account), *r)]
        assert refused == [], f"{ns}/{account} may not {refused}"


@pytest.mark.parametrize("name", INSTALLS)
def test_the_runner_reads_no_other_secret_and_nothing_elsewhere(name, rendered):
    from .kube import rbac_allows

    install = rendered[name]
    ns = install.pods_namespace
    runner = (ns, installs.RUNNER)
    assert not rbac_allows(install.objects, ns, runner, "get", "", "secrets", "posttrain-minio-root")
    assert not rbac_allows(install.objects, ns, runner, "create", "trainer.kubeflow.org", "trainingruntimes")
    other = "posttrain" if ns == "kubeflow" else "kubeflow"
    assert not rbac_allows(install.objects, other, runner, "create", "trainer.kubeflow.org", "trainjobs")


# --- namespaces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INSTALLS)
def test_what_the_pods_need_exists_in_their_namespace(name, rendered):
    """The spec's LocalQueue (a step's or TrainJob's queue label names a LocalQueue of its own namespace, whose
    ClusterQueue must select that namespace: kubernetes-sigs/kueue pkg/controller/jobframework), the TrainingRuntime
    (kubeflow/trainer: runtimeRef names a runtime of the TrainJob's namespace), the launcher config, the runner's
    service account and the two Secrets, all in the namespace the pods run in."""
    install = rendered[name]
    ns = install.pods_namespace
    needed = [("LocalQueue", "posttrain-gpu"), ("TrainingRuntime", "posttrain-trainer"), ("ConfigMap", "kfp-launcher"),
              ("ServiceAccount", installs.RUNNER), ("ServiceAccount", install.service_account),
              ("Secret", "posttrain-minio"), ("Secret", "posttrain-mlflow"), ("Role", "posttrain-trainjobs")]
    missing = [f"{kind}/{n}" for kind, n in needed if install.find(kind, n, ns) is None]
    assert missing == [], f"missing in {ns}: {missing}"
    queue = install.find("LocalQueue", "posttrain-gpu", ns)
    cluster_queue = install.find("ClusterQueue", queue["spec"]["clusterQueue"])
    assert selects(cluster_queue["spec"]["namespaceSelector"],
                   {"kubernetes.io/metadata.name": ns, **install.namespaces[ns]})


@pytest.mark.parametrize("name", INSTALLS)
def test_every_namespaced_object_names_its_namespace(name, rendered):
    """`kubectl apply -k` puts an object without a namespace in kubectl's current namespace, wherever that is."""
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterQueue", "ResourceFlavor",
                      "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"}
    install = rendered[name]
    loose = [f"{o['kind']}/{o['metadata']['name']}" for o in install.objects
             if o["kind"] not in cluster_scoped and not o["metadata"].get("namespace")]
    assert loose == []
    assert {o["metadata"]["namespace"] for o in install.objects if o["kind"] not in cluster_scoped} <= \
        set(install.namespaces)


# --- through the proxies ------------------------------------------------------------------------------------


def test_the_proxies_apply_the_rendered_policies(rendered, compiled):
    """A pod's connection to MLflow's name goes through its proxy: a step and a TrainJob node of the plain install
    get through to the server, a pod of the namespace without the labels is refused and recorded."""
    import socket
    import threading
    from types import SimpleNamespace

    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"mlflow")

    threading.Thread(target=serve, daemon=True).start()
    install = rendered["plain"]
    mlflow = install.services["mlflow"]
    pods = {"step": step_pods(compiled)["exec-sft"], "node": node_pods(install)["pt-x-node-0-1"],
            "notebook": {"app": "notebook"}}
    try:
        with Network(install.objects, install.namespaces) as net:
            net.add_service(mlflow.host, mlflow.port, mlflow.namespace, mlflow.labels, server.getsockname())
            answers = {}
            for name, labels in pods.items():
                hosts = net.attach(SimpleNamespace(name=name, namespace=install.pods_namespace, labels=labels))
                with socket.create_connection((hosts[mlflow.host], mlflow.port), timeout=5) as conn:
                    try:
                        answers[name] = conn.recv(16)
                    except ConnectionResetError:
                        answers[name] = b""
            assert answers == {"step": b"mlflow", "node": b"mlflow", "notebook": b""}
            (refused,) = net.denied
            assert refused.startswith("posttrain/notebook → mlflow.posttrain.svc.cluster.local:5000: ingress of")
    finally:
        server.close()
