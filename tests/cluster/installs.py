"""The objects of each documented install (k8s/README.md): what its steps tell the user to apply, rendered with
`kubectl kustomize` as `kubectl apply -k` would (k8s/validate.py render), in the documented order (a later apply
replaces an object an earlier one made), plus what the surrounding platform has, copied from upstream into
tests/cluster/upstream/ (each file names its repository, commit and path) or, where upstream generates it in code,
transcribed here with the function named.

    install = render("profile")
    install.objects, install.namespaces, install.pods_namespace, install.service_account, install.services

- plain: multi-user KFP (kubeflow/pipelines manifests/kustomize/env/plain-multi-user) with the pipeline's pods in a
  plain namespace `posttrain` (k8s/base/namespace.yaml), run as posttrain-pipeline-runner.
- profile: Kubeflow Platform (kubeflow/manifests) with a Profile `posttrain`: the namespace and its labels, the
  AuthorizationPolicy ns-owner-access-istio and the service account default-editor (bound to kubeflow-edit) are
  the Profile controller's; KFP's runs there use default-editor unless a run names another (kubeflow/pipelines
  manifests/kustomize/base/installs/multi-user/api-service/params.env, DEFAULTPIPELINERUNNERSERVICEACCOUNT).
- standalone: single-user KFP (kubeflow/pipelines manifests/kustomize/env/platform-agnostic): every run's pods in
  `kubeflow`, run as KFP's default pipeline-runner (backend/src/apiserver/common/const.go,
  DefaultPipelineRunnerServiceAccount); the services stay in posttrain.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
UPSTREAM = Path(__file__).resolve().parent / "upstream"
INSTALLS = ("plain", "profile", "standalone")
NAMESPACE, KFP_NAMESPACE = "posttrain", "kubeflow"
RUNNER = "posttrain-pipeline-runner"
PROFILE_OWNER = "owner@example.com"  # the Profile's spec.owner.name (any user)

# the pods behind KFP's services: their pod template labels (kubeflow/pipelines manifests/kustomize/base/pipeline/
# ml-pipeline-apiserver-deployment.yaml, base/metadata/base/metadata-grpc-deployment.yaml)
# and those the install's kustomizations add with includeSelectors: application-crd-id on everything
# (env/platform-agnostic and env/plain-multi-user), the app.kubernetes.io pair on multi-user's own resources
# (base/installs/multi-user/kustomization.yaml, which holds the API server but not the metadata server)
KFP_COMMON_LABELS = {"application-crd-id": "kubeflow-pipelines"}
MULTI_USER_LABELS = {"app.kubernetes.io/component": "ml-pipeline", "app.kubernetes.io/name": "kubeflow-pipelines"}
ML_PIPELINE_POD = {"app": "ml-pipeline"}
METADATA_GRPC_POD = {"component": "metadata-grpc-server"}

@dataclass(frozen=True)
class Service:
    """A Service a pod of the pipeline connects to: its cluster name, port, namespace and the labels of the pods
    behind it (None: no pod, the API server)."""
    host: str
    port: int
    namespace: str
    labels: dict[str, str] | None


@dataclass
class Install:
    name: str
    pods_namespace: str
    service_account: str
    objects: list[dict]
    namespaces: dict[str, dict[str, str]]
    services: dict[str, Service] = field(default_factory=dict)  # "mlflow", "minio", "kubernetes", "ml-pipeline", ...
    applied: list[str] = field(default_factory=list)  # what the docs apply, in order (for messages)

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        for obj in self.objects:
            meta = obj.get("metadata") or {}
            if obj.get("kind") == kind and meta.get("name") == name and meta.get("namespace") == namespace:
                return obj
        return None


def _validate_module():
    spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _rendered(target: str) -> tuple[dict, ...]:
    return tuple(_validate_module().render(K8S / target))


def upstream(path: str, namespace: str | None = None) -> list[dict]:
    """The objects of a file copied from upstream, with `namespace` set on the namespaced ones that have none
    (as the kustomization that includes them does)."""
    docs = [d for d in yaml.safe_load_all((UPSTREAM / path).read_text()) if d]
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        if namespace and doc["kind"] not in cluster_scoped:
            doc.setdefault("metadata", {}).setdefault("namespace", namespace)
    return docs


def _key(obj: dict) -> tuple:
    meta = obj.get("metadata") or {}
    return obj.get("apiVersion", "").rpartition("/")[0], obj.get("kind"), meta.get("namespace"), meta.get("name")


class _Cluster:
    """Objects as `kubectl apply` leaves them: a later apply of the same object replaces it."""

    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.applied: list[str] = []

    def apply(self, objects, what: str):
        for obj in objects:
            self.objects[_key(obj)] = copy.deepcopy(obj)
        self.applied.append(what)


def _secrets(namespace: str, names: tuple[str, ...] | None = None) -> list[dict]:
    """The Secrets the docs create with `kubectl create secret` (k8s/README.md step 2 and "Standalone KFP"): the
    templates of k8s/secrets/, in `namespace` (placeholder values)."""
    out = []
    for secret in _validate_module().secret_templates():
        if names is None or secret["metadata"]["name"] in names:
            secret = copy.deepcopy(secret)
            secret["metadata"]["namespace"] = namespace
            out.append(secret)
    return out


def _namespace_labels(path: Path) -> dict[str, str]:
    (namespace,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return dict(namespace["metadata"].get("labels") or {})


def _kfp_multi_user() -> list[dict]:
    """KFP multi-user's Istio policies and its aggregated view/edit roles (kubeflow/pipelines
    manifests/kustomize/env/plain-multi-user; Kubeflow Platform vendors the same files under kubeflow/manifests
    applications/pipeline/upstream/)."""
    base = "kubeflow-pipelines/manifests/kustomize/base"
    return (upstream(f"{base}/installs/multi-user/istio-authorization-config.yaml", KFP_NAMESPACE)
            + upstream(f"{base}/metadata/options/istio/istio-authorization-policy.yaml", KFP_NAMESPACE)
            + upstream(f"{base}/installs/multi-user/view-edit-cluster-roles.yaml"))


def _profile_controller_objects(namespace: str) -> list[dict]:
    """What the Profile controller creates in its namespace (kubeflow/dashboard
    components/profile-controller/controllers/profile_controller.go): the AuthorizationPolicy ns-owner-access-istio
    (getAuthorizationPolicy, with the default USERID_HEADER kubeflow-userid and no prefix), and the service account
    default-editor bound to the ClusterRole kubeflow-edit (updateServiceAccount)."""
    authorization = {
        "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "ns-owner-access-istio", "namespace": namespace},
        "spec": {"action": "ALLOW", "rules": [
            {"when": [{"key": "request.headers[kubeflow-userid]", "values": [PROFILE_OWNER]}],
             "from": [{"source": {"principals": [
                 "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
                 "cluster.local/ns/kubeflow/sa/ml-pipeline-ui"]}}]},
            {"when": [{"key": "source.namespace", "values": [namespace]}]},
            {"to": [{"operation": {"paths": ["/healthz", "/metrics", "/wait-for-drain"]}}]},
            {"from": [{"source": {"principals": ["cluster.local/ns/kubeflow/sa/notebook-controller-service-account"]}}],
             "to": [{"operation": {"methods": ["GET"], "paths": ["*/api/kernels"]}}]},
        ]},
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default-editor",
                                                                        "namespace": namespace}}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "default-editor", "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
               "subjects": [{"kind": "ServiceAccount", "name": "default-editor", "namespace": namespace}]}
    return [authorization, account, binding]


def _services(install: str) -> dict[str, Service]:
    """The services the pipeline's pods and TrainJob nodes connect to, with the labels of the pods behind them
    (MinIO's and MLflow's from the rendered StatefulSet and Deployment)."""
    base = _rendered("base")
    pod_labels = {r["metadata"]["name"]: r["spec"]["template"]["metadata"]["labels"]
                  for r in base if r["kind"] in ("StatefulSet", "Deployment")}
    return {
        "mlflow": Service("mlflow.posttrain.svc.cluster.local", 5000, NAMESPACE, pod_labels["mlflow"]),
        "minio": Service("minio.posttrain.svc.cluster.local", 9000, NAMESPACE, pod_labels["minio"]),
        "kubernetes": Service("kubernetes.default.svc.cluster.local", 443, "default", None),
        "ml-pipeline": Service("ml-pipeline.kubeflow.svc.cluster.local", 8887, KFP_NAMESPACE,
                               {**ML_PIPELINE_POD, **KFP_COMMON_LABELS,
                                **(MULTI_USER_LABELS if install != "standalone" else {})}),
        "metadata-grpc": Service("metadata-grpc-service.kubeflow.svc.cluster.local", 8080, KFP_NAMESPACE,
                                 {**METADATA_GRPC_POD, **KFP_COMMON_LABELS}),
    }


def render(name: str) -> Install:
    """The install `name` (one of INSTALLS) as its documentation builds it."""
    if name not in INSTALLS:
        raise ValueError(f"unknown install {name!r}: one of {INSTALLS}")
    cluster = _Cluster()
    kfp_namespace_file = UPSTREAM / "kubeflow-pipelines/manifests/kustomize/cluster-scoped-resources/namespace.yaml"
    namespaces = {"default": {}, "istio-system": {}}
    if name in ("plain", "standalone"):
        # step 2: kubectl apply -f k8s/base/namespace.yaml; the Secrets; step 3 and the optional sections
        namespaces[NAMESPACE] = _namespace_labels(K8S / "base" / "namespace.yaml")
        namespaces[KFP_NAMESPACE] = _namespace_labels(kfp_namespace_file)
        cluster.apply(_secrets(NAMESPACE), "kubectl -n posttrain create secret ... (step 2)")
        for target in ("overlays/gpu", "overlays/kueue", "overlays/trainer"):
            cluster.apply(_rendered(target), f"kubectl apply -k k8s/{target}")
    if name == "plain":
        cluster.apply(_kfp_multi_user(), "KFP multi-user (kubeflow/pipelines env/plain-multi-user)")
        pods_namespace, account = NAMESPACE, RUNNER
    elif name == "standalone":
        base = "kubeflow-pipelines/manifests/kustomize/base/pipeline"
        cluster.apply(upstream(f"{base}/pipeline-runner-sa.yaml", KFP_NAMESPACE)
                      + upstream(f"{base}/pipeline-runner-role.yaml", KFP_NAMESPACE)
                      + upstream(f"{base}/pipeline-runner-rolebinding.yaml", KFP_NAMESPACE),
                      "standalone KFP's pipeline-runner (kubeflow/pipelines manifests/kustomize/base/pipeline)")
        # "Standalone KFP": label kubeflow, its two Secrets, the overlay that puts the rest there
        namespaces[KFP_NAMESPACE]["posttrain.io/pipeline-runs"] = "true"
        cluster.apply(_secrets(KFP_NAMESPACE, ("posttrain-minio", "posttrain-mlflow")),
                      "kubectl -n kubeflow create secret ... (Standalone KFP)")
        cluster.apply(_rendered("overlays/standalone-kfp-kueue"), "kubectl apply -k k8s/overlays/standalone-kfp-kueue")
        pods_namespace, account = KFP_NAMESPACE, "pipeline-runner"
    elif name == "profile":
        # the Profile's namespace: istio-injection from the controller (profile_controller.go, Reconcile), the
        # default labels of kubeflow/manifests applications/profiles/pss/namespace-labels.yaml
        labels = {"istio-injection": "enabled",
                  **yaml.safe_load((UPSTREAM / "kubeflow-manifests/applications/profiles/pss/"
                                    "namespace-labels.yaml").read_text())}
        namespaces[NAMESPACE] = labels
        namespaces[KFP_NAMESPACE] = _namespace_labels(
            UPSTREAM / "kubeflow-manifests/common/kubeflow-namespace/base/kubeflow/namespace.yaml")
        kubeflow_ns = "kubeflow-manifests/common/kubeflow-namespace/base/kubeflow"
        cluster.apply(
            [o for f in ("default-allow-same-namespace", "ml-pipeline", "metadata-grpc-server", "ml-pipeline-ui")
             for o in upstream(f"{kubeflow_ns}/{f}.yaml", KFP_NAMESPACE)]
            + _kfp_multi_user()
            + upstream("kubeflow-manifests/common/kubeflow-roles/base/cluster-roles.yaml")
            + upstream("kubeflow-manifests/applications/trainer/upstream/overlays/kubeflow-platform/"
                       "kubeflow-trainer-roles.yaml")
            + _profile_controller_objects(NAMESPACE),
            "Kubeflow Platform (kubeflow/manifests) and the Profile posttrain")
        cluster.apply(_secrets(NAMESPACE), "kubectl -n posttrain create secret ... (step 2)")
        for target in ("overlays/kubeflow-profile", "overlays/kueue", "overlays/trainer"):
            cluster.apply(_rendered(target), f"kubectl apply -k k8s/{target}")
        pods_namespace, account = NAMESPACE, "default-editor"
    if (K8S / "overlays" / "workspace-fsgroup").is_dir():  # cluster-wide, once ("Workspace permissions")
        cluster.apply(_rendered("overlays/workspace-fsgroup"), "kubectl apply -k k8s/overlays/workspace-fsgroup")
    return Install(name=name, pods_namespace=pods_namespace, service_account=account,
                   objects=list(cluster.objects.values()), namespaces=namespaces, services=_services(name),
                   applied=cluster.applied)
