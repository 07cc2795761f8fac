"""The Kubernetes API that posttrain's pods call, strict as a cluster is, with Kubeflow Trainer v2.3, JobSet v0.12,
the Job controller, the garbage collector and Kueue's admission behind it.

    api = KubeApi(install.objects, install.namespaces)              # or on_pod=hook(pod_manifest, log_path)
    api.run_pods_with(pods.Runtime(root, tokens=api.tokens_for), {"<claimName>": workspace_dir}, hosts=...)
    with api:
        env = api.pod_env()                                     # KUBERNETES_SERVICE_HOST/PORT for a pod
        files = api.service_account_dir("posttrain", "posttrain-pipeline-runner")   # token, ca.crt, namespace
        url = api.proxy("posttrain", "posttrain-pipeline-runner")   # plain HTTP acting as that account
        api.add(workflow); api.add(step_pod); api.add(pvc)      # what other controllers create, as the admin

What it serves, as the API server does:
- HTTPS on loopback with a self-signed CA; every request carries a service account's bearer token (the token a
  pod mounts: kubernetes.config.load_incluster_config reads KUBERNETES_SERVICE_HOST/PORT and
  /var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}); 401 without one. A `proxy()` URL is plain HTTP
  bound to one service account, as `kubectl proxy` is bound to its kubeconfig's user.
- RBAC (rbac_allows: kubernetes/kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go and
  pkg/apis/rbac/v1/evaluation_helpers.go) on every request; 403 with Kubernetes' Status body otherwise.
- get/list/create/delete of any namespaced kind the install has (Roles, Secrets, LocalQueues, ...), in namespaces
  that exist; pods (get, list by label selector, the log followed with RFC 3339 timestamps).
- TrainJob create: the CRD schema pinned in k8s/crds/ (k8s/validate.py crd_errors: 422 Invalid), then Trainer's
  validating webhook (kubeflow/trainer pkg/webhooks/trainjob_webhook.go → pkg/runtime/core/trainingruntime.go
  ValidateObjects: the referenced TrainingRuntime must exist in the TrainJob's namespace;
  pkg/runtime/framework/plugins/jobset/jobset.go Validate: runtime patches name existing replicated jobs and
  containers, no env on the `node` container; plugins/torch/torch.go: no reserved PET_* env), and the garbage
  collector admission (plugin/pkg/admission/gc/gc_admission.go: blockOwnerDeletion needs update on the owner's
  finalizers).
- Kueue (kubernetes-sigs/kueue pkg/controller/jobframework, pkg/controller/core/workload_controller.go): a
  TrainJob labelled kueue.x-k8s.io/queue-name is suspended until admitted; it is admitted only when the LocalQueue
  exists in its namespace, its ClusterQueue exists, selects the namespace, and has the quota for all its pods.
  Otherwise it stays pending forever (`pending` says why).
- Trainer v2.3's controller (pkg/runtime/core/trainingruntime.go newRuntimeInfo + mergeRuntimePatches,
  plugins/jobset/builder.go Trainer, plugins/jobset/jobset.go SyncParallelCount, plugins/torch/torch.go
  EnforceMLPolicy): the TrainingRuntime's JobSet template, each runtime patch merged as a strategic merge patch,
  the trainer's image/command/env/resources on the `node` container, PET_NNODES, PET_NPROC_PER_NODE,
  PET_NODE_RANK (from the completion index annotation), PET_MASTER_ADDR <trainjob>-node-0-0.<trainjob>,
  PET_MASTER_PORT 29500, and parallelism = completions = numNodes on the replicated job the runtime labels
  trainer.kubeflow.org/trainjob-ancestor-step: trainer (replicas 1).
- JobSet v0.12 (pkg/webhooks/jobset_webhook.go defaults: Indexed completion, restartPolicy OnFailure, DNS
  hostnames with subdomain = the JobSet's name; pkg/controllers/jobset_controller.go labelAndAnnotateObject:
  jobset-name, jobset-uid, replicatedjob-name, replicatedjob-replicas, job-index (the replica of the replicated
  job: 0 for every node here), job-key, ...), and its conditions (pkg/constants: FailedJobs, AllJobsCompleted),
  which Trainer copies to the TrainJob (plugins/jobset/jobset.go Status).
- The Job controller (kubernetes/kubernetes pkg/controller/job/indexed_job_utils.go): one pod per completion
  index, named <job>-<index>-<suffix>, hostname <job>-<index>, the annotation and (PodIndexLabel, on by default
  since 1.28) the label batch.kubernetes.io/job-completion-index, JOB_COMPLETION_INDEX; restartPolicy OnFailure
  restarts the container in place until backoffLimit (default 6) failures, then the Job fails and its other pods
  are killed.
- The kubelet: env from fieldRef and Secrets (a missing Secret or key leaves the pod Pending with
  CreateContainerConfigError), the pod's PVCs must exist (else Pending), deletion sends SIGTERM and, after
  terminationGracePeriodSeconds (`grace` unless the pod sets it), SIGKILL.
- Deletion (kubernetes/kubernetes pkg/controller/garbagecollector): Foreground keeps the object, with
  deletionTimestamp and the foregroundDeletion finalizer, until its dependents (the pods) are gone; Background
  (the default for custom resources) removes it at once and its dependents after. Deleting an owner (a Workflow)
  collects every object whose ownerReferences name it by uid; an object none of whose owners exist (by uid) is
  collected too.

- KServe v0.20 (serving.kserve.io, at the versions its CRDs serve; another is 404): an InferenceService or
  ServingRuntime is pruned of the fields its CRD pinned in k8s/crds/ does not declare (refused, 400, with
  fieldValidation=Strict) and checked against that schema (422 Invalid), an InferenceService then against KServe's
  validating webhook (_admit_inferenceservice, each rule naming its file) on create and on a merge patch (PATCH,
  application/merge-patch+json, with a metadata.resourceVersion other than the stored one 409 Conflict); each new
  generation is reconciled (_reconcile_inferenceservice): the ServingRuntime, the service account and its Secrets
  (one missing: no pod), the predictor pod (stored, labelled as KServe labels it, with its Knative revision in
  Knative mode, never run: no vLLM; a Deployment's earlier pods go, a revision's stay while it has traffic),
  scheduling on `nodes`, and the storage initializer's download from S3 with the Secret's keys, through `network`
  when set; then Ready and the URL, or the failure as KServe reports it (conditions, modelStatus.lastFailureInfo).

Pods run through `on_pod(pod, log) -> process-like` (subprocess.Popen's poll/wait/send_signal/kill): the cluster
passes the pod as the API shows it and the path its container writes its output to; `pod_environment(pod)` gives
the environment the kubelet would set. Not emulated: scheduling on nodes (node selectors, tolerations, GPUs),
images, the TrainJob's activeDeadlineSeconds, JobSet restarts (failurePolicy), watch requests.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import signal
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[2]

TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
ANCESTOR_LABEL, ANCESTOR_TRAINER, NODE = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer", "node"
TRAINER_PORT = 29500  # kubeflow/trainer pkg/constants/constants.go ContainerTrainerPort
RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"  # argoproj/argo-workflows workflow/common/common.go
KSERVE_GROUP = "serving.kserve.io"
KSERVE_MODE = "serving.kserve.io/deploymentMode"  # kserve pkg/constants/constants.go DeploymentMode
KSERVE_VERSIONS = {"inferenceservices": "v1beta1", "servingruntimes": "v1alpha1", "clusterservingruntimes": "v1alpha1"}
"""The version each KServe resource is served at (the pinned CRDs); another one is 404, as the API server says."""
KNATIVE_REVISION = "serving.knative.dev/revision"  # knative.dev/serving pkg/apis/serving/register.go RevisionLabelKey
KSERVE_FRAMEWORKS = ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
                     "lightgbm", "paddle", "model")  # kserve pkg/apis/serving/v1beta1/predictor.go PredictorSpec

# kind → plural, for the kinds an install has (the API server's discovery)
PLURALS = {"NetworkPolicy": "networkpolicies", "Ingress": "ingresses", "StorageClass": "storageclasses",
           "PriorityClass": "priorityclasses", "ResourceQuota": "resourcequotas"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterQueue", "ResourceFlavor",
                  "ClusterTrainingRuntime", "CustomResourceDefinition", "StorageClass", "PriorityClass",
                  "PersistentVolume", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
                  "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding", "APIService"}


def plural(kind: str) -> str:
    return PLURALS.get(kind) or kind.lower() + ("es" if kind.endswith("s") else "s")


def group_of(obj: dict) -> str:
    api = obj.get("apiVersion", "v1")
    return api.rpartition("/")[0] if "/" in api else ""


# ---------------------------------------------------------------------------------------------------------------
# RBAC: kubernetes/kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go, pkg/apis/rbac/v1/evaluation_helpers.go,
# pkg/registry/rbac/validation/rule.go (appliesToUser), pkg/controller/clusterroleaggregation


def _selector_matches(selector: dict, labels: dict) -> bool:
    """A metav1.LabelSelector (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def aggregated_cluster_roles(objects: list[dict]) -> dict[str, list[dict]]:
    """ClusterRole name → its rules, with aggregationRule resolved as the aggregation controller does (the rules of
    every ClusterRole its selectors match, to a fixed point: an aggregated role can itself be aggregated)."""
    roles = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "ClusterRole"}
    rules = {name: list(role.get("rules") or []) for name, role in roles.items()}
    changed = True
    while changed:
        changed = False
        for name, role in roles.items():
            selectors = (role.get("aggregationRule") or {}).get("clusterRoleSelectors")
            if not selectors:
                continue
            merged: list[dict] = []
            for other, other_role in sorted(roles.items()):
                if other != name and any(_selector_matches(s, other_role["metadata"].get("labels") or {})
                                         for s in selectors):
                    merged += [r for r in rules[other] if r not in merged]
            if merged != rules[name]:
                rules[name], changed = merged, True
    return rules


def rule_allows(rule: dict, verb: str, group: str, resource: str, subresource: str | None, name: str | None) -> bool:
    """VerbMatches, APIGroupMatches, ResourceMatches and ResourceNameMatches of evaluation_helpers.go."""
    if not {"*", verb} & set(rule.get("verbs") or []):
        return False
    if not {"*", group} & set(rule.get("apiGroups") or []):
        return False
    combined = f"{resource}/{subresource}" if subresource else resource
    resources = rule.get("resources") or []
    if not ("*" in resources or combined in resources or (
            subresource and f"*/{subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (name is not None and name in names)


def _applies(subject: dict, sa_namespace: str, sa_name: str, binding_namespace: str) -> bool:
    """rule.go appliesToUser for a service account's user and groups."""
    kind, subject_name = subject.get("kind"), subject.get("name")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and namespace == sa_namespace and subject_name == sa_name
    if kind == "User":
        return subject_name == f"system:serviceaccount:{sa_namespace}:{sa_name}"
    if kind == "Group":
        return subject_name in ("system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}",
                                "system:authenticated")
    return False


def _namespace_of(obj: dict) -> str:
    namespace = obj.get("metadata", {}).get("namespace")
    if not namespace:
        raise ValueError(f"{obj.get('kind')}/{obj['metadata'].get('name')} has no namespace: an install must say "
                         "which namespace each namespaced object is applied to")
    return namespace


class Rbac:
    """The RBAC objects of an install, evaluated as rbac.go does (the aggregated ClusterRoles computed once)."""

    def __init__(self, objects: list[dict]):
        self.cluster_rules = aggregated_cluster_roles(objects)
        self.roles = {(_namespace_of(o), o["metadata"]["name"]): o.get("rules") or []
                      for o in objects if o.get("kind") == "Role"}
        self.bindings = [(o, "" if o["kind"] == "ClusterRoleBinding" else _namespace_of(o))
                         for o in objects if o.get("kind") in ("RoleBinding", "ClusterRoleBinding")]

    def allows(self, namespace: str, service_account: tuple[str, str], verb: str, group: str, resource: str,
               name: str | None = None, subresource: str | None = None) -> bool:
        sa_namespace, sa_name = service_account
        for binding, binding_namespace in self.bindings:
            if binding["kind"] == "RoleBinding" and binding_namespace != namespace:
                continue
            if not any(_applies(s, sa_namespace, sa_name, binding_namespace) for s in binding.get("subjects") or []):
                continue
            ref = binding["roleRef"]
            if ref["kind"] == "ClusterRole":
                rules = self.cluster_rules.get(ref["name"], [])
            elif binding["kind"] == "RoleBinding":
                rules = self.roles.get((binding_namespace, ref["name"]), [])
            else:
                rules = []
            if any(rule_allows(r, verb, group, resource, subresource, name) for r in rules):
                return True
        return False


def rbac_allows(objects: list[dict], namespace: str, service_account: tuple[str, str], verb: str, group: str,
                resource: str, name: str | None = None, subresource: str | None = None) -> bool:
    """Whether the service account (its namespace, its name) may `verb` the resource in `namespace` ("" for a
    cluster-scoped resource): some ClusterRoleBinding, or a RoleBinding of `namespace`, binds it to a role with a
    rule that allows the request."""
    return Rbac(objects).allows(namespace, service_account, verb, group, resource, name, subresource)


# ---------------------------------------------------------------------------------------------------------------
# Strategic merge patch: the merge keys of k8s.io/api core/v1 types.go (patchMergeKey) and JobSet's replicatedJobs

MERGE_KEYS = {"replicatedJobs": "name", "containers": "name", "initContainers": "name", "volumes": "name",
              "volumeMounts": "mountPath", "env": "name", "ports": "containerPort", "imagePullSecrets": "name"}


def strategic_merge(source, patch, key: str | None = None):
    """apimachinery strategicpatch.StrategicMergePatch for maps and the lists of MERGE_KEYS; other lists are
    replaced, a null deletes."""
    if isinstance(source, dict) and isinstance(patch, dict):
        out = dict(source)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(out.get(k), v, k)
        return out
    if isinstance(source, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key, out = MERGE_KEYS[key], [copy.deepcopy(x) for x in source]
        for item in patch:
            for i, existing in enumerate(out):
                if isinstance(existing, dict) and existing.get(merge_key) == item.get(merge_key):
                    out[i] = strategic_merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _upsert(items: list[dict], new: list[dict], key: str = "name") -> list[dict]:
    """kubeflow/trainer pkg/apply UpsertEnvVars / UpsertPort: replace the item of the same key, else append."""
    out = list(items)
    for item in new:
        for i, existing in enumerate(out):
            if existing.get(key) == item.get(key):
                out[i] = item
                break
        else:
            out.append(item)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Quantities (k8s.io/apimachinery pkg/api/resource)

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "n": 1e-9, "u": 1e-6, "m": 1e-3,
           "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def quantity(text) -> float:
    number, suffix = re.fullmatch(r"([0-9.eE+-]+?)([KMGTP]i|[numkMGTP]?)", str(text)).groups()
    return float(number) * _SUFFIX[suffix]


# ---------------------------------------------------------------------------------------------------------------
# TLS


def _self_signed(hosts: tuple[str, ...]) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, server certificate, server key) in PEM: the server's names are the loopback addresses and
    the API service's DNS names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emulated-cluster-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = [x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                         "kubernetes.default.svc.cluster.local", "localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _crd_validator():
    spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    schemas = module.crd_schemas()

    def validate(resource: dict) -> list[str] | None:
        return module.crd_errors(resource, schemas)

    validate.schemas = schemas
    return validate


def _selects(selector: str, labels: dict) -> bool:
    """Equality label selectors (k=v, k==v, k!=v) and existence (k, !k)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = re.split(r"==?", term, maxsplit=1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ApiError(Exception):
    """A refused request: its HTTP code, Status reason and message."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


# ---------------------------------------------------------------------------------------------------------------
# Pods


class _Container:
    """One run of a pod's container: its process and its log, read back with the kubelet's timestamps."""

    def __init__(self, process, log: Path):
        self.process, self.log = process, log
        self.lines: list[tuple[str, str]] = []
        self.exit_code: int | None = None
        self._offset, self._partial, self._last_ns = 0, b"", 0

    def read(self) -> None:
        """Take what the container wrote since the last read, one timestamp per line (strictly increasing)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            seconds, nanos = divmod(self._last_ns, 10**9)
            stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
            self.lines.append((stamp, raw.decode(errors="replace")))

    def flush(self) -> None:
        self.read()
        if self._partial:
            self._partial += b"\n"
            self.read()


class KubeApi:
    """The API server and controllers; see the module docstring."""

    def __init__(self, objects: list[dict], namespaces: dict[str, dict[str, str]] | None = None, *,
                 on_pod: Callable[[dict, Path], object] | None = None, grace: float = 2.0,
                 restart_delay: float = 0.2, tls_hosts: tuple[str, ...] = ("127.0.0.1",), workdir: Path | None = None):
        self.lock = threading.Condition(threading.RLock())
        self.objects: dict[tuple[str, str, str, str], dict] = {}
        """(group, plural, namespace, name) → the object ("" namespace: cluster-scoped)."""
        self.namespaces = dict(namespaces or {})
        for obj in objects:
            if obj.get("kind") == "Namespace":
                self.namespaces.setdefault(obj["metadata"]["name"], dict(obj["metadata"].get("labels") or {}))
        for name, labels in self.namespaces.items():
            labels.setdefault("kubernetes.io/metadata.name", name)
        self.on_pod, self.grace, self.restart_delay = on_pod, grace, restart_delay
        self.tokens: dict[str, tuple[str, str]] = {}
        self.created: list[str] = []
        """Names of the TrainJobs created, in order."""
        self.deleted: list[str] = []
        """Names of the TrainJobs whose deletion was requested (by a client or the garbage collector)."""
        self.last_created: dict | None = None
        """The last TrainJob created, as the client sent it."""
        self.requests: list[tuple[str, str, str]] = []
        """(service account, method, path) of every request."""
        self.refused: list[str] = []
        """Every 401/403 and webhook refusal, as the Status message says it."""
        self.pending: dict[str, str] = {}
        """TrainJob (namespace/name) → why Kueue does not admit it."""
        self.log_streams: dict[str, int] = {}
        """Followed log streams opened, by pod."""
        self.nodes: list[dict] = []
        """The cluster's nodes ({name, labels, taints, allocatable}) KServe's predictor pods are scheduled on; none:
        any pod is scheduled."""
        self.network = None
        """A network.Network: the storage initializer of a predictor pod connects to S3 through it, as that pod."""
        self.kserve_downloads: list[tuple[str, str, list[str]]] = []
        """(predictor pod, storageUri, the files downloaded) of each storage initializer that succeeded."""
        self.kserve_writes: list[tuple[str, str, dict]] = []
        """(create or patch, InferenceService, the object as stored, without status) of each write admitted."""
        self.drop_log_after: int | None = None
        """Cut each pod's first followed log stream after this many lines while the pod runs (a dropped
        connection): the client must reconnect."""
        self._containers: dict[tuple[str, str], list[_Container]] = {}
        self._failures: dict[str, int] = {}
        self._validate = _crd_validator()
        self._workdir = Path(workdir or tempfile.mkdtemp(prefix="kube-api-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._servers: list[ThreadingHTTPServer] = []
        self._stopped = threading.Event()
        self.rbac_objects = copy.deepcopy(objects)
        self.rbac = Rbac(self.rbac_objects)
        """The install's RBAC, which every request is checked against."""
        for obj in objects:
            if obj.get("kind") != "Namespace":
                self._store(copy.deepcopy(obj))
        self.ca_pem, cert, key = _self_signed(tls_hosts)
        (self._workdir / "ca.crt").write_bytes(self.ca_pem)
        (self._workdir / "tls.crt").write_bytes(cert)
        (self._workdir / "tls.key").write_bytes(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._workdir / "tls.crt", self._workdir / "tls.key")
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(None))
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._servers.append(server)
        self.host, self.port = "127.0.0.1", server.server_address[1]
        self.url = f"https://{self.host}:{self.port}"
        self.ca_file = self._workdir / "ca.crt"

    # --- lifecycle
    def __enter__(self) -> KubeApi:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        threading.Thread(target=self._tail_logs, daemon=True).start()

    def stop(self) -> None:
        """Stop serving and end every pod's process (SIGKILL)."""
        self._stopped.set()
        with self.lock:
            for runs in self._containers.values():
                for c in runs:
                    if c.process is not None:
                        _kill(c.process)
            self.lock.notify_all()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # --- identities
    def token(self, namespace: str, service_account: str) -> str:
        """A bearer token of the service account (what the kubelet mounts in its pods). The account must exist, as
        the ServiceAccount admission plugin requires of a pod ("default" exists in every namespace)."""
        if namespace not in self.namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        if service_account != "default" and ("", "serviceaccounts", namespace, service_account) not in self.objects:
            raise ApiError(403, "Forbidden", f'error looking up service account {namespace}/{service_account}: '
                                             f'serviceaccount "{service_account}" not found')
        token = secrets.token_urlsafe(24)
        self.tokens[token] = (namespace, service_account)
        return token

    def service_account_dir(self, namespace: str, service_account: str, dest: Path | None = None) -> Path:
        """A directory holding token, ca.crt and namespace: what a pod of the account sees at
        /var/run/secrets/kubernetes.io/serviceaccount."""
        dest = dest or Path(tempfile.mkdtemp(prefix=f"sa-{service_account}-", dir=self._workdir))
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "token").write_text(self.token(namespace, service_account))
        (dest / "ca.crt").write_bytes(self.ca_pem)
        (dest / "namespace").write_text(namespace)
        return dest

    def pod_env(self) -> dict[str, str]:
        """The API's address as the kubelet gives it to every pod."""
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(self.port)}

    def proxy(self, namespace: str, service_account: str) -> str:
        """A plain-HTTP URL that acts as the service account (as `kubectl proxy` acts as its user)."""
        identity = (namespace, service_account)
        self.token(*identity)
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(identity))
        server.daemon_threads = True
        self._servers.append(server)
        if not self._stopped.is_set():
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    # --- the store
    @staticmethod
    def _key(obj: dict) -> tuple[str, str, str, str]:
        """Where the object is stored: an object without a namespace is at the cluster scope (a namespaced one
        there is in no namespace a pod can use)."""
        namespace = "" if obj["kind"] in CLUSTER_SCOPED else obj["metadata"].get("namespace") or ""
        return group_of(obj), plural(obj["kind"]), namespace, obj["metadata"]["name"]

    def _store(self, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(int(time.time_ns() // 1000))
        self.objects[self._key(obj)] = obj
        return obj

    def add(self, obj: dict) -> dict:
        """Create an object as the cluster's admin (a test's setup: a Workflow, a step's pod, a PVC, a Secret)."""
        with self.lock:
            obj = copy.deepcopy(obj)
            if obj["kind"] not in CLUSTER_SCOPED and _namespace_of(obj) not in self.namespaces:
                raise ApiError(404, "NotFound", f'namespaces "{obj["metadata"]["namespace"]}" not found')
            if obj["kind"] == "Pod":
                obj.setdefault("status", {"phase": "Running"})
            stored = self._store(obj)
            self.lock.notify_all()
            return copy.deepcopy(stored)

    def get(self, kind_plural: str, namespace: str, name: str, group: str = "") -> dict | None:
        with self.lock:
            found = self.objects.get((group, kind_plural, namespace, name))
            return copy.deepcopy(found) if found else None

    def list(self, kind_plural: str, namespace: str, group: str = "", selector: str = "") -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (g, p, n, _), o in self.objects.items()
                    if g == group and p == kind_plural and n == namespace
                    and _selects(selector, o["metadata"].get("labels") or {})]

    def trainjob(self, namespace: str, name: str) -> dict | None:
        return self.get("trainjobs", namespace, name, TRAINER_GROUP)

    def trainjob_pods(self, namespace: str, name: str) -> list[dict]:
        return self.list("pods", namespace, selector=f"jobset.sigs.k8s.io/jobset-name={name}")

    def wait_for(self, predicate: Callable[[], bool], seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        with self.lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the emulated cluster never reached the awaited state")
                self.lock.wait(min(left, 0.05))

    def container_log(self, namespace: str, pod: str) -> list[str]:
        """Every line the pod's containers wrote so far (all runs)."""
        with self.lock:
            return [text for c in self._containers.get((namespace, pod), []) for _, text in c.lines]

    # --- running pods for real
    def run_pods_with(self, runtime, claims: dict[str, Path], hosts: Callable[[dict], dict[str, str]] | None = None,
                      scratch: Path | None = None) -> None:
        """Run the pods the controllers create through tests/cluster/pods.py's Runtime: the pod's first container
        (its command and args, working directory, environment from pod_environment), its securityContext's user,
        group, fsGroup and fsGroupChangePolicy, its volumes (a PVC: `claims[claimName]`, the claim's directory on
        this machine; an emptyDir: a fresh directory under `scratch`), its service account's token unless
        automountServiceAccountToken is false, and `hosts(pod)` as its /etc/hosts entries (the network's)."""
        from . import pods as pods_module

        scratch = Path(scratch or self._workdir / "volumes")

        def start(manifest: dict, log: Path):
            spec, meta = manifest["spec"], manifest["metadata"]
            container = spec["containers"][0]
            where = {}
            for volume in spec.get("volumes") or []:
                if claim := volume.get("persistentVolumeClaim"):
                    where[volume["name"]] = (Path(claims[claim["claimName"]]), True)
                elif "emptyDir" in volume:
                    where[volume["name"]] = (pods_module.empty_dir(scratch / meta["name"] / volume["name"]), True)
                else:
                    raise NotImplementedError(f"pod {meta['name']}: volume {volume['name']} of a kind not emulated")
            volumes = [pods_module.Volume(m["mountPath"], where[m["name"]][0], m.get("readOnly", False))
                       for m in container.get("volumeMounts") or []]
            security = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
            account = None if spec.get("automountServiceAccountToken") is False else spec.get("serviceAccountName",
                                                                                              "default")
            pod = pods_module.Pod(
                name=meta["name"], namespace=meta["namespace"], labels=dict(meta.get("labels") or {}),
                command=list(container.get("command") or []) + list(container.get("args") or []),
                env=self.pod_environment(manifest, container["name"]), volumes=volumes, service_account=account,
                run_as_user=security.get("runAsUser"), run_as_group=security.get("runAsGroup"),
                fs_group=(spec.get("securityContext") or {}).get("fsGroup"),
                hosts=hosts(manifest) if hosts else {}, workdir=container.get("workingDir") or "/",
                fs_group_change_policy=(spec.get("securityContext") or {}).get("fsGroupChangePolicy", "Always"))
            return runtime.start(pod, log)

        self.on_pod = start

    def tokens_for(self, pod) -> Path:
        """pods.Runtime's `tokens`: the directory of a pods.Pod's service account token, CA and namespace."""
        return self.service_account_dir(pod.namespace, pod.service_account)

    # --- deletion and garbage collection
    def delete(self, kind_plural: str, namespace: str, name: str, group: str = "",
               propagation: str = "Background") -> None:
        """Delete as the API server and the garbage collector do (see the module docstring)."""
        with self.lock:
            key = (group, kind_plural, namespace, name)
            obj = self.objects.get(key)
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind_plural}{"." + group if group else ""} "{name}" not found')
            meta = obj["metadata"]
            if group == TRAINER_GROUP and kind_plural == "trainjobs":
                self.deleted.append(name)
            if meta.get("deletionTimestamp"):
                return
            if kind_plural == "pods":
                meta["deletionTimestamp"] = _now()
                self._terminate_pod(obj)
                return
            dependents = self._dependents(meta["uid"], namespace)
            if propagation == "Foreground" and dependents:
                meta["deletionTimestamp"] = _now()
                meta.setdefault("finalizers", []).append("foregroundDeletion")
                for dep_key in dependents:  # the garbage collector deletes them in the foreground too
                    self.delete(*self._delete_args(dep_key), propagation="Foreground")
                threading.Thread(target=self._finish_foreground, args=(key,), daemon=True).start()
            else:
                del self.objects[key]
                if propagation != "Orphan":
                    for dep_key in dependents:
                        self.delete(*self._delete_args(dep_key), propagation="Background")
            self._collect_garbage()
            self.lock.notify_all()

    @staticmethod
    def _delete_args(key: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
        group, kind_plural, namespace, name = key
        return kind_plural, namespace, name, group

    def _dependents(self, uid: str, namespace: str) -> list[tuple]:
        return [k for k, o in self.objects.items() if k[2] == namespace
                and any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])]

    def _finish_foreground(self, key: tuple) -> None:
        """The foregroundDeletion finalizer: the object goes when its dependents are gone."""
        with self.lock:
            while not self._stopped.is_set():
                obj = self.objects.get(key)
                if obj is None:
                    return
                if not self._dependents(obj["metadata"]["uid"], key[2]):
                    del self.objects[key]
                    self._collect_garbage()
                    self.lock.notify_all()
                    return
                self.lock.wait(0.05)

    def _collect_garbage(self) -> None:
        """Objects with ownerReferences none of which names an existing object (by uid) are deleted
        (garbagecollector.go attemptToDeleteItem: absent owners)."""
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(r.get("uid") in uids for r in refs) and not obj["metadata"].get("deletionTimestamp"):
                self.delete(*self._delete_args(key), propagation="Background")

    # --- the kubelet
    def pod_environment(self, pod: dict, container: str | None = None) -> dict[str, str]:
        """The container's environment as the kubelet sets it: values, fieldRefs, Secrets (envFrom and
        secretKeyRef), and the API service's address. ApiError when a Secret or key is missing and not optional
        (the kubelet's CreateContainerConfigError)."""
        spec = pod["spec"]
        (c,) = [c for c in spec["containers"] if container in (None, c["name"])][:1] or [None]
        env = dict(self.pod_env())
        namespace = pod["metadata"]["namespace"]
        for source in c.get("envFrom") or []:
            if ref := source.get("secretRef"):
                data = self._secret(namespace, ref["name"], ref.get("optional", False))
                env.update({(source.get("prefix") or "") + k: v for k, v in (data or {}).items()})
        for var in c.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif field := (var.get("valueFrom") or {}).get("fieldRef"):
                env[var["name"]] = self._field(pod, field["fieldPath"])
            elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
                data = self._secret(namespace, ref["name"], ref.get("optional", False))
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ApiError(422, "CreateContainerConfigError",
                                   f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
                env[var["name"]] = data[ref["key"]]
        return env

    def _secret(self, namespace: str, name: str, optional: bool) -> dict | None:
        import base64

        secret = self.get("secrets", namespace, name)
        if secret is None:
            if optional:
                return None
            raise ApiError(422, "CreateContainerConfigError", f'secret "{name}" not found')
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        data.update(secret.get("stringData") or {})
        return data

    @staticmethod
    def _field(pod: dict, path: str) -> str:
        meta = pod["metadata"]
        if m := re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path):
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta.get("uid", ""), "spec.serviceAccountName": pod["spec"].get(
                      "serviceAccountName", "default"), "spec.nodeName": "emulated-node", "status.podIP": "127.0.0.1"}
        return simple[path]

    def _pod_problem(self, pod: dict) -> str | None:
        """Why the pod cannot start: a missing PVC (the scheduler leaves it Pending) or Secret (the kubelet's
        CreateContainerConfigError)."""
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes") or []:
            if (claim := volume.get("persistentVolumeClaim")) and not self.get(
                    "persistentvolumeclaims", namespace, claim["claimName"]):
                return f'persistentvolumeclaim "{claim["claimName"]}" not found'
            if (secret := volume.get("secret")) and not secret.get("optional") and not self.get(
                    "secrets", namespace, secret["secretName"]):
                return f'secret "{secret["secretName"]}" not found'
        try:
            self.pod_environment(pod)
        except ApiError as e:
            return e.message
        return None

    def _start_pod(self, key: tuple) -> None:
        with self.lock:
            pod = self.objects.get(key)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                return
            problem = self._pod_problem(pod)
            if problem is not None:
                waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": problem}}
                pod["status"] = {"phase": "Pending", "containerStatuses": [_container_status(pod, waiting, 0)]}
                self.lock.notify_all()
                return
            if self.on_pod is None:
                return  # no kubelet runs pods: Pending
            namespace, name = key[2], key[3]
            runs = self._containers.setdefault((namespace, name), [])
            log = self._workdir / "logs" / namespace / f"{name}.{len(runs)}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.touch()
            container = _Container(None, log)
            runs.append(container)
            container.process = self.on_pod(copy.deepcopy(pod), log)
            running = {"running": {"startedAt": _now()}}
            pod["status"] = {"phase": "Running", "startTime": _now(),
                             "containerStatuses": [_container_status(pod, running, len(runs) - 1)]}
            self.lock.notify_all()
        threading.Thread(target=self._watch_container, args=(key, container), daemon=True).start()

    def _watch_container(self, key: tuple, container: _Container) -> None:
        code = container.process.wait()
        with self.lock:
            container.flush()
            container.exit_code = code
            pod = self.objects.get(key)
            if pod is None:
                return
            restarts = len(self._containers[(key[2], key[3])]) - 1
            terminated = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
            pod["status"]["containerStatuses"] = [_container_status(pod, terminated, restarts)]
            job = pod["metadata"].get("labels", {}).get("batch.kubernetes.io/job-name")
            if pod["metadata"].get("deletionTimestamp"):
                pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
                del self.objects[key]  # terminated after deletion: gone
                self.lock.notify_all()
                return
            if code == 0:
                pod["status"]["phase"] = "Succeeded"
            elif job is not None:
                self._failures[job] = self._failures.get(job, 0) + 1
                policy = pod["spec"].get("restartPolicy", "Always")
                owner = self.objects.get(("batch", "jobs", key[2], job)) or {"spec": {}}
                if policy == "OnFailure" and self._failures[job] <= owner["spec"].get("backoffLimit", 6):
                    threading.Timer(self.restart_delay, self._start_pod, args=(key,)).start()
                    self.lock.notify_all()
                    return
                pod["status"]["phase"] = "Failed"
            else:
                pod["status"]["phase"] = "Failed"
            self.lock.notify_all()
        if job is not None:
            self._sync_job(key[2], job)

    def _terminate_pod(self, pod: dict) -> None:
        """SIGTERM to the pod's container, SIGKILL after its grace period; a pod that does not run goes at once."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        runs = self._containers.get((namespace, name)) or []
        process = runs[-1].process if runs else None
        if process is None or process.poll() is not None:
            self.objects.pop(("", "pods", namespace, name), None)
            self.lock.notify_all()
            return
        grace = pod["spec"].get("terminationGracePeriodSeconds", self.grace)
        process.send_signal(signal.SIGTERM)

        threading.Timer(grace, _kill, args=(process,)).start()

    def _tail_logs(self) -> None:
        while not self._stopped.is_set():
            with self.lock:
                grew = False
                for runs in self._containers.values():
                    for c in runs:
                        if c.exit_code is None:
                            before = len(c.lines)
                            c.read()
                            grew |= len(c.lines) > before
                if grew:
                    self.lock.notify_all()
            time.sleep(0.02)

    # --- Trainer, JobSet, the Job controller
    def _admit_trainjob(self, job: dict, identity: tuple[str, str]) -> None:
        """Trainer's validating webhook and the garbage collector's admission; ApiError when refused."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        ref = job["spec"]["runtimeRef"]
        kind = ref.get("kind", "ClusterTrainingRuntime")
        webhook = 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '
        if ref.get("apiGroup", TRAINER_GROUP) != TRAINER_GROUP or kind not in ("TrainingRuntime",
                                                                                "ClusterTrainingRuntime"):
            raise ApiError(403, "Forbidden", webhook + f"unsupported runtime: {kind}.{ref.get('apiGroup')}")
        runtime = (self.get("trainingruntimes", namespace, ref["name"], TRAINER_GROUP) if kind == "TrainingRuntime"
                   else self.get("clustertrainingruntimes", "", ref["name"], TRAINER_GROUP))
        if runtime is None:
            where = f'{plural(kind)}.{TRAINER_GROUP} "{ref["name"]}" not found'
            raise ApiError(403, "Forbidden", webhook + f"spec.runtimeRef: Invalid value: {json.dumps(ref)}: {where}: "
                           f"specified {kind[0].lower() + kind[1:]} must be created before the TrainJob is created")
        errors = []
        rjobs = {r["name"]: {c["name"] for c in r["template"]["spec"]["template"]["spec"].get("containers", []) +
                             r["template"]["spec"]["template"]["spec"].get("initContainers", [])}
                 for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        for patch in job["spec"].get("runtimePatches") or []:
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9._/-]+", patch.get("manager", "")):
                errors.append(f"spec.runtimePatches.manager: Invalid value: {patch.get('manager')!r}: must be a "
                              "domain-prefixed path")
            for rjob in ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get(
                    "spec", {}).get("replicatedJobs") or []:
                if rjob["name"] not in rjobs:
                    errors.append("spec.runtimePatches: must not have replicated job that doesn't exist in the runtime "
                                  "job template")
                    continue
                pod = (((rjob.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
                for c in pod.get("containers", []) + pod.get("initContainers", []):
                    if c["name"] not in rjobs[rjob["name"]]:
                        errors.append(f"spec.runtimePatches: must not have container that doesn't exist in the "
                                      f"runtime job {rjob['name']}")
                    elif c.get("env") and c["name"] in ("dataset-initializer", "model-initializer", NODE):
                        errors.append("spec.runtimePatches: must not have envs for the dataset-initializer, "
                                      "model-initializer, node containers")
        reserved = sorted({e["name"] for e in (job["spec"].get("trainer") or {}).get("env") or []} & RESERVED_ENV)
        if reserved and "torch" in (runtime["spec"].get("mlPolicy") or {}):
            errors.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}")
        if errors:
            raise ApiError(403, "Forbidden", webhook + "[" + ", ".join(errors) + "]")
        for owner in job["metadata"].get("ownerReferences") or []:
            if owner.get("blockOwnerDeletion"):
                group = owner["apiVersion"].rpartition("/")[0]
                if not self.rbac.allows(namespace, identity, "update", group, plural(owner["kind"]), owner["name"],
                                        "finalizers"):
                    raise ApiError(403, "Forbidden", f'trainjobs.{TRAINER_GROUP} "{name}" is forbidden: cannot set '
                                   "blockOwnerDeletion if an ownerReference refers to a resource you can't set "
                                   f"finalizers on: , {owner}")

    def _kueue_problem(self, job: dict) -> str | None:
        """Why Kueue leaves the TrainJob pending (None: admitted)."""
        queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)
        if not queue:
            return None
        namespace = job["metadata"]["namespace"]
        local = self.get("localqueues", namespace, queue, "kueue.x-k8s.io")
        if local is None:
            return f"LocalQueue {queue} doesn't exist"
        cq_name = local["spec"]["clusterQueue"]
        cq = self.get("clusterqueues", "", cq_name, "kueue.x-k8s.io")
        if cq is None:
            return f"ClusterQueue {cq_name} doesn't exist"
        if not _selector_matches(cq["spec"].get("namespaceSelector") or {}, self.namespaces.get(namespace, {})):
            return f"Workload namespace doesn't match ClusterQueue selector ({cq_name})"
        nodes = job["spec"]["trainer"].get("numNodes", 1)
        requests = (job["spec"]["trainer"].get("resourcesPerNode") or {})
        per_node = {**(requests.get("limits") or {}), **(requests.get("requests") or {})}
        quota: dict[str, float] = {}
        for group in cq["spec"].get("resourceGroups") or []:
            for flavor in group.get("flavors") or []:
                for r in flavor.get("resources") or []:
                    quota[r["name"]] = quota.get(r["name"], 0) + quantity(r["nominalQuota"])
        for resource, amount in per_node.items():
            if resource in quota and quantity(amount) * nodes > quota[resource]:
                return f"couldn't assign flavors to pod set node: insufficient quota for {resource} in {cq_name}"
            if resource not in quota and resource not in ("cpu", "memory"):
                return f"couldn't assign flavors to pod set node: resource {resource} unavailable in ClusterQueue"
        return None

    def _jobset(self, job: dict, runtime: dict) -> dict:
        """The JobSet Trainer v2.3 builds for the TrainJob (see the module docstring), with JobSet's defaults."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
        labels = dict(runtime["spec"]["template"].get("metadata", {}).get("labels") or {})
        for patch in job["spec"].get("runtimePatches") or []:
            template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
            labels.update((template.get("metadata") or {}).get("labels") or {})
            if template.get("spec"):
                order = [r["name"] for r in spec["replicatedJobs"]]
                spec = strategic_merge(spec, template["spec"])
                spec["replicatedJobs"].sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        trainer = job["spec"].get("trainer") or {}
        policy = runtime["spec"].get("mlPolicy") or {}
        nodes = trainer.get("numNodes", policy.get("numNodes", 1))
        for rjob in spec["replicatedJobs"]:
            jt = rjob["template"]
            ancestor = (jt.get("metadata") or {}).get("labels", {}).get(ANCESTOR_LABEL)
            pod = jt["spec"]["template"]["spec"]
            if ancestor == ANCESTOR_TRAINER:
                rjob["replicas"] = 1
                jt["spec"]["parallelism"] = jt["spec"]["completions"] = nodes
                for c in pod["containers"]:
                    if c["name"] != NODE:
                        continue
                    for field in ("image", "command", "args"):
                        if field in trainer:
                            c[field] = trainer[field]
                    if "resourcesPerNode" in trainer:  # trainingruntimeutil.MergeResourceRequirements
                        res = c.setdefault("resources", {})
                        for part in ("requests", "limits"):
                            if trainer["resourcesPerNode"].get(part):
                                res[part] = {**(res.get(part) or {}), **trainer["resourcesPerNode"][part]}
                    env = _upsert(c.get("env") or [], trainer.get("env") or [])
                    if "torch" in policy:
                        nproc = trainer.get("numProcPerNode", "auto")
                        env = _upsert(env, [
                            {"name": "PET_NNODES", "value": str(nodes)},
                            {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
                            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                                "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
                            {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
                            {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}])
                        c["ports"] = _upsert(c.get("ports") or [], [{"containerPort": TRAINER_PORT}], "containerPort")
                    c["env"] = env
            # JobSet's webhook defaults (pkg/webhooks/jobset_webhook.go)
            jt["spec"].setdefault("completionMode", "Indexed")
            pod.setdefault("restartPolicy", "OnFailure")
        spec.setdefault("network", {}).setdefault("enableDNSHostnames", True)
        spec["network"].setdefault("subdomain", name)
        return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                "metadata": {"name": name, "namespace": namespace, "labels": labels, "uid": str(uuid.uuid4()),
                             "ownerReferences": [{"apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
                                                  "kind": "TrainJob", "name": name, "uid": job["metadata"]["uid"],
                                                  "controller": True, "blockOwnerDeletion": True}]},
                "spec": spec}

    def _run_trainjob(self, namespace: str, name: str) -> None:
        """Kueue's admission, then the JobSet, its Jobs and their pods."""
        with self.lock:
            job = self.objects.get((TRAINER_GROUP, "trainjobs", namespace, name))
            if job is None:
                return
            problem = self._kueue_problem(job)
            if problem is not None:
                job["spec"]["suspend"] = True  # Kueue's webhook suspends it; nothing admits it
                job["status"] = {"conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended",
                                                 "message": "TrainJob is suspended", "lastTransitionTime": _now()}]}
                self.pending[f"{namespace}/{name}"] = problem
                self.lock.notify_all()
                return
            runtime = self.get("trainingruntimes", namespace, job["spec"]["runtimeRef"]["name"], TRAINER_GROUP)
            jobset = self._jobset(job, runtime)
            self._store(jobset)
            keys = []
            for rjob in jobset["spec"]["replicatedJobs"]:
                for job_index in range(rjob.get("replicas", 1)):
                    keys += self._create_job(jobset, rjob, job_index)
            self.lock.notify_all()
        for key in keys:
            self._start_pod(key)

    def _create_job(self, jobset: dict, rjob: dict, job_index: int) -> list[tuple]:
        """A JobSet child Job (labelAndAnnotateObject) and its pods (the Job controller, Indexed)."""
        js, namespace = jobset["metadata"]["name"], jobset["metadata"]["namespace"]
        job_name = f"{js}-{rjob['name']}-{job_index}"  # jobset pkg/util/placement GenJobName
        template = rjob["template"]
        jobset_labels = {
            "jobset.sigs.k8s.io/jobset-name": js, "jobset.sigs.k8s.io/jobset-uid": jobset["metadata"]["uid"],
            "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"], "jobset.sigs.k8s.io/restart-attempt": "0",
            "jobset.sigs.k8s.io/replicatedjob-replicas": str(rjob.get("replicas", 1)),
            "jobset.sigs.k8s.io/global-replicas": str(sum(r.get("replicas", 1)
                                                          for r in jobset["spec"]["replicatedJobs"])),
            "jobset.sigs.k8s.io/job-index": str(job_index),
            "jobset.sigs.k8s.io/job-key": hashlib.sha1(f"{namespace}/{job_name}".encode()).hexdigest(),
            "jobset.sigs.k8s.io/job-global-index": str(job_index), "jobset.sigs.k8s.io/group-name": "default",
            "jobset.sigs.k8s.io/group-replicas": str(sum(r.get("replicas", 1)
                                                         for r in jobset["spec"]["replicatedJobs"])),
            "jobset.sigs.k8s.io/job-group-index": str(job_index)}
        uid = str(uuid.uuid4())
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": job_name, "namespace": namespace, "uid": uid,
                            "labels": {**(template.get("metadata") or {}).get("labels", {}), **jobset_labels},
                            "annotations": dict(jobset_labels),
                            "ownerReferences": [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                                                 "name": js, "uid": jobset["metadata"]["uid"], "controller": True}]},
               "spec": copy.deepcopy(template["spec"])}
        self._store(job)
        keys = []
        pod_template = template["spec"]["template"]
        for index in range(template["spec"].get("completions", 1)):
            labels = {**(pod_template.get("metadata") or {}).get("labels", {}), **jobset_labels,
                      "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": job_name,
                      "controller-uid": uid, "job-name": job_name, COMPLETION_INDEX: str(index)}
            annotations = {**(pod_template.get("metadata") or {}).get("annotations", {}), **jobset_labels,
                           COMPLETION_INDEX: str(index)}
            spec = copy.deepcopy(pod_template["spec"])
            spec["hostname"] = f"{job_name}-{index}"
            if jobset["spec"]["network"].get("enableDNSHostnames"):
                spec["subdomain"] = jobset["spec"]["network"]["subdomain"]
            for c in spec["containers"]:
                if template["spec"].get("completionMode") == "Indexed":
                    c["env"] = _upsert(c.get("env") or [], [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                        "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}])
            pod_name = f"{job_name}-{index}-{secrets.token_hex(3)[:5]}"
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                                "annotations": annotations,
                                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                     "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
                   "spec": spec, "status": {"phase": "Pending"}}
            self._store(pod)
            keys.append(("", "pods", namespace, pod_name))
        return keys

    def _sync_job(self, namespace: str, job_name: str) -> None:
        """Job → JobSet → TrainJob conditions."""
        with self.lock:
            job = self.objects.get(("batch", "jobs", namespace, job_name))
            if job is None:
                return
            pods = [p for p in self.list("pods", namespace, selector=f"batch.kubernetes.io/job-name={job_name}")]
            phases = [p["status"].get("phase") for p in pods]
            failed = "Failed" in phases
            complete = len(phases) == job["spec"].get("completions", 1) and all(p == "Succeeded" for p in phases)
            if not (failed or complete):
                return
            if failed:  # the Job fails (BackoffLimitExceeded) and kills its other pods
                job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                 "message": "Job has reached the specified backoff limit"}]}
                for p in pods:
                    if p["status"].get("phase") not in ("Succeeded", "Failed"):
                        self.delete("pods", namespace, p["metadata"]["name"])
            else:
                job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
            js_name = job["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"]
            jobs = self.list("jobs", namespace, "batch", f"jobset.sigs.k8s.io/jobset-name={js_name}")
            states = [next((c["type"] for c in (j.get("status") or {}).get("conditions", [])
                            if c.get("status") == "True"), None) for j in jobs]
            if "Failed" in states:  # no failurePolicy: maxRestarts 0
                condition = {"type": "Failed", "status": "True", "reason": "FailedJobs",
                             "message": "jobset failed due to one or more job failures"}
            elif all(s == "Complete" for s in states):
                condition = {"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
                             "message": "jobset completed successfully"}
            else:
                return
            condition["lastTransitionTime"] = _now()
            trainjob = self.objects.get((TRAINER_GROUP, "trainjobs", namespace, js_name))
            if trainjob is not None and not _terminal(trainjob):
                trainjob.setdefault("status", {}).setdefault("conditions", []).append(condition)
            self.lock.notify_all()

    # --- KServe v0.20: the InferenceService webhook and controller (Standard and Knative modes)
    def _admit_inferenceservice(self, isvc: dict, old: dict | None = None) -> None:
        """KServe's validating webhook; ApiError (403, as controller-runtime's admission.Denied) when refused.
        kserve pkg/apis/serving/v1beta1/inference_service_validation.go: ValidateUpdate (validateDeploymentMode,
        validatePredictorNameChange) and validateInferenceService (validateInferenceServiceName,
        validateInferenceServiceAutoscaler, validateBlockedEnvVars with pkg/validation/env_policy.go
        DefaultBlockedEnvVars, validatePredictor, validateExactlyOneImplementation, validateAutoScalingCompExtension,
        validateCanarySpecs); pkg/apis/serving/v1beta1/component.go ComponentExtensionSpec.Validate
        (validateContainerConcurrency, validateReplicas, validateLogger) and ExactlyOneErrorFor;
        pkg/apis/serving/v1beta1/predictor.go GetImplementations. Multi-node (workerSpec), transformers, explainers
        and the confidential-computing rules are not emulated: a manifest using them is refused here."""
        webhook = 'admission webhook "inferenceservice.kserve-webhook-server.validator" denied the request: '
        meta, spec = isvc["metadata"], isvc.get("spec") or {}
        name, annotations = meta["name"], meta.get("annotations") or {}
        predictor = spec.get("predictor") or {}

        def deny(message: str):
            raise ApiError(403, "Forbidden", webhook + message)

        if unsupported := sorted({"transformer", "explainer"} & set(spec)) + (
                ["predictor.workerSpec"] if "workerSpec" in predictor else []):
            deny(f"the emulated KServe does not model {', '.join(unsupported)}")
        if old is not None and not meta.get("deletionTimestamp"):
            before = ((old.get("status") or {}).get("deploymentMode") or "")
            before = {"RawDeployment": "Standard", "Serverless": "Knative"}.get(before, before)
            wanted = annotations.get(KSERVE_MODE)
            if before and wanted is not None and wanted != before:
                deny(f"update rejected: deploymentMode cannot be changed from '{before}' to '{wanted}'")
            if (old["spec"].get("predictor") or {}).get("name") != predictor.get("name") and \
                    _storage_uri(old["spec"].get("predictor") or {}) == _storage_uri(predictor):
                deny("predictor.name change requires a model change (e.g. storageUri)")
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            deny(f'the InferenceService "{name}" is invalid: a InferenceService name must consist of lower case '
                 "alphanumeric characters or '-', and must start with alphabetical character. (e.g. \"my-name\" or "
                 "\"abc-123\", regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")
        autoscaler = annotations.get("serving.kserve.io/autoscalerClass")
        if autoscaler is not None and autoscaler not in ("hpa", "external", "keda", "none"):
            deny(f"[{autoscaler}] is not a supported autoscaler class type")
        containers = list(predictor.get("containers") or []) + list(predictor.get("initContainers") or [])
        frameworks = [k for k in KSERVE_FRAMEWORKS if predictor.get(k) is not None]
        containers += [{"name": "kserve-container", **predictor[k]} for k in frameworks[:1]]
        for c in containers:
            for var in c.get("env") or []:
                if var.get("name") == "PYTHONPATH":
                    deny(f'the InferenceService "{name}" is invalid: setting PYTHONPATH in container '
                         f'"{c.get("name", "")}" is not allowed for security reasons')
        if any((predictor.get(k) or {}).get("name") for k in frameworks):
            deny("the 'name' field is not allowed in standard predictor")
        # predictor.go GetImplementations: the frameworks, each container named kserve-container, else the first
        # container when there are containers and nothing else (a sidecar beside a model is no implementation)
        servers = sum(c.get("name") == "kserve-container" for c in predictor.get("containers") or [])
        if len(frameworks) + servers + (1 if predictor.get("containers") and not frameworks and not servers
                                        else 0) != 1:
            deny("exactly one of [Name, SKLearn, XGBoost, Tensorflow, PyTorch, Triton, ONNX, HuggingFace, PMML, "
                 "LightGBM, Paddle, Model, StorageUris, StorageContainerName, WorkerSpec, PodSpec] must be specified "
                 "in PredictorSpec")
        if (predictor.get("containerConcurrency") or 0) < 0:
            deny("parallelism cannot be less than 0")
        low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
        if low < 0:
            deny("'MinReplicas' cannot be less than 0")
        if high < 0:
            deny("'MaxReplicas' cannot be less than 0")
        if low > high and high != 0:
            deny("'MinReplicas' cannot be greater than MaxReplicas")
        if (logger := predictor.get("logger")) and logger.get("mode", "all") not in ("all", "request", "response"):
            deny("invalid logger type")
        # validateAutoScalingCompExtension and validateCanarySpecs compare the annotation as the defaulter left it
        # (legacy names mapped; missing with the default config, whose defaultDeploymentMode is Serverless)
        raw = annotations.get(KSERVE_MODE, "")
        knative_hpa = annotations.get("autoscaling.knative.dev/class") == "hpa.autoscaling.knative.dev"
        if raw != "Standard" and not knative_hpa and predictor.get("deploymentStrategy") is not None:
            deny("customizing deploymentStrategy is only supported for raw deployment mode")  # KPA's rule
        if spec.get("canary"):
            self._admit_canaries(spec, raw, deny)

    @staticmethod
    def _admit_canaries(spec: dict, raw_mode: str, deny) -> None:
        """inference_service_validation.go validateCanarySpecs: the entries' names, traffic and replicas (the
        checks of each canary's predictor as a predictor are not emulated)."""
        if raw_mode != "Standard":
            deny("canary is only supported in Standard deployment mode")
        predictor = spec.get("predictor") or {}
        if not _storage_uri(predictor) and predictor.get("model") is None:
            deny("canary requires a stable predictor with a model (multi-model serving is not supported with canary)")
        names, total = set(), 0
        for i, canary in enumerate(spec["canary"]):
            cp = canary.get("predictor") or {}
            name = cp.get("name") or ""
            if not name:
                deny(f"canary[{i}] predictor.name is required")
            if name in names:
                deny(f'canary predictor.name "{name}" is duplicated')
            names.add(name)
            if name == predictor.get("name"):
                deny(f'canary predictor.name "{name}" conflicts with stable predictor name')
            percent = canary.get("trafficPercent", 0)
            if not 0 <= percent <= 100:
                deny(f'canary "{name}" trafficPercent must be between 0 and 100, got {percent}')
            total += percent
            if cp.get("workerSpec") is not None:
                deny(f'canary "{name}" must not set workerSpec (multi-node is not yet supported for canary)')
            if (cp.get("maxReplicas") or 0) > 0:
                deny(f'canary "{name}" must not set maxReplicas (canary uses fixed replicas)')
            for key in ("scaleTarget", "scaleMetric", "autoScaling"):
                if cp.get(key) is not None:
                    deny(f'canary "{name}" must not set {key} (canary uses fixed replicas)')
            stable = predictor.get("minReplicas", 1)
            if cp.get("minReplicas") is not None and cp["minReplicas"] > stable:
                deny(f'canary "{name}" minReplicas ({cp["minReplicas"]}) must not exceed stable predictor '
                     f"minReplicas ({stable})")
        if total > 100:
            deny(f"sum of canary trafficPercent values ({total}) must be <= 100")

    def _reconcile_inferenceservice(self, namespace: str, name: str, generation: int) -> None:
        """KServe's controller for one generation of an InferenceService. The runtime (kserve
        pkg/controller/v1beta1/inferenceservice/components/predictor.go reconcileModel: the named ServingRuntime
        must exist, be enabled, support the protocol and the model format, pkg/apis/serving/v1beta1/
        predictor_model.go RuntimeSupportsModel), the predictor pod (labels serving.kserve.io/inferenceservice and
        component=predictor beside the predictor's own, its service account, which must exist, node selector,
        tolerations and the model's resources; the storage initializer's env from the service account's Secrets,
        pkg/credentials/service_account_credentials.go and s3/s3_secret.go: secretKeyRefs and the
        serving.kserve.io/s3-* annotations), scheduling on `nodes` when the test gives them (selector, taints,
        extended resources), the storage initializer (python/storage/kserve_storage/kserve_storage.py _download_s3:
        every object under the prefix, "No model found" otherwise), over `network` when there is one, with the pod's
        labels; the model server is not run (no vLLM): the files it would load must be there (config.json and
        *.safetensors). Then the status: Ready, PredictorReady, the URL from the default ingress domainTemplate
        (config/configmap/inferenceservice.yaml: http://{{.Name}}-{{.Namespace}}.example.com), modelStatus, and in
        Knative mode the revisions and their traffic (pkg/controller/v1beta1/inferenceservice/reconcilers/knative/
        ksvc_reconciler.go: canaryTrafficPercent to the latest revision, the rest to the last rolled out one)."""
        with self.lock:
            isvc = self.get("inferenceservices", namespace, name, KSERVE_GROUP)
            if isvc is None or isvc["metadata"].get("generation") != generation:
                return
            predictor, annotations = isvc["spec"]["predictor"], isvc["metadata"].get("annotations") or {}
            model = predictor.get("model") or {}
            mode = _kserve_mode(annotations)
            problem = self._kserve_runtime_problem(namespace, model)
            pod = None
            if problem is None:
                pod, problem = self._predictor_pod(isvc)
        failure = None
        if problem is None and pod is not None:
            unschedulable = self._unschedulable(pod)
            if unschedulable:
                problem = ("MinimumReplicasUnavailable", "Deployment does not have minimum availability.",
                           None, unschedulable)
            else:
                failure = self._storage_initialize(pod, model.get("storageUri", ""))
                if failure:
                    problem = ("MinimumReplicasUnavailable", "Deployment does not have minimum availability.",
                               {"reason": "ModelLoadFailed", "message": failure, "exitCode": 1}, None)
        with self.lock:
            isvc = self.objects.get((KSERVE_GROUP, "inferenceservices", namespace, name))
            if isvc is None or isvc["metadata"].get("generation") != generation:
                return
            status = isvc.setdefault("status", {})
            status["deploymentMode"] = mode
            now = _now()
            if problem is None:
                status["url"] = f"http://{name}-{namespace}.example.com"
                status["address"] = {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"}
                status["conditions"] = [{"type": t, "status": "True", "lastTransitionTime": now}
                                        for t in ("IngressReady", "PredictorReady", "Ready")]
                status["modelStatus"] = {"transitionStatus": "UpToDate", "modelRevisionStates": {
                    "activeModelState": "Loaded", "targetModelState": "Loaded"}}
                if pod is not None:
                    pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
                    self._store(pod)
                if mode == "Knative":
                    self._knative_traffic(isvc, predictor.get("canaryTrafficPercent"))
                    serving = {t["revisionName"] for t in status["components"]["predictor"]["traffic"]}
                    self._drop_predictor_pods(namespace, name, keep=serving)
            else:
                reason, message, failure_info, pod_reason = problem
                down = {"status": "False", "reason": reason, "message": message, "lastTransitionTime": now}
                status["conditions"] = [{"type": "PredictorReady", **down}, {"type": "Ready", **down}]
                status["modelStatus"] = {
                    "transitionStatus": "BlockedByFailedLoad" if failure_info else
                    "InvalidSpec" if pod is None else "InProgress",
                    "modelRevisionStates": {"targetModelState": "FailedToLoad" if failure_info else "Pending"}}
                if failure_info:
                    status["modelStatus"]["lastFailureInfo"] = failure_info
                if pod is not None:
                    pod["status"] = {"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "False" if pod_reason else "True",
                         **({"reason": "Unschedulable", "message": pod_reason} if pod_reason else {})}]}
                    self._store(pod)
            self.lock.notify_all()

    def _kserve_runtime_problem(self, namespace: str, model: dict) -> tuple | None:
        runtime_name = model.get("runtime")
        wanted = model.get("modelFormat") or {}
        if runtime_name is None:
            found = [r for r in self.list("servingruntimes", namespace, KSERVE_GROUP)
                     if not r["spec"].get("disabled") and any(
                         f.get("autoSelect") and _supports(f, wanted) for f in r["spec"].get("supportedModelFormats")
                         or [])]
            if not found:
                return ("NoSupportingRuntime", f"no runtime found to support predictor with model type: {wanted}",
                        None, None)
            model["runtime"] = found[0]["metadata"]["name"]
            return None
        runtime = self.get("servingruntimes", namespace, runtime_name, KSERVE_GROUP) or self.get(
            "clusterservingruntimes", "", runtime_name, KSERVE_GROUP)
        if runtime is None:
            return ("RuntimeNotRecognized", f'servingruntimes.serving.kserve.io "{runtime_name}" not found', None,
                    None)
        if runtime["spec"].get("disabled"):
            return ("RuntimeDisabled", f"specified runtime {runtime_name} is disabled", None, None)
        protocol = model.get("protocolVersion")
        if protocol and protocol not in (runtime["spec"].get("protocolVersions") or ["v1"]):
            return ("NoSupportingRuntime", f"specified runtime {runtime_name} does not support specified protocol "
                    "version", None, None)
        if not any(_supports(f, wanted) for f in runtime["spec"].get("supportedModelFormats") or []):
            return ("NoSupportingRuntime", f"specified runtime {runtime_name} does not support specified "
                    "framework/version", None, None)
        return None

    def _predictor_pod(self, isvc: dict) -> tuple[dict | None, tuple | None]:
        """The predictor pod of this generation (earlier ones go, as the Deployment rolls), or why none is made."""
        meta, predictor = isvc["metadata"], isvc["spec"]["predictor"]
        namespace, name = meta["namespace"], meta["name"]
        model = predictor.get("model") or {}
        account = predictor.get("serviceAccountName") or "default"
        sa = self.get("serviceaccounts", namespace, account)
        if sa is None:
            return None, ("MinimumReplicasUnavailable", f'pods "{name}-predictor" is forbidden: error looking up '
                          f"service account {namespace}/{account}: serviceaccount \"{account}\" not found", None, None)
        runtime = self.get("servingruntimes", namespace, model["runtime"], KSERVE_GROUP) or self.get(
            "clusterservingruntimes", "", model["runtime"], KSERVE_GROUP)
        env = []
        for ref in sa.get("secrets") or []:
            secret = self.get("secrets", namespace, ref["name"])
            if secret is None:  # service_account_credentials.go mountSecretCredential: the reconcile fails
                return None, ("MinimumReplicasUnavailable", f'secrets "{ref["name"]}" not found', None, None)
            data = {**{k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()},
                    **(secret.get("stringData") or {})}
            if "AWS_SECRET_ACCESS_KEY" not in data:
                continue
            env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": k}}}
                    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
            env += _s3_env(secret["metadata"].get("annotations") or {}, data)
        server = copy.deepcopy(runtime["spec"]["containers"][0])
        server["args"] = [a.replace("{{.Name}}", name) for a in server.get("args") or []]
        server["resources"] = model.get("resources") or server.get("resources") or {}
        # predictor.go buildObjectMeta: the ServingRuntime's labels, the InferenceService's, the predictor's
        labels = {**(runtime["spec"].get("labels") or {}), **(meta.get("labels") or {}),
                  **(predictor.get("labels") or {}), "serving.kserve.io/inferenceservice": name,
                  "component": "predictor", "app": f"isvc.{name}-predictor"}
        generation = meta["generation"]
        knative = _kserve_mode(meta.get("annotations") or {}) == "Knative"
        if knative:  # Knative's revision of this generation (named as _knative_traffic names it)
            labels[KNATIVE_REVISION] = f"{name}-predictor-{generation:05d}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{name}-predictor-{generation:05d}", "namespace": namespace, "labels": labels,
                            "ownerReferences": [{"apiVersion": f"{KSERVE_GROUP}/v1beta1", "kind": "InferenceService",
                                                 "name": name, "uid": meta["uid"]}]},
               "spec": {"serviceAccountName": account,
                        "automountServiceAccountToken": sa.get("automountServiceAccountToken", True),
                        "nodeSelector": dict(predictor.get("nodeSelector") or {}),
                        "tolerations": list(predictor.get("tolerations") or []),
                        "initContainers": [{"name": "storage-initializer", "image": "kserve/storage-initializer:"
                                            "v0.20.0", "args": [model.get("storageUri", ""), "/mnt/models"],
                                            "env": env}],
                        "containers": [server]}}
        if not knative:  # the Deployment rolls: the earlier pods go (Knative keeps a revision's while it has traffic)
            self._drop_predictor_pods(namespace, name)
        return self._store(pod), None

    def _drop_predictor_pods(self, namespace: str, name: str, keep: set[str] = frozenset()) -> None:
        """Delete the InferenceService's predictor pods but those of the Knative revisions in `keep`."""
        for key, old in list(self.objects.items()):
            labels = old["metadata"].get("labels") or {}
            if key[:3] == ("", "pods", namespace) and labels.get("serving.kserve.io/inferenceservice") == name \
                    and labels.get(KNATIVE_REVISION) not in keep:
                del self.objects[key]

    def _unschedulable(self, pod: dict) -> str | None:
        """Why no node of `nodes` takes the pod (kube-scheduler's NodeAffinity, TaintToleration, NodeResourcesFit
        filters), or None (also when the test gives no nodes)."""
        if not self.nodes:
            return None
        spec = pod["spec"]
        wanted = {k: quantity(v) for c in spec["containers"] for k, v in
                  ((c.get("resources") or {}).get("limits") or {}).items() if "/" in k}
        why = {}
        for node in self.nodes:
            labels, taints = node.get("labels") or {}, node.get("taints") or []
            if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
                why["didn't match Pod's node affinity/selector"] = why.get(
                    "didn't match Pod's node affinity/selector", 0) + 1
            elif untolerated := [t for t in taints if t.get("effect") in ("NoSchedule", "NoExecute") and not any(
                    _tolerates(tol, t) for tol in spec.get("tolerations") or [])]:
                key = f"had untolerated taint {{{untolerated[0]['key']}: {untolerated[0].get('value', '')}}}"
                why[key] = why.get(key, 0) + 1
            elif short := [k for k, v in wanted.items() if quantity((node.get("allocatable") or {}).get(k, 0)) < v]:
                key = f"Insufficient {short[0]}"
                why[key] = why.get(key, 0) + 1
            else:
                return None
        return f"0/{len(self.nodes)} nodes are available: " + ", ".join(f"{n} node(s) {w}" if not w.startswith(
            "Insufficient") else f"{n} {w}" for w, n in sorted(why.items())) + "."

    def _storage_initialize(self, pod: dict, uri: str) -> str | None:
        """The storage initializer (kserve_storage.py _download_s3): every object under the s3:// prefix, with the
        credentials and endpoint of its env as the kubelet resolves them, through the network's policies for this
        pod when there is one; then the model server's files. The error it ends with, or None."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        init = pod["spec"]["initContainers"][0]
        try:
            env = self.pod_environment({**pod, "spec": {**pod["spec"], "containers": [init]}}, init["name"])
        except ApiError as e:
            return e.message
        if not uri.startswith("s3://"):
            return f"the emulated storage initializer reads s3:// only, not {uri}"
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        endpoint = env.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")
        if self.network is not None:
            from types import SimpleNamespace

            parsed = urlparse(endpoint)
            hosts = self.network.attach(SimpleNamespace(name=pod["metadata"]["name"],
                                                        namespace=pod["metadata"]["namespace"],
                                                        labels=pod["metadata"]["labels"],
                                                        service_account=pod["spec"]["serviceAccountName"]))
            if parsed.hostname not in hosts:
                return f"Could not connect to the endpoint URL: {endpoint} (no such host in the cluster)"
            endpoint = f"{parsed.scheme}://{hosts[parsed.hostname]}:{parsed.port or 80}"
        target = self._workdir / "models" / pod["metadata"]["name"]
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                              verify=env.get("S3_VERIFY_SSL", "1") != "0",
                              aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                              region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
                              config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 1}))
            count = 0
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents") or []:
                    dest = target / obj["Key"][len(prefix):].lstrip("/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(dest))
                    count += 1
        except (BotoCoreError, ClientError) as e:
            return str(e)
        if count == 0:
            return f"Failed to fetch model. No model found in {uri}."
        if not (target / "config.json").is_file() or not list(target.glob("*.safetensors")):
            return f"{uri}: no config.json and *.safetensors for the model server to load"
        self.kserve_downloads.append((pod["metadata"]["name"], uri, sorted(p.name for p in target.iterdir())))
        return None

    def _knative_traffic(self, isvc: dict, canary: int | None) -> None:
        """Revisions and their traffic, as ksvc_reconciler.go sets them and KServe reports them."""
        component = isvc["status"].setdefault("components", {}).setdefault("predictor", {})
        revision = f"{isvc['metadata']['name']}-predictor-{isvc['metadata']['generation']:05d}"
        rolled = component.get("latestRolledoutRevision")
        component.update(latestCreatedRevision=revision, latestReadyRevision=revision)
        if canary is not None and rolled and rolled != revision:
            component["traffic"] = [{"latestRevision": True, "percent": canary, "revisionName": revision}]
            if canary < 100:
                component["traffic"].append({"latestRevision": False, "percent": 100 - canary, "revisionName": rolled,
                                             "tag": "prev"})
            if canary == 100:
                component.update(previousRolledoutRevision=rolled, latestRolledoutRevision=revision)
        else:
            component["traffic"] = [{"latestRevision": True, "percent": 100, "revisionName": revision}]
            if rolled != revision:
                component.update(previousRolledoutRevision=rolled, latestRolledoutRevision=revision)

    def _prune_unknown(self, obj: dict, strict: bool) -> None:
        """The API server's handling of fields the CRD's structural schema does not declare (k8s.io/apiextensions-
        apiserver pkg/apiserver/schema/pruning): dropped (fieldValidation Warn, the default; the Warning header is
        not emulated), or with fieldValidation=Strict the request refused (400 BadRequest, "strict decoding
        error")."""
        schema = self._validate.schemas.get((obj.get("apiVersion"), obj.get("kind")))
        if schema is None:
            return
        unknown = _prune(obj, schema, "")
        if unknown and strict:
            kind = obj.get("kind")
            raise ApiError(400, "BadRequest", f'{kind} in version "{obj["apiVersion"].rpartition("/")[2]}" cannot be '
                           f"handled as a {kind}: strict decoding error: "
                           + ", ".join(f'unknown field "{u}"' for u in unknown))

    def _patch_inferenceservice(self, namespace: str, name: str, patch: dict, content_type: str,
                                strict: bool = False) -> dict:
        """A JSON merge patch (RFC 7386, what the Kubernetes client sends for a dict): a metadata.resourceVersion in
        it must be the stored one (409 Conflict otherwise: the API server's optimistic concurrency,
        k8s.io/apiserver pkg/registry/generic/registry/store.go Update); the result is pruned of unknown fields (or
        refused with `strict`: fieldValidation=Strict) and must pass the CRD schema and the webhook's
        ValidateUpdate; a changed spec is a new generation, reconciled again."""
        if "merge-patch+json" not in content_type:
            raise ApiError(415, "UnsupportedMediaType", f"the emulated cluster takes merge patches, not {content_type}")
        with self.lock:
            old = self.get("inferenceservices", namespace, name, KSERVE_GROUP)
            if old is None:
                raise ApiError(404, "NotFound", f'inferenceservices.{KSERVE_GROUP} "{name}" not found',
                               {"name": name, "group": KSERVE_GROUP, "kind": "inferenceservices"})
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on inferenceservices.{KSERVE_GROUP} '
                               f'"{name}": the object has been modified; please apply your changes to the latest '
                               "version and try again", {"name": name, "group": KSERVE_GROUP,
                                                         "kind": "inferenceservices"})
            new = _merge_patch(copy.deepcopy(old), patch)
            new["metadata"]["name"], new["metadata"]["namespace"] = name, namespace
            self._prune_unknown(new, strict)
            view = {k: v for k, v in new.items() if k != "status"}
            errors = self._validate(view)
            if errors:
                raise ApiError(422, "Invalid", f'InferenceService.{KSERVE_GROUP} "{name}" is invalid: '
                               + "; ".join(errors))
            self._admit_inferenceservice(new, old)
            changed = new["spec"] != old["spec"]
            if changed:
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            stored = self._store(new)
            self.kserve_writes.append(("patch", name, copy.deepcopy(view)))
            self.lock.notify_all()
            result = self._public(stored)
        if changed:
            threading.Thread(target=self._reconcile_inferenceservice,
                             args=(namespace, name, result["metadata"]["generation"]), daemon=True).start()
        return result

    # --- the HTTP side
    def _handler(self, fixed_identity: tuple[str, str] | None):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                return self._payload

            def _identity(self) -> tuple[str, str]:
                if fixed_identity is not None:
                    return fixed_identity
                # apiserver bearertoken authenticator: the scheme is case-insensitive
                scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
                token = token.strip() if scheme.lower() == "bearer" else ""
                if token not in api.tokens:
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                return api.tokens[token]

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)  # read first: the connection is kept alive
                self._payload = json.loads(self.rfile.read(length) or b"{}") if length else {}
                try:
                    identity = self._identity()
                    with api.lock:
                        api.requests.append((f"{identity[0]}/{identity[1]}", method, url.path))
                    api._serve(self, method, url.path, query, identity)
                except ApiError as e:
                    if e.code in (401, 403):
                        with api.lock:
                            api.refused.append(e.message)
                    self._send(e.code, e.status())

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

            def do_PUT(self):
                self._route("PUT")

            def do_PATCH(self):
                self._route("PATCH")

        return Handler

    _PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))(?:/namespaces/(?P<ns>[^/]+))?"
                       r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")

    def _serve(self, handler, method: str, path: str, query: dict, identity: tuple[str, str]) -> None:
        m = self._PATH.match(path)
        if not m:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        group, namespace, res, name, sub = m["group"] or "", m["ns"] or "", m["plural"], m["name"], m["sub"]
        collection = "watch" if query.get("watch", "").lower() == "true" else "list"
        verb = {"GET": "get" if name else collection, "POST": "create", "DELETE": "delete", "PUT": "update",
                "PATCH": "patch"}[method]
        if not self.rbac.allows(namespace, identity, verb, group, res, name, sub):
            what = f"{res}.{group}" if group else res
            resource = f"{res}/{sub}" if sub else res
            subject = f'{what} "{name}"' if name else what
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            raise ApiError(403, "Forbidden", f'{subject} is forbidden: User "system:serviceaccount:{identity[0]}:'
                           f'{identity[1]}" cannot {verb} resource "{resource}" in API group "{group}"{where}',
                           {"name": name or "", "group": group, "kind": res})
        if namespace and namespace not in self.namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        if group == KSERVE_GROUP and m["version"] != KSERVE_VERSIONS.get(res):  # a version no CRD serves
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res == "pods" and sub == "log":
            return self._stream_log(handler, namespace, name, query)
        if method == "GET" and name is None:
            items = [self._public(o) for o in self.list(res, namespace, group, query.get("labelSelector", ""))]
            return handler._send(200, {"apiVersion": m["version"] and f"{group}/{m['version']}" or "v1",
                                       "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
        if method == "GET":
            found = self.get(res, namespace, name, group)
            if found is None:
                raise ApiError(404, "NotFound", f'{res}{"." + group if group else ""} "{name}" not found',
                               {"name": name, "group": group, "kind": res})
            return handler._send(200, self._public(found))
        if method == "DELETE":
            body = handler._body()
            propagation = query.get("propagationPolicy") or body.get("propagationPolicy") or "Background"
            self.delete(res, namespace, name, group, propagation)
            return handler._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                       "details": {"name": name, "group": group, "kind": res}})
        if method == "POST" and name is None:
            body = handler._body()
            return handler._send(201, self._create(group, res, namespace, body, identity,
                                                   strict=query.get("fieldValidation") == "Strict"))
        if method == "PATCH" and group == KSERVE_GROUP and res == "inferenceservices" and sub is None:
            return handler._send(200, self._patch_inferenceservice(
                namespace, name, handler._body(), handler.headers.get("Content-Type", ""),
                strict=query.get("fieldValidation") == "Strict"))
        raise ApiError(405, "MethodNotAllowed", f"{method} {path} is not supported by the emulated cluster")

    @staticmethod
    def _public(obj: dict) -> dict:
        return copy.deepcopy(obj)

    def _create(self, group: str, res: str, namespace: str, body: dict, identity: tuple[str, str],
                strict: bool = False) -> dict:
        body.setdefault("metadata", {}).setdefault("namespace", namespace)
        name = body["metadata"].get("name")
        if res == "trainjobs" and group == TRAINER_GROUP:
            errors = self._validate(body)
            if errors:
                raise ApiError(422, "Invalid", f'TrainJob.{TRAINER_GROUP} "{name}" is invalid: ' + "; ".join(errors))
            sent = copy.deepcopy(body)
            with self.lock:
                if self.get(res, namespace, name, group) is not None:
                    raise ApiError(409, "AlreadyExists", f'{res}.{group} "{name}" already exists',
                                   {"name": name, "group": group, "kind": res})
                self._admit_trainjob(body, identity)
                stored = self._store(body)
                self.created.append(name)
                self.last_created = sent
                self._collect_garbage()
                self.lock.notify_all()
                result = self._public(stored)
            threading.Thread(target=self._run_trainjob, args=(namespace, name), daemon=True).start()
            return result
        if group == KSERVE_GROUP:  # the pinned CRDs' schema, then (InferenceService) KServe's webhook
            self._prune_unknown(body, strict)
            errors = self._validate(body)
            if errors:
                raise ApiError(422, "Invalid", f'{body.get("kind")}.{group} "{name}" is invalid: ' + "; ".join(errors))
        with self.lock:
            if self.get(res, namespace, name, group) is not None:
                raise ApiError(409, "AlreadyExists", f'{res}{"." + group if group else ""} "{name}" already exists')
            if group == KSERVE_GROUP and res == "inferenceservices":
                self._admit_inferenceservice(body)
                body["metadata"]["generation"] = 1
                body.pop("status", None)
                stored = self._public(self._store(body))
                self.kserve_writes.append(("create", name, copy.deepcopy(body)))
                threading.Thread(target=self._reconcile_inferenceservice, args=(namespace, name, 1),
                                 daemon=True).start()
                return stored
            return self._public(self._store(body))

    def _stream_log(self, handler, namespace: str, name: str, query: dict) -> None:
        """`kubectl logs [-f] [--timestamps] [--since]` of the pod's current container."""
        with self.lock:
            pod = self.get("pods", namespace, name)
            runs = self._containers.get((namespace, name)) or []
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found')
            if not runs:
                raise ApiError(400, "BadRequest", f'container "{NODE}" in pod "{name}" is waiting to start: '
                               "ContainerCreating")
            container = runs[-1]
            self.log_streams[name] = self.log_streams.get(name, 0) + 1
            cut = self.drop_log_after if self.log_streams[name] == 1 else None
        follow = query.get("follow", "").lower() == "true"
        stamps = query.get("timestamps", "").lower() == "true"
        since = None
        if query.get("sinceSeconds"):
            since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(query["sinceSeconds"]))).strftime(
                "%Y-%m-%dT%H:%M:%S.%f")
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        sent = 0
        while True:
            with self.lock:
                lines = list(container.lines)
                ended = container.exit_code is not None or self._stopped.is_set()
                if cut is not None and len(lines) >= cut and not ended:
                    lines, ended = lines[:cut], True  # the connection drops
                if sent >= len(lines) and follow and not ended:
                    self.lock.wait(0.1)
                    continue
            out = b"".join(((f"{s} {t}" if stamps else t) + "\n").encode() for s, t in lines[sent:]
                           if since is None or s >= since)
            try:
                handler.wfile.write(out)
                handler.wfile.flush()
            except OSError:
                return
            sent = len(lines)
            if not follow or ended:
                return


def _kill(process) -> None:
    """SIGKILL to the container: its process group when it leads one (pods.py starts each pod in a session of its
    own), as the runtime kills the container's cgroup."""
    if process.poll() is not None:
        return
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.kill()


def _container_status(pod: dict, state: dict, restarts: int) -> dict:
    """The status of the pod's first container (core/v1 ContainerStatus: its required fields too)."""
    container = pod["spec"]["containers"][0]
    return {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": "running" in state,
            "restartCount": restarts, "started": "running" in state, "state": state}


def _s3_env(annotations: dict, data: dict) -> list[dict]:
    """kserve pkg/credentials/s3/utils.go BuildS3EnvVars for the settings the emulation reads (the annotation, else
    the Secret's key, as getEnvValue): getEndpointConfiguration (an endpoint with a scheme sets S3_USE_HTTPS from it
    and is stripped of it for S3_ENDPOINT; without one s3-usehttps decides, https by default), s3-verifyssl and
    s3-region."""
    def value(annotation: str, key: str) -> str:
        return annotations.get(f"serving.kserve.io/{annotation}", data.get(key, ""))

    env = []
    if endpoint := value("s3-endpoint", "S3_ENDPOINT").strip():
        if endpoint.lower().startswith(("https://", "http://")):
            https = "1" if endpoint.lower().startswith("https://") else "0"
            bare, url = endpoint.partition("://")[2], endpoint
        else:
            https = value("s3-usehttps", "S3_USE_HTTPS")
            bare, url = endpoint, f"{'http' if https == '0' else 'https'}://{endpoint}"
        if https:
            env.append({"name": "S3_USE_HTTPS", "value": https})
        env += [{"name": "S3_ENDPOINT", "value": bare}, {"name": "AWS_ENDPOINT_URL", "value": url}]
    if verify := value("s3-verifyssl", "S3_VERIFY_SSL"):
        env.append({"name": "S3_VERIFY_SSL", "value": verify})
    if region := value("s3-region", "AWS_DEFAULT_REGION"):
        env.append({"name": "AWS_DEFAULT_REGION", "value": region})
    return env


def _kserve_mode(annotations: dict) -> str:
    """kserve pkg/constants/constants.go ParseDeploymentMode: the legacy names mapped; none: the default config's
    defaultDeploymentMode (config/configmap/inferenceservice.yaml: Serverless, i.e. Knative)."""
    mode = annotations.get(KSERVE_MODE) or "Knative"
    return {"RawDeployment": "Standard", "Serverless": "Knative"}.get(mode, mode)


def _storage_uri(predictor: dict) -> str:
    """inference_service_validation.go getPredictorStorageURI."""
    for key in KSERVE_FRAMEWORKS:
        if (predictor.get(key) or {}).get("storageUri"):
            return predictor[key]["storageUri"]
    return ""


def _supports(supported: dict, wanted: dict) -> bool:
    """predictor_model.go RuntimeSupportsModel: the format's name (case-insensitive) and, when the model names one,
    its version."""
    if supported.get("name", "").lower() != (wanted.get("name") or "").lower():
        return False
    return not wanted.get("version") or supported.get("version") == wanted["version"]


def _tolerates(toleration: dict, taint: dict) -> bool:
    """kubernetes pkg/apis/core/v1/helper ToleratesTaint."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("key") and toleration["key"] != taint.get("key"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return True
    return toleration.get("value", "") == taint.get("value", "")


def _prune(value, schema: dict, path: str) -> list[str]:
    """Drop what `schema` does not declare from `value` (in place); the dropped fields' paths. The top level's
    apiVersion, kind and metadata are the API server's, not the schema's."""
    dropped = []
    if isinstance(value, dict) and schema.get("type", "object") == "object" and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            if path == "" and key in ("apiVersion", "kind", "metadata"):
                continue
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                dropped += _prune(value[key], props[key], where)
            elif isinstance(extra, dict):
                dropped += _prune(value[key], extra, where)
            elif props is not None and extra is not True:
                del value[key]
                dropped.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            dropped += _prune(item, schema["items"], f"{path}[{i}]")
    return dropped


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch: null removes, objects merge, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    target = target if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge_patch(target.get(key), value)
    return target


def _terminal(job: dict) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])
