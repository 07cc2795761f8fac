"""A training stage on several nodes: a Kubeflow Trainer TrainJob that the stage's KFP step creates, watches and
deletes.

    placement = Placement.from_json(launch["trainjob"])      # fixed at compile time from the spec's resources
    manifest = trainjob_manifest(placement, name=trainjob_name(run_id, stage), ...)
    TrainJobLauncher(kube_client(), placement.namespace).run(manifest, timeout=placement.timeout)

The TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2) references posttrain's TrainingRuntime
(k8s/overlays/trainer), whose torch policy makes one JobSet pod per node and sets torchrun's PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in each. The TrainJob carries the rest: the image, the command
(the stage's module under torchrun, reading the config the step wrote to the shared workspace), numNodes,
processes and accelerators per node, and, as a runtime patch, the node selector, tolerations, pull secrets, a
memory-backed /dev/shm and the run's workspace PVC mounted where the step sees it (checkpoints live there, so every
node and every retry sees them). Credentials are environment variables from Secret references, never values.

The launcher (TrainJobLauncher.run):
- names the TrainJob after the KFP run and the stage (trainjob_name), with labels posttrain/run-id and
  posttrain/stage: a retried step finds the TrainJob of an earlier attempt that was killed before it could delete
  it, and reattaches to it instead of starting a second one (a finished failed one is deleted and started again:
  the stage resumes from its last checkpoint; one being deleted is waited for, then created again);
- makes the Argo Workflow of the KFP run (the label workflows.argoproj.io/workflow of the step's own pod) the
  TrainJob's owner, so deleting the run deletes the TrainJob through Kubernetes' garbage collector even when the
  step could not: Argo stops a step by signalling its whole process group, KFP's launcher exits at once and the
  container ends with it, racing the `finally` below;
- streams the logs of the TrainJob's pods, each line prefixed with the node's rank (the pod's Job completion
  index: JobSet's job-index is the replica of the replicated job, 0 on every node);
- waits for the TrainJob's Complete or Failed condition, at most `timeout` seconds, and fails with the TrainJob's
  own reason and message;
- deletes the TrainJob when the step ends, whatever ends it: success, failure, timeout, or SIGTERM (KFP stopping
  the run, a node drained; the SIGTERM handler sends the delete first thing). Only SIGKILL escapes: the next
  attempt reattaches, and deleting the run collects it.

Why the `kubeflow-trainer-api` models and the Kubernetes client rather than the kubeflow SDK's TrainerClient:
docs/design.md, "Several nodes".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("components.trainjob")

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
MANAGER = "posttrain.io/launcher"
"""The owner of posttrain's runtime patch (spec.runtimePatches[].manager)."""
NODE = "node"
"""The replicated job and container of posttrain's TrainingRuntime that run the trainer: Trainer's torch plugin
sets the PET_* variables in the container of this name."""
RUN_LABEL, STAGE_LABEL, SPEC_LABEL = "posttrain/run-id", "posttrain/stage", "posttrain/spec"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
"""The label of the pods of a TrainJob's JobSet (the JobSet has the TrainJob's name)."""
RANK_LABEL = "batch.kubernetes.io/job-completion-index"
"""A TrainJob pod's node rank: the Job controller's completion index (kubernetes pkg/controller/job
indexed_job_utils.go), which Trainer's torch plugin also passes as PET_NODE_RANK. Not jobset.sigs.k8s.io/job-index:
Trainer makes one replicated job of numNodes pods, so that is 0 on every node."""
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
"""The label Argo puts on every pod of a Workflow (argo-workflows workflow/common/common.go LabelKeyWorkflow)."""
WORKFLOW_GROUP, WORKFLOW_VERSION, WORKFLOW_PLURAL = "argoproj.io", "v1alpha1", "workflows"
API_ENV = "POSTTRAIN_KUBE_API"
"""An API server URL used without credentials (a `kubectl proxy`, a test's server); unset: the in-cluster
service account, else the kubeconfig."""
FORWARDED_ENV = re.compile(r"^(POSTTRAIN_[A-Z0-9_]+|MLFLOW_TRACKING_URI|MLFLOW_S3_ENDPOINT_URL|KFP_MLFLOW_CONFIG|"
                           r"MLFLOW_RUN_ID|MLFLOW_WORKSPACE|MLFLOW_TRACKING_AUTH)$")
"""What the step's environment passes on to the TrainJob's pods as values: URIs and lineage, never credentials
(KFP's MLflow plugin's settings included: its config names Secret keys, never values)."""


class TrainJobFailed(RuntimeError):
    """The TrainJob ended with its Failed condition, or did not end in time."""


@dataclass(kw_only=True)
class Placement:
    """Where and how the TrainJob runs: the spec's resources of the stage, fixed when the pipeline is compiled."""

    namespace: str
    runtime: str
    """The TrainingRuntime (in `namespace`) the TrainJob references."""
    image: str
    spec_name: str
    accelerator: str | None = None
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    """Kubernetes tolerations (key, operator, value, effect, tolerationSeconds)."""
    secrets: dict[str, list[str]] = field(default_factory=dict)
    """Secret name → the keys set as environment variables of the same name."""
    pull_secrets: list[str] = field(default_factory=list)
    queue: str | None = None
    """A Kueue LocalQueue: the TrainJob's kueue.x-k8s.io/queue-name label."""
    timeout: int = 0
    """Seconds the TrainJob may run (activeDeadlineSeconds) and the step waits; 0: no limit."""
    workspace_pvc: str = ""
    """The run's workspace PVC; empty: the one the step's own pod mounts at the workspace."""
    poll_seconds: float = 10.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Placement:
        return cls(**json.loads(text))


def trainjob_name(run_id: str, stage: str) -> str:
    """The TrainJob of a run's stage: the same for every attempt of the step. Short (JobSet names its pods
    <name>-node-<job>-<index>-<suffix>, at most 63 characters) and a DNS-1035 label."""
    slug = re.sub(r"[^a-z0-9-]", "-", stage.lower())[:16].strip("-")
    digest = hashlib.sha256(f"{run_id}/{stage}".encode()).hexdigest()[:10]
    return f"pt-{slug}-{digest}"


def label_value(text: str) -> str:
    """A label value (≤ 63 characters of [A-Za-z0-9._-], alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63].strip("._-") or "none"


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The step's environment that the TrainJob's pods get as plain values (FORWARDED_ENV)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if FORWARDED_ENV.match(k)}


def trainjob_manifest(placement: Placement, *, name: str, run_id: str, stage: str, nodes: int, nproc: int,
                      command: list[str], env: dict[str, str], workspace: str, workspace_pvc: str) -> dict:
    """The TrainJob of one attempt of a stage, built with the Trainer's own API models (kubeflow-trainer-api),
    as the dict the API server takes."""
    from kubeflow_trainer_api import models as m

    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    gpus = {placement.accelerator: quantity(str(nproc))} if placement.accelerator else {}
    requests = {k: quantity(v) for k, v in (("cpu", placement.cpu), ("memory", placement.memory)) if v}
    env_vars = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in env.items()]
    env_vars += [m.IoK8sApiCoreV1EnvVar(name=key, value_from=m.IoK8sApiCoreV1EnvVarSource(
        secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=False)))
        for secret, keys in sorted(placement.secrets.items()) for key in keys]
    volumes = [m.IoK8sApiCoreV1Volume(name="workspace", persistent_volume_claim=(
        m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=workspace_pvc)))]
    mounts = [m.IoK8sApiCoreV1VolumeMount(name="workspace", mount_path=workspace)]
    if placement.shm_size:
        volumes.append(m.IoK8sApiCoreV1Volume(name="dshm", empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
            medium="Memory", size_limit=quantity(placement.shm_size))))
        mounts.append(m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm"))
    pod = m.TrainerV1alpha1PodSpecPatch(
        node_selector=placement.node_selector or None,
        tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(t) for t in placement.tolerations] or None,
        image_pull_secrets=[m.IoK8sApiCoreV1LocalObjectReference(name=s) for s in placement.pull_secrets] or None,
        volumes=volumes,
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE, volume_mounts=mounts)])
    node_job = m.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=m.TrainerV1alpha1JobTemplatePatch(
        spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))))
    patch = m.TrainerV1alpha1RuntimePatch(manager=MANAGER, training_runtime_spec=(
        m.TrainerV1alpha1TrainingRuntimeSpecPatch(template=m.TrainerV1alpha1JobSetTemplatePatch(
            spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node_job])))))
    labels = {RUN_LABEL: label_value(run_id), STAGE_LABEL: label_value(stage),
              SPEC_LABEL: label_value(placement.spec_name)}
    if placement.queue:
        labels["kueue.x-k8s.io/queue-name"] = placement.queue
    job = m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=placement.namespace, labels=labels),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(api_group=GROUP, kind="TrainingRuntime", name=placement.runtime),
            active_deadline_seconds=placement.timeout or None,
            trainer=m.TrainerV1alpha1Trainer(
                image=placement.image, command=command, env=env_vars, num_nodes=nodes, num_proc_per_node=nproc,
                resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
                    requests=requests or None, limits={**requests, **gpus} or None)),
            runtime_patches=[patch]))
    return job.to_dict()


# ---------------------------------------------------------------------------------------------------------------
# The Kubernetes API


def kube_client():
    """A kubernetes ApiClient: POSTTRAIN_KUBE_API when set, else the in-cluster service account, else the
    kubeconfig."""
    from kubernetes import client, config

    if os.environ.get(API_ENV):
        configuration = client.Configuration()
        configuration.host = os.environ[API_ENV].rstrip("/")
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def workspace_claim(api_client, namespace: str, workspace: str, pod_name: str | None = None) -> str:
    """The PVC the step's own pod (HOSTNAME) mounts at the workspace, or where the workspace lies."""
    from kubernetes import client

    pod_name = pod_name or os.environ.get("HOSTNAME", "")
    pod = client.CoreV1Api(api_client).read_namespaced_pod(pod_name, namespace)
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes or []
              if v.persistent_volume_claim}
    for container in pod.spec.containers:
        for mount in container.volume_mounts or []:
            if mount.name in claims and (workspace + "/").startswith(mount.mount_path.rstrip("/") + "/"):
                return claims[mount.name]
    raise TrainJobFailed(f"pod {namespace}/{pod_name} mounts no PVC at the workspace {workspace}: a stage on several "
                         "nodes needs the run's workspace (a PVC, storage.workspace_access_modes: [ReadWriteMany])")


def workflow_owner(api_client, namespace: str, pod_name: str | None = None) -> dict | None:
    """The ownerReference to the Argo Workflow that runs the step's own pod (HOSTNAME), or None when this process
    runs in no Workflow's pod (outside a cluster, or a pod of no Workflow). Refused reads fail: without them the
    TrainJob would outlive its run."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    pod_name = pod_name or os.environ.get("HOSTNAME", "")
    if not pod_name:
        log.warning("no HOSTNAME: the TrainJob gets no owner (deleting the run will not delete it)")
        return None
    try:
        pod = client.CoreV1Api(api_client).read_namespaced_pod(pod_name, namespace)
    except ApiException as e:
        if e.status == 404:
            log.warning("no pod %s/%s: the TrainJob gets no owner (deleting the run will not delete it)", namespace,
                        pod_name)
            return None
        raise TrainJobFailed(f"reading the step's pod {namespace}/{pod_name} failed: {e.status} {e.reason}: "
                             f"{api_message(e)}") from None
    workflow = (pod.metadata.labels or {}).get(WORKFLOW_LABEL)
    if not workflow:
        log.warning("pod %s/%s has no %s label: the TrainJob gets no owner", namespace, pod_name, WORKFLOW_LABEL)
        return None
    try:
        found = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            WORKFLOW_GROUP, WORKFLOW_VERSION, namespace, WORKFLOW_PLURAL, workflow)
    except ApiException as e:
        raise TrainJobFailed(f"reading the run's Workflow {namespace}/{workflow} failed: {e.status} {e.reason}: "
                             f"{api_message(e)} (the pipeline runner needs get on workflows.argoproj.io)") from None
    # no blockOwnerDeletion: it would need update on workflows/finalizers (the garbage collector's admission)
    return {"apiVersion": f"{WORKFLOW_GROUP}/{WORKFLOW_VERSION}", "kind": "Workflow", "name": workflow,
            "uid": found["metadata"]["uid"]}


def _terminal(job: dict) -> tuple[str, str, str] | None:
    """(type, reason, message) of the TrainJob's Complete or Failed condition when it is True, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], cond.get("reason", ""), cond.get("message", "")
    return None


def _since_seconds(stamp: str, margin: float = 60.0) -> int | None:
    """Seconds back to a log line's RFC 3339 timestamp, with a margin for clock skew (a reconnect re-reads from
    there, not the whole log); None when there is no timestamp yet."""
    from datetime import UTC, datetime

    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", stamp.replace("Z", "+00:00")))
    except ValueError:
        return None
    return max(1, int((datetime.now(UTC) - when).total_seconds() + margin))


class _PodLogs(threading.Thread):
    """Streams one pod's trainer container log to `out`, each line prefixed with the node's index; reconnects
    (from shortly before the last line shown, skipping the lines already shown by their timestamps) while the
    pod runs."""

    def __init__(self, core, namespace: str, pod: str, node: str, out, finished):
        super().__init__(daemon=True, name=f"logs-{pod}")
        self.core, self.namespace, self.pod, self.node = core, namespace, pod, node
        self.out, self.finished = out, finished

    def run(self) -> None:
        last, shown_at_last = "", 0  # the newest timestamp shown, and how many lines carried it
        while True:
            try:
                since = {"since_seconds": s} if (s := _since_seconds(last)) else {}
                stream = self.core.read_namespaced_pod_log(self.pod, self.namespace, container=NODE, follow=True,
                                                           timestamps=True, _preload_content=False, **since)
                equal = 0
                for raw in stream:
                    for line in raw.decode(errors="replace").splitlines():
                        stamp, _, text = line.partition(" ")
                        if stamp < last:
                            continue
                        if stamp == last:
                            equal += 1
                            if equal <= shown_at_last:
                                continue
                            shown_at_last += 1
                        else:
                            last, shown_at_last, equal = stamp, 1, 1
                        self.out.write(f"[{self.node}] {text}\n")
                        self.out.flush()
            except Exception as e:  # a dropped connection, a pod gone with its TrainJob: try again while it runs
                log.debug("log stream of %s: %s", self.pod, e)
            if self.finished(self.pod):
                return
            time.sleep(1.0)


class TrainJobLauncher:
    """Creates (or reattaches to) a TrainJob, streams its pods' logs, waits for it and deletes it."""

    def __init__(self, api_client, namespace: str, *, poll_seconds: float = 10.0, out=None):
        from kubernetes import client

        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace, self.poll, self.out = namespace, poll_seconds, out or sys.stdout
        self._logs: dict[str, _PodLogs] = {}
        self._done_pods: set[str] = set()
        self._deleting: set[str] = set()
        """TrainJobs this launcher has asked the API to delete (once is enough)."""

    # --- the API calls
    def get(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete(self, name: str, *, again: bool = False, fresh_client: bool = False) -> None:
        """Delete the TrainJob (its pods first: foreground); not again when this launcher already did, unless
        `again`. `fresh_client`: on a connection of its own (from a signal handler, which may interrupt a request
        holding the client's connection pool)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        if name in self._deleting and not again:
            return
        custom = client.CustomObjectsApi(client.ApiClient(self.api_client.configuration)) if fresh_client \
            else self.custom
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                   propagation_policy="Foreground")
            self._deleting.add(name)
            log.info("deleted TrainJob %s/%s", self.namespace, name)
        except ApiException as e:
            if e.status != 404:
                log.error("could not delete TrainJob %s/%s: %s %s", self.namespace, name, e.status, e.reason)

    def _wait_gone(self, name: str, seconds: float = 300.0) -> None:
        deadline = time.monotonic() + seconds
        while self.get(name) is not None:
            if time.monotonic() > deadline:
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} of an earlier attempt was not deleted within "
                                     f"{seconds:.0f}s")
            time.sleep(min(self.poll, 2.0))

    def create_or_reattach(self, manifest: dict, attempt: int = 0) -> dict:
        """The TrainJob of the manifest's name: an earlier attempt's when it runs (reattached), else a new one."""
        from kubernetes.client.exceptions import ApiException

        name, labels = manifest["metadata"]["name"], manifest["metadata"]["labels"]
        found = self.get(name)
        if found is not None and (found.get("metadata") or {}).get("deletionTimestamp"):
            log.info("TrainJob %s/%s of an earlier attempt is being deleted: waiting for it to go", self.namespace,
                     name)
            self._wait_gone(name)
            found = None
        if found is not None:
            theirs = (found.get("metadata") or {}).get("labels") or {}
            if any(theirs.get(k) != labels[k] for k in (RUN_LABEL, STAGE_LABEL)):
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} exists and belongs to another run or stage "
                                     f"({RUN_LABEL}={theirs.get(RUN_LABEL)}, {STAGE_LABEL}={theirs.get(STAGE_LABEL)})")
            state = _terminal(found)
            if state is None or state[0] == "Complete":
                log.info("reattaching to TrainJob %s/%s of an earlier attempt of this step", self.namespace, name)
                return found
            log.info("TrainJob %s/%s of an earlier attempt failed (%s: %s): deleting it and starting again from the "
                     "last checkpoint", self.namespace, name, state[1], state[2])
            self.delete(name, again=True)
            self._wait_gone(name)
        try:
            created = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
        except ApiException as e:
            if e.status == 409 and attempt < 3:  # created between the get and the create, or still being deleted
                return self.create_or_reattach(manifest, attempt + 1)
            raise TrainJobFailed(f"creating TrainJob {self.namespace}/{name} failed: {e.status} {e.reason}: "
                                 f"{api_message(e)}") from None
        self._deleting.discard(name)  # a new TrainJob of that name
        spec = manifest["spec"]["trainer"]
        log.info("created TrainJob %s/%s: %s node(s) × %s process(es), runtime %s", self.namespace, name,
                 spec.get("numNodes"), spec.get("numProcPerNode"), manifest["spec"]["runtimeRef"]["name"])
        return created

    # --- logs
    def _pod_finished(self, pod: str) -> bool:
        return pod in self._done_pods

    def follow_pods(self, name: str) -> None:
        """Start streaming the log of every pod of the TrainJob that has started."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={name}").items
        seen = set()
        for pod in pods:
            pod_name, phase = pod.metadata.name, (pod.status.phase if pod.status else None)
            seen.add(pod_name)
            if phase in ("Succeeded", "Failed"):
                self._done_pods.add(pod_name)
            if pod_name not in self._logs and phase in ("Running", "Succeeded", "Failed"):
                node = f"node-{(pod.metadata.labels or {}).get(RANK_LABEL, '?')}"
                self._logs[pod_name] = _PodLogs(self.core, self.namespace, pod_name, node, self.out,
                                                self._pod_finished)
                self._logs[pod_name].start()
        self._done_pods |= set(self._logs) - seen  # deleted pods: their streams end

    def _drain_logs(self, seconds: float = 10.0) -> None:
        self._done_pods |= set(self._logs)
        deadline = time.monotonic() + seconds
        for thread in self._logs.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- the whole life of a TrainJob
    def run(self, manifest: dict, *, timeout: float = 0) -> None:
        """Create or reattach, stream logs and wait; delete the TrainJob however this ends (SIGTERM included).
        The TrainJob is owned by the run's Workflow (workflow_owner) when the step runs in one."""
        name = manifest["metadata"]["name"]
        owner = workflow_owner(self.api_client, self.namespace)
        if owner is not None:
            manifest = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner]}}
        previous = _on_sigterm_exit(lambda: self.delete(name, fresh_client=True))
        try:
            self.create_or_reattach(manifest)
            self.wait(name, timeout)
        finally:
            try:
                self.delete(name)
                self._drain_logs(2.0)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

    def wait(self, name: str, timeout: float = 0) -> None:
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            job = self.get(name)
            if job is None:
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} was deleted while the step waited for it")
            self.follow_pods(name)
            state = _terminal(job)
            if state is not None:
                kind, reason, message = state
                self._drain_logs()
                if kind == "Complete":
                    log.info("TrainJob %s/%s completed", self.namespace, name)
                    return
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} failed: {reason or 'no reason given'}: "
                                     f"{message or 'no message'} (the logs of its pods are above)")
            if deadline is not None and time.monotonic() > deadline:
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} did not finish within {timeout:.0f}s "
                                     "(resources.timeout)")
            time.sleep(self.poll)


def api_message(e) -> str:
    """The API server's Status message of a refused request (an ApiException's body)."""
    try:
        return json.loads(e.body).get("message", "")
    except (TypeError, ValueError):
        return str(e.body or "")


def _on_sigterm_exit(first=None):
    """Turn SIGTERM into SystemExit, so `finally` blocks run (and delete the TrainJob), calling `first` before
    anything else (the process may have little time left); returns the previous handler (None off the main
    thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        if first is not None:
            first()
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)
