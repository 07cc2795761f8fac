"""A registered model served by KServe: the InferenceService the deploy stage creates or patches, waits for and
records, and that `posttrain models rollback` points back.

    service = Serving.of(DeployConfig(name="posttrain-demo", version="3", output_dir=...))
    record = deploy(kube_client(), service, registry, version="3", via="pipeline run 1234")

The InferenceService (serving.kserve.io/v1beta1, KServe v0.20; its CRD is pinned in k8s/crds/) serves the model
format `huggingface` with the ServingRuntime `runtime` of its namespace (k8s/overlays/kserve: vLLM's OpenAI server),
from `storageUri`: the registered version's artifacts in S3 (MinIO), which KServe's storage initializer downloads
with the credentials of the predictor's service account (a Secret it references, of a MinIO user that may only read
that bucket: no credential is ever in the manifest, a parameter or a tag). The predictor pods carry the label
posttrain.io/model-server=true, which the NetworkPolicy minio-model-servers admits to MinIO, and opt out of the
Istio sidecar as every posttrain pod does. Resources, the node pool (nodeSelector, tolerations) and, in Knative
mode, canaryTrafficPercent (the new revision's share; the previous one keeps the rest) come from the spec.

The step creates the InferenceService, or patches it when it exists and is the registered model's (labelled
posttrain/registered-model; another one of that name is refused): a JSON merge patch that carries the
resourceVersion it read (a concurrent writer makes it fail with 409, the API server's optimistic concurrency) and
replaces spec.predictor whole (a key the new manifest lacks is set to null). The caller's `guard` (the promotion
lock, with the champion re-checked: components.promotion.while_champion) is held around the read and the write, and
again around the recording: a version no longer champion is Superseded and nothing is recorded. Then it waits, at
most `timeout` seconds from the start, for the Ready condition with the change rolled out:
modelStatus.transitionStatus UpToDate and every Ready predictor pod initialized from the new storageUri (the status
of the previous version stays Ready while a new one rolls out; reading pods is the base Role's); in Knative mode, a
new revision (latestCreatedRevision other than before the write, unless the spec did not change) that is the
latestReadyRevision, with its share of the traffic (the canary's, else all), and only that revision's pods checked
(the previous revision keeps its pods and the rest of the traffic during a canary). Every API call has a timeout
within the deadline; a failure of any kind (refused, unreachable, hung) is DeployFailed, one line naming the
InferenceService.

The URL (status.url) is recorded on the registered version (tag posttrain.deployment.url) and the deployment itself
on the registered model (tag posttrain.deployment: service, namespace, version, storage URI, URL, when and by what),
which rollback reads. The Kubernetes API is reached as components.trainjob reaches it (kube_client:
POSTTRAIN_KUBE_API, else the in-cluster service account, else the kubeconfig).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from components.trainjob import api_message, label_value

log = logging.getLogger("components.kserve")

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
MODEL_FORMAT = "huggingface"
"""KServe's model format for a Hugging Face directory (kserve config/runtimes/kserve-huggingfaceserver.yaml)."""
MODEL_LABEL, VERSION_LABEL = "posttrain/registered-model", "posttrain/model-version"
PREDICTOR_LABEL = "serving.kserve.io/inferenceservice"
"""KServe's label on an InferenceService's pods (kserve pkg/constants/constants.go InferenceServicePodLabelKey)."""
SERVER_LABEL = "posttrain.io/model-server"
"""The predictor pods' label that k8s/overlays/kserve's NetworkPolicy admits to MinIO."""
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
DEPLOYMENT_TAG = "posttrain.deployment"
"""On the registered model: the current deployment (JSON), what rollback reads."""
URL_TAG = "posttrain.deployment.url"
"""On a registered version: the URL it was served at."""


class DeployFailed(RuntimeError):
    """The InferenceService was refused, could not be reached, or did not become Ready in time."""


class Superseded(DeployFailed):
    """The version is no longer the champion: another promotion or rollback moved it while the step worked."""


REQUEST_TIMEOUT = 30.0
"""The longest one Kubernetes API call may take (less when the deadline is nearer): a hung connection fails the step
instead of outliving the deadline."""
REVISION_LABEL = "serving.knative.dev/revision"
"""Knative's label on a revision's pods."""


@dataclass(kw_only=True)
class Serving:
    """How a registered model is served: the deploy stage's settings (components/deploy/config.py, where each is
    described and defaulted), kept in the deployment record that rollback reads."""

    name: str
    service: str
    namespace: str
    runtime: str
    service_account: str
    artifacts_destination: str
    deployment_mode: str
    canary_traffic_percent: int | None
    accelerator: str | None
    gpus: int
    cpu: str
    memory: str
    node_selector: dict[str, str]
    tolerations: list[dict]
    min_replicas: int
    timeout: int
    poll_seconds: float

    @classmethod
    def of(cls, cfg) -> Serving:
        """The serving settings of a DeployConfig (or any object with these attributes)."""
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def storage_uri(client, name: str, version: str, artifacts_destination: str) -> str:
    """The s3:// directory of a registered version's model files: its logged model's artifacts, which an MLflow
    server that proxies artifacts (`mlflow-artifacts:/path`, or `mlflow-artifacts://host:port/path` naming the
    server) keeps under its --artifacts-destination."""
    mv = client.get_model_version(name, version)
    source = mv.source or ""
    model_id = mv.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)
    location = client.get_logged_model(model_id).artifact_location if model_id else source
    if location.startswith("s3://"):
        return location.rstrip("/")
    if location.startswith("mlflow-artifacts:"):
        path = location.removeprefix("mlflow-artifacts:")
        if path.startswith("//"):  # the server's authority is not part of the path
            path = "/" + path[2:].partition("/")[2]
        return f"{artifacts_destination.rstrip('/')}/{path.lstrip('/')}".rstrip("/")
    raise DeployFailed(f"{name} v{version}: its model is at {location}, not in S3: KServe's storage initializer "
                       "reads s3:// (run the MLflow server with --artifacts-destination s3://...)")


def manifest(serving: Serving, version: str, uri: str) -> dict:
    """The InferenceService serving `uri` (registered version `version`)."""
    requests = {"cpu": serving.cpu, "memory": serving.memory}
    limits = {**requests, **({serving.accelerator: str(serving.gpus)} if serving.accelerator else {})}
    predictor = {
        "serviceAccountName": serving.service_account,
        "minReplicas": serving.min_replicas,
        "labels": {SERVER_LABEL: "true", "sidecar.istio.io/inject": "false"},
        "model": {"modelFormat": {"name": MODEL_FORMAT}, "runtime": serving.runtime, "storageUri": uri,
                  "resources": {"requests": requests, "limits": limits}},
    }
    if serving.accelerator and serving.deployment_mode == "Standard":
        # a rolling update starts the new pod before the old one goes: on a pool with no spare accelerator it would
        # stay Pending until the deadline; Recreate frees the old pod's first
        predictor["deploymentStrategy"] = {"type": "Recreate"}
    if serving.node_selector:
        predictor["nodeSelector"] = dict(serving.node_selector)
    if serving.tolerations:
        predictor["tolerations"] = [dict(t) for t in serving.tolerations]
    if serving.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = serving.canary_traffic_percent
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": serving.service, "namespace": serving.namespace,
                         "labels": {MODEL_LABEL: label_value(serving.name), VERSION_LABEL: label_value(version)},
                         "annotations": {MODE_ANNOTATION: serving.deployment_mode}},
            "spec": {"predictor": predictor}}


def replacing(old, new):
    """A JSON merge patch (RFC 7386) that turns `old` into `new`: null for each key `old` has and `new` lacks, at
    every depth (a merge patch otherwise keeps them: a GPU limit, an env var, a label of an earlier manifest)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    patch = {k: None for k in old if k not in new}
    patch.update({k: replacing(old.get(k), v) for k, v in new.items()})
    return patch


@dataclass
class Rollout:
    """What `wait_ready` waits for beyond the Ready condition."""

    uri: str
    """The storageUri the Ready predictor pods must be initialized from."""
    pods: bool = True
    """Check the pods (none run while a Knative service is scaled to zero)."""
    knative: bool = False
    """Revisions: a new latestCreatedRevision, Ready, with `share` percent of the traffic."""
    before: str | None = None
    """The latestCreatedRevision before the write (None: any; the write created the service or changed nothing)."""
    share: int = 100
    """The new revision's share of the traffic."""


class InferenceServices:
    """Create or patch an InferenceService and wait for it (the Kubernetes client's custom objects API). Every call
    has a timeout of at most REQUEST_TIMEOUT, and none past `deadline` (time.monotonic()) but a last short one."""

    def __init__(self, api_client, namespace: str, deadline: float | None = None):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.deadline = deadline

    def _call(self, what: str, fn, *args, missing_ok: bool = False, **kwargs):
        """fn(*args, **kwargs) with a request timeout; DeployFailed (one line) for any failure, None for a 404 when
        `missing_ok`."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        left = REQUEST_TIMEOUT if self.deadline is None else self.deadline - time.monotonic()
        timeout = max(1.0, min(REQUEST_TIMEOUT, left))
        try:  # (connect, read): the client ignores a float given alone (kubernetes/client/rest.py takes an int)
            return fn(*args, _request_timeout=(timeout, timeout), **kwargs)
        except ApiException as e:
            if missing_ok and e.status == 404:
                return None
            raise DeployFailed(f"{what} failed: {e.status} {e.reason}: {api_message(e)}") from None
        except (HTTPError, OSError) as e:  # refused, unreachable, timed out (urllib3 retries end in MaxRetryError)
            raise DeployFailed(" ".join(f"{what} failed: {type(e).__name__}: {e}".split())[:600]) from None

    def get(self, name: str) -> dict | None:
        return self._call(f"reading InferenceService {self.namespace}/{name}",
                          self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name,
                          missing_ok=True)

    def apply(self, body: dict, model: str, found: dict | None) -> tuple[str, dict]:
        """Create the InferenceService, or patch the registered model's one of that name (`found`, as read just
        before: its resourceVersion makes the patch fail if anything wrote it since); ('created' or 'patched',
        the object as stored)."""
        name = body["metadata"]["name"]
        if found is None:
            return "created", self._call(f"creating InferenceService {self.namespace}/{name}",
                                         self.custom.create_namespaced_custom_object, GROUP, VERSION,
                                         self.namespace, PLURAL, body, field_validation="Strict")
        theirs = (found.get("metadata") or {}).get("labels") or {}
        if theirs.get(MODEL_LABEL) != label_value(model):
            raise DeployFailed(f"InferenceService {self.namespace}/{name} exists and serves another model "
                               f"({MODEL_LABEL}={theirs.get(MODEL_LABEL)}): set the deploy stage's `service`")
        patch = {"metadata": {"resourceVersion": found["metadata"]["resourceVersion"],
                              "labels": body["metadata"]["labels"], "annotations": body["metadata"]["annotations"]},
                 "spec": {"predictor": replacing((found.get("spec") or {}).get("predictor") or {},
                                                 body["spec"]["predictor"])}}
        return "patched", self._call(f"patching InferenceService {self.namespace}/{name}",
                                     self.custom.patch_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                     PLURAL, name, patch, field_validation="Strict")

    def serving(self, name: str, uri: str, revision: str | None = None) -> bool:
        """Every predictor pod of the InferenceService (of Knative revision `revision` when given) that is Ready was
        initialized from `uri` (KServe's storage initializer gets it as its first argument), and one is: the status
        alone may still be the previous version's, which stays Ready while the new one rolls out."""
        selector = f"{PREDICTOR_LABEL}={name},component=predictor" + (f",{REVISION_LABEL}={revision}"
                                                                       if revision else "")
        pods = self._call(f"listing the predictor pods of InferenceService {self.namespace}/{name}",
                          self.core.list_namespaced_pod, self.namespace, label_selector=selector).items
        ready = [p for p in pods if any(c.type == "Ready" and c.status == "True"
                                        for c in (p.status.conditions if p.status else None) or [])]
        sources = [next((c.args[0] for c in p.spec.init_containers or [] if c.name == "storage-initializer"
                         and c.args), None) for p in ready]
        return bool(ready) and all(source == uri for source in sources)

    def wait_ready(self, name: str, rollout: Rollout, timeout: float, poll: float) -> dict:
        """The InferenceService once Ready with `rollout` done; DeployFailed naming its last condition (or what
        is still missing) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self.deadline = min(self.deadline or deadline, deadline)
        while True:
            isvc = self.get(name)
            if isvc is None:
                raise DeployFailed(f"InferenceService {self.namespace}/{name} was deleted while the step waited")
            status = isvc.get("status") or {}
            ready = _condition(status, "Ready")
            rolled = ((status.get("modelStatus") or {}).get("transitionStatus") or "UpToDate") == "UpToDate"
            why = _last_condition(status)
            if ready and ready.get("status") == "True" and rolled and status.get("url"):
                why = self._not_rolled_out(name, status, rollout)
                if why is None:
                    return isvc
            if time.monotonic() >= deadline:
                raise DeployFailed(f"InferenceService {self.namespace}/{name} was not Ready within {timeout:.0f}s "
                                   f"(deploy timeout): {why}")
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _not_rolled_out(self, name: str, status: dict, rollout: Rollout) -> str | None:
        """What a Ready InferenceService still lacks of `rollout`, or None."""
        revision = None
        if rollout.knative:
            predictor = predictor_status(status)
            revision = predictor.get("latestCreatedRevision")
            if not revision or revision == rollout.before:
                return f"Ready=True, but no new revision yet (latest created: {revision or 'none'})"
            if predictor.get("latestReadyRevision") != revision:
                return (f"Ready=True, but revision {revision} is not Ready yet (latest Ready: "
                        f"{predictor.get('latestReadyRevision') or 'none'})")
            share = sum(t.get("percent") or 0 for t in predictor.get("traffic") or []
                        if t.get("latestRevision") and t.get("revisionName", revision) == revision)
            if share != rollout.share:
                return f"Ready=True, but revision {revision} has {share}% of the traffic, not {rollout.share}%"
        if rollout.pods and not self.serving(name, rollout.uri, revision):
            return (f"Ready=True, but no Ready predictor pod{' of ' + revision if revision else ''} serves "
                    f"{rollout.uri} yet (the previous version's still may)")
        return None


def predictor_status(status: dict | None) -> dict:
    """status.components.predictor of an InferenceService's status (Knative's revisions and traffic)."""
    return ((status or {}).get("components") or {}).get("predictor") or {}


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _last_condition(status: dict) -> str:
    """The condition that says most about why it is not Ready: the first one not True (Ready last), with the
    model's last failure."""
    conditions = status.get("conditions") or []
    if not conditions:
        return "no condition yet (is KServe's controller running, and the ServingRuntime there?)"
    pending = [c for c in conditions if c.get("status") != "True" and c.get("type") != "Ready"]
    c = (pending or [_condition(status, "Ready") or conditions[-1]])[0]
    text = f"{c.get('type')}={c.get('status')}"
    if c.get("reason") or c.get("message"):
        text += f" ({c.get('reason', '')}: {c.get('message', '')})"
    failure = (status.get("modelStatus") or {}).get("lastFailureInfo") or {}
    if failure:
        text += f"; model: {failure.get('reason', '')}: {failure.get('message', '')}"
    return " ".join(text.split())[:600]


def connect():
    """The Kubernetes API client (components.trainjob.kube_client); no configuration to reach it (no
    POSTTRAIN_KUBE_API, service account or kubeconfig) is DeployFailed."""
    from kubernetes.config import ConfigException

    from components.trainjob import kube_client

    try:
        return kube_client()
    except (ConfigException, OSError, ValueError) as e:
        raise DeployFailed(" ".join(f"no Kubernetes API to reach: {type(e).__name__}: {e}".split())[:600]) from None


def deployment_record(client, name: str) -> dict | None:
    """The registered model's current deployment (tag posttrain.deployment), or None."""
    text = (client.get_registered_model(name).tags or {}).get(DEPLOYMENT_TAG)
    return json.loads(text) if text else None


def deploy(api_client, serving: Serving, client, version: str, *, via: str, guard=None) -> dict:
    """Serve registered version `version`: create or patch the InferenceService, wait for Ready, record the URL on
    the version and the deployment on the registered model; returns the deployment record. `guard()`: a context
    manager held around the read and the write of the InferenceService and around the recording, that raises
    Superseded when `version` is no longer the one to serve (components.promotion.while_champion)."""
    guard = guard or nullcontext
    deadline = time.monotonic() + serving.timeout
    uri = storage_uri(client, serving.name, version, serving.artifacts_destination)
    services = InferenceServices(api_client, serving.namespace, deadline)
    with guard():
        previous = deployment_record(client, serving.name)
        found = services.get(serving.service)
        action, stored = services.apply(manifest(serving, version, uri), serving.name, found)
    log.info("%s InferenceService %s/%s: %s v%s from %s", action, serving.namespace, serving.service, serving.name,
             version, uri)
    before = predictor_status((found or {}).get("status"))
    changed = found is None or (stored.get("metadata") or {}).get("generation") != found["metadata"].get("generation")
    rollout = Rollout(uri=uri, pods=serving.min_replicas > 0, knative=serving.deployment_mode == "Knative",
                      before=before.get("latestCreatedRevision") if changed else None,
                      share=serving.canary_traffic_percent if serving.canary_traffic_percent is not None
                      and before.get("latestRolledoutRevision") else 100)
    isvc = services.wait_ready(serving.service, rollout, max(0.0, deadline - time.monotonic()), serving.poll_seconds)
    url = isvc["status"]["url"]
    record = {"service": serving.service, "namespace": serving.namespace, "version": str(version),
              "previous": (previous or {}).get("version"), "storage_uri": uri, "url": url, "action": action,
              "at": datetime.now(UTC).isoformat(timespec="seconds"), "via": via, "serving": asdict(serving)}
    with guard():
        client.set_model_version_tag(serving.name, str(version), URL_TAG, url)
        client.set_registered_model_tag(serving.name, DEPLOYMENT_TAG, json.dumps(record))
    log.info("InferenceService %s/%s is Ready at %s (%s v%s)", serving.namespace, serving.service, url,
             serving.name, version)
    return record


def redeploy(api_client, client, name: str, version: str, *, via: str, guard=None) -> dict | None:
    """Point the registered model's InferenceService at `version` (all traffic: a rollback ends any canary), with the
    settings it was deployed with; None when the model has no deployment."""
    record = deployment_record(client, name)
    if record is None:
        return None
    serving = Serving(**{**record["serving"], "canary_traffic_percent": None})
    return deploy(api_client, serving, client, version, via=via, guard=guard)
