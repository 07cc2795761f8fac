"""KFP's launcher on top of kfp.local's DAG: each task of a compiled pipeline runs as a pod, seeing what its pod
would see.

    cluster = KFPCluster(runtime=pods.Runtime(), root=tmp_path, namespace="posttrain", api=kube_api)
    result = run_pipeline("cluster-7b", {"psft_max_steps": 2}, cluster)    # a spec, a Spec or an IR file
    result.status, result.tasks["sft"].log, result.workspace

kfp.local (kfp 2.17) walks the DAG (conditions, exit handler, retries, caching off); this module replaces its
task dispatcher and importer with what KFP's backend does for each task:

- the pod (kubeflow/pipelines backend/src/v2/compiler/argocompiler/argo.go, container.go; driver/driver.go,
  k8s.go): the labels of the task's Kubernetes platform config (podMetadata) plus
  `pipelines.kubeflow.org/v2_component: "true"` (argo.go podMetadata) and Argo's `workflows.argoproj.io/workflow`;
  the run's service account; the security context (set_security_context: runAsUser, runAsGroup); the environment
  from the container spec, the Secrets (secretAsEnv, through the API's kubelet when there is one) and the
  launcher's KFP_POD_NAME/KFP_POD_UID (common.go commonEnvs); emptyDir volumes at /kfp-launcher, /gcs, /s3, /minio,
  /.local, /.cache and /.config (container.go) and the spec's emptyDirMounts; the run's workspace PVC
  (`<run>-kfp-workspace`, driver/k8s.go GetWorkspacePVCName) at /kfp-workspace (component/constants.go
  WorkspaceMountPath; dsl.WORKSPACE_PATH_PLACEHOLDER resolves to it, driver/resolve.go) only when the task needs it
  (driver.go needsWorkspaceMount: a parameter holding the placeholder or the path, or a workspace artifact).
  Node selectors, tolerations, pull secrets and the deadline are recorded in the manifest, not scheduled on.
- the launcher (component/launcher_v2.go): every input artifact downloaded from the object store to
  LocalPathForURI (`/s3/<bucket>/<key>`) on the pod's own /s3 scratch volume, except one already in the workspace
  (metadata `_kfp_workspace`); the executor input's URIs as the backend writes them (s3://<bucket>/<key>, which
  kfp's Python executor maps to /s3/..., kfp/dsl/types/artifact_types.py), the executor output file under the
  task root on /s3 (driver.go), output parameters in /tmp/kfp/outputs; after the pod ends, the outputs uploaded
  from /s3 to the object store.
- the importer (component/importer_launcher.go): with download_to_workspace, the artifact is downloaded into the
  workspace at /kfp-workspace/.artifacts/<LocalPathForURI> (launcher_v2.go LocalWorkspacePathForURI) and its
  consumers get it flagged `_kfp_workspace` (driver/resolve.go setWorkspaceFlag).

The object store is a directory per bucket under <root>/s3 (kfp.local's pipeline root is the pipeline's bucket
there); an s3:// URI whose bucket has no directory is read from `cluster.s3_endpoint` (a MinIO or moto).
`KFPCluster.start_pod(manifest, log)` runs any pod manifest (the steps', or a TrainJob's node pods when kube.py's
API calls it as its kubelet) with the volumes it declares: PVCs from the cluster's claims, emptyDirs fresh.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import pods

WORKSPACE_MOUNT = "/kfp-workspace"  # backend/src/v2/component/constants.go WorkspaceMountPath (= kfp.dsl.constants)
WORKSPACE_VOLUME = "kfp-workspace"  # constants.go WorkspaceVolumeName; the PVC is <run>-kfp-workspace (k8s.go)
WORKSPACE_PLACEHOLDER = "{{$.workspace_path}}"
V2_LABEL = "pipelines.kubeflow.org/v2_component"  # argocompiler/argo.go podMetadata
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"  # argoproj/argo-workflows workflow/common/common.go LabelKeyWorkflow
SCRATCH = {"/kfp-launcher": "kfp-launcher", "/gcs": "gcs-scratch", "/s3": "s3-scratch", "/minio": "minio-scratch",
           "/.local": "dot-local-scratch", "/.cache": "dot-cache-scratch", "/.config": "dot-config-scratch"}
"""The emptyDir volumes of every executor pod (argocompiler/container.go), by mount path."""
OUTPUT_PARAMETERS = "/tmp/kfp/outputs"  # driver.go: OutputFile of each output parameter
PLATFORM_KEYS = {"podMetadata", "securityContext", "secretAsEnv", "emptyDirMounts", "nodeSelector", "tolerations",
                 "activeDeadlineSeconds", "imagePullPolicy", "imagePullSecret"}
"""The platform config keys emulated; a task with any other is refused rather than run half-configured."""


def local_path_for_uri(uri: str) -> str:
    """launcher_v2.go LocalPathForURI."""
    for scheme, prefix in (("gs://", "/gcs/"), ("minio://", "/minio/"), ("s3://", "/s3/")):
        if uri.startswith(scheme):
            return prefix + uri[len(scheme):]
    raise ValueError(f"failed to generate local path for URI {uri}: unsupported storage scheme")


def local_workspace_path_for_uri(uri: str) -> str:
    """launcher_v2.go LocalWorkspacePathForURI: LocalPathForURI rebased under /kfp-workspace/.artifacts."""
    return f"{WORKSPACE_MOUNT}/.artifacts/{local_path_for_uri(uri).lstrip('/')}"


def needs_workspace_mount(executor_input: dict) -> bool:
    """driver/driver.go needsWorkspaceMount."""
    for value in (executor_input.get("inputs") or {}).get("parameterValues", {}).values():
        if isinstance(value, str) and (WORKSPACE_PLACEHOLDER in value or WORKSPACE_MOUNT in value):
            return True
    for artifacts in (executor_input.get("inputs") or {}).get("artifacts", {}).values():
        first = (artifacts.get("artifacts") or [{}])[0]
        if (first.get("metadata") or {}).get("_kfp_workspace") is True:
            return True
    return False


def _copy(src: Path, dest: Path, uid: int | None = None) -> None:
    """A file or a directory tree, as a blob download writes it (objectstore.DownloadBlob: directories 0755, files
    0644, owned by the user the launcher runs as: the pod's, when given, else root)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True, copy_function=shutil.copyfile)
    else:
        shutil.copyfile(src, dest)
    walked = os.walk(dest) if dest.is_dir() else [(str(dest.parent), [], [dest.name])]
    for top, dirs, files in walked:
        for name, mode in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            os.chmod(os.path.join(top, name), mode)
            if uid is not None:
                os.chown(os.path.join(top, name), uid, uid)
    if dest.is_dir():
        dest.chmod(0o755)
    if uid is not None:
        os.chown(dest, uid, uid)


@dataclass
class ObjectStore:
    """s3://<bucket>/<key> ↔ <root>/<bucket>/<key>; a bucket without a directory is read from `endpoint`."""

    root: Path
    endpoint: str | None = None
    credentials: dict[str, str] = field(default_factory=dict)

    def local(self, uri: str) -> Path:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.root / bucket / key

    def uri(self, path: str | Path) -> str | None:
        """The s3:// URI of a local path in the store, else None."""
        path = Path(path).resolve()
        root = self.root.resolve()
        if root not in path.parents:
            return None
        return "s3://" + str(path.relative_to(root))

    def fetch(self, uri: str, dest: Path, uid: int | None = None) -> None:
        """launcher_v2.go downloadArtifacts → objectstore.DownloadBlob: the object, or every object under the
        prefix, to `dest`."""
        if not uri.startswith("s3://"):
            local = Path(uri)
            if self.uri(local) is None:
                raise ValueError(f"input artifact {uri}: not in the object store (no s3:// URI)")
            uri = self.uri(local)
        source = self.local(uri)
        if source.exists():
            _copy(source, dest, uid)
            return
        if not self.endpoint:
            raise FileNotFoundError(f"failed to download input artifact from remote storage URI {uri}: no such object")
        from urllib.parse import urlparse

        from minio import Minio

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        url = urlparse(self.endpoint)
        client = Minio(url.netloc, self.credentials.get("AWS_ACCESS_KEY_ID"),
                       self.credentials.get("AWS_SECRET_ACCESS_KEY"), secure=url.scheme == "https",
                       region=self.credentials.get("AWS_DEFAULT_REGION", "us-east-1"))
        objects = [o for o in client.list_objects(bucket, prefix=key.rstrip("/") + "/", recursive=True)]
        if not objects:
            client.fget_object(bucket, key, str(dest))
        for o in objects:
            client.fget_object(bucket, o.object_name, str(dest / o.object_name[len(key.rstrip("/")) + 1:]))
        if uid is not None:
            for top, dirs, files in os.walk(dest):
                for name in dirs + files:
                    os.chown(os.path.join(top, name), uid, uid)


@dataclass
class TaskRun:
    """One attempt of a task: its pod as the API would show it, its log, how it ended."""

    task: str
    pod: dict
    log: Path
    phase: str = "Pending"
    exit_code: int | None = None
    downloaded: list[str] = field(default_factory=list)
    """The URIs the launcher downloaded into the pod's scratch volume."""


@dataclass
class KFPCluster:
    """What the tasks run on. `api`: kube.py's KubeApi (or any object with add(obj) and pod_environment(pod)):
    the step pods, the workspace PVC and Secrets live there; `secrets` is used without one. `network`: network.py's
    Network (attach(pod) → the pod's hosts). `admit(pod) → pod`: admission (pods.admit with the install's
    policies)."""

    runtime: Any
    root: Path
    namespace: str = "posttrain"
    service_account: str | None = "pipeline-runner"
    api: Any = None
    network: Any = None
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Added to every pod's environment (e.g. POSTTRAIN_KUBE_API)."""
    s3_endpoint: str | None = None
    s3_credentials: dict[str, str] = field(default_factory=dict)
    admit: Any = None
    workspace_owner: tuple[int, int] = (0, 0)
    workspace_mode: int = 0o755
    """The fresh workspace volume's root, as the StorageClass provisions it (block-backed: root:root 0755)."""
    timeout: float = 1800.0
    """Seconds a pod may run when its task sets no deadline."""
    claims: dict[tuple[str, str], Path] = field(default_factory=dict)
    """(namespace, PVC name) → the directory backing it."""
    runs: list[TaskRun] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root)
        self.store = ObjectStore(self.root / "s3", self.s3_endpoint, self.s3_credentials)
        self._lock = threading.Lock()

    # --- volumes and pods from manifests
    def add_claim(self, namespace: str, name: str) -> Path:
        """A PVC and the directory backing it (the API gets the object too)."""
        path = self.root / "pvc" / namespace / name
        if not path.exists():
            path.mkdir(parents=True)
            os.chown(path, *self.workspace_owner)
            path.chmod(self.workspace_mode)
        self.claims[(namespace, name)] = path
        if self.api is not None and hasattr(self.api, "add"):
            self.api.add({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                          "metadata": {"name": name, "namespace": namespace},
                          "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
                          "status": {"phase": "Bound"}})
        return path

    def volumes(self, manifest: dict, host_dirs: dict[str, Path] | None = None) -> list[pods.Volume]:
        """The pod's volumes as its container mounts them: PVCs from `claims`, emptyDirs fresh (or `host_dirs`
        by volume name: the launcher's scratch it fills before the container starts)."""
        spec, namespace = manifest["spec"], manifest["metadata"]["namespace"]
        declared = {v["name"]: v for v in spec.get("volumes") or []}
        out = []
        for mount in spec["containers"][0].get("volumeMounts") or []:
            volume = declared[mount["name"]]
            if claim := volume.get("persistentVolumeClaim"):
                host = self.claims.get((namespace, claim["claimName"]))
                if host is None:
                    raise FileNotFoundError(f'persistentvolumeclaim "{claim["claimName"]}" not found in {namespace}')
            elif "emptyDir" in volume:
                host = (host_dirs or {}).get(mount["name"]) or pods.empty_dir(
                    self.root / "emptydir" / manifest["metadata"]["name"] / mount["name"])
            else:
                raise ValueError(f"pod {manifest['metadata']['name']}: volume {mount['name']}: only PVCs and emptyDirs "
                                 "are emulated")
            out.append(pods.Volume(mount["mountPath"], Path(host), read_only=bool(mount.get("readOnly"))))
        return out

    def environment(self, manifest: dict) -> dict[str, str]:
        """The container's environment as the kubelet sets it (the API's, when there is one)."""
        if self.api is not None and hasattr(self.api, "pod_environment"):
            return {**self.api.pod_environment(manifest), **self.env}
        env = dict(self.env)
        for var in manifest["spec"]["containers"][0].get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
                data = self.secrets.get(ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"CreateContainerConfigError: secret {ref['name']} key {ref['key']} not found")
                env[var["name"]] = data[ref["key"]]
            elif fieldref := (var.get("valueFrom") or {}).get("fieldRef"):
                meta = manifest["metadata"]
                env[var["name"]] = {"metadata.name": meta["name"], "metadata.uid": meta.get("uid", ""),
                                    "metadata.namespace": meta["namespace"]}[fieldref["fieldPath"]]
        return env

    def start_pod(self, manifest: dict, log: Path, host_dirs: dict[str, Path] | None = None) -> subprocess.Popen:
        """Run a pod manifest through the runtime (kube.py's `on_pod` for the TrainJobs' pods)."""
        spec, meta = manifest["spec"], manifest["metadata"]
        context = {**(spec.get("securityContext") or {}), **(spec["containers"][0].get("securityContext") or {})}
        container = spec["containers"][0]
        pod = pods.Pod(name=meta["name"], namespace=meta["namespace"], labels=dict(meta.get("labels") or {}),
                       command=list(container.get("command") or []) + list(container.get("args") or []),
                       env=self.environment(manifest), volumes=self.volumes(manifest, host_dirs),
                       service_account=(spec.get("serviceAccountName") or "default")
                       if spec.get("automountServiceAccountToken", True) else None,
                       run_as_user=context.get("runAsUser"), run_as_group=context.get("runAsGroup"),
                       fs_group=(spec.get("securityContext") or {}).get("fsGroup"),
                       workdir=container.get("workingDir") or "/")
        if self.admit is not None:
            pod = self.admit(pod)
        if self.network is not None:
            pod.hosts = self.network.attach(pod)
        pod.hosts = {**pod.hosts, **self._peer_records(manifest)}
        return self.runtime.start(pod, log)

    def _peer_records(self, manifest: dict) -> dict[str, str]:
        """The DNS records of the pod's Job's pods under their headless Service (JobSet's `subdomain`: every pod of
        the JobSet is `<job>-<index>.<subdomain>`, kubernetes-sigs/jobset pkg/controllers/jobset_controller.go
        with enableDNSHostnames), so the nodes of a TrainJob find node 0 by the name Trainer's torch plugin gives
        as PET_MASTER_ADDR. The pods share this machine's loopback: every record is 127.0.0.1."""
        spec, meta = manifest["spec"], manifest["metadata"]
        subdomain, job = spec.get("subdomain"), (meta.get("labels") or {}).get("batch.kubernetes.io/job-name")
        if not subdomain or not job or self.api is None:
            return {}
        found = self.api.get("jobs", meta["namespace"], job, group="batch") or {}
        records = {}
        for index in range(int((found.get("spec") or {}).get("completions", 1))):
            for suffix in ("", f".{meta['namespace']}", f".{meta['namespace']}.svc",
                           f".{meta['namespace']}.svc.cluster.local"):
                records[f"{job}-{index}.{subdomain}{suffix}"] = "127.0.0.1"
        return records


# ---------------------------------------------------------------------------------------------------------------
# One task: pod, downloads, run, uploads


def _platform(ir_platform: dict, executor_label: str) -> dict:
    config = ((ir_platform.get("deploymentSpec") or {}).get("executors") or {}).get(executor_label) or {}
    unknown = set(config) - PLATFORM_KEYS
    if unknown:
        raise ValueError(f"{executor_label}: Kubernetes platform config {sorted(unknown)} is not emulated")
    return config


def _dns_name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:63].strip("-")


class _Run:
    """The state of one pipeline run on the cluster: its name, workspace claim and tasks."""

    def __init__(self, cluster: KFPCluster, platform: dict, name: str):
        self.cluster, self.platform, self.name = cluster, platform, name
        self.claim = f"{name}-{WORKSPACE_VOLUME}"
        self.workspace = cluster.add_claim(cluster.namespace, self.claim)
        api = cluster.api
        if api is not None and hasattr(api, "add") and not (  # the Argo Workflow that runs the pods, once
                hasattr(api, "get") and api.get("workflows", cluster.namespace, name, "argoproj.io")):
            api.add({"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                             "metadata": {"name": name, "namespace": cluster.namespace, "uid": str(uuid.uuid4())}})
        self.workspace_root = ""  # kfp.local's host path for the placeholder, replaced by the mount path
        self.attempts: dict[str, int] = {}

    # --- the importer (component/importer_launcher.go)
    def run_importer(self, pipeline_resource_name, component_name, component_spec, executor_spec, arguments,
                     pipeline_root, unique_pipeline_id):
        from google.protobuf import json_format
        from kfp.local import executor_input_utils, importer_handler, status

        executor_input = executor_input_utils.construct_executor_input(
            component_spec=component_spec, arguments=arguments, task_root="", block_input_artifact=True)
        uri = importer_handler.get_importer_uri(importer_spec=executor_spec.importer, executor_input=executor_input)
        metadata = json_format.MessageToDict(executor_spec.importer.metadata)
        cls = importer_handler.get_artifact_class_from_schema_title(executor_spec.importer.type_schema.schema_title)
        if executor_spec.importer.download_to_workspace:
            if not uri.startswith("s3://"):  # objectstore.ParseProviderFromPath
                print(f"importer {component_name}: no provider scheme found in artifact URI: {uri}", flush=True)
                return {}, status.Status.FAILURE
            dest = self.workspace / local_workspace_path_for_uri(uri).removeprefix(WORKSPACE_MOUNT + "/")
            self.cluster.store.fetch(uri, dest)
            metadata["_kfp_workspace"] = True  # driver/resolve.go setWorkspaceFlag, on every consumer's input
        return {"artifact": cls(name="artifact", uri=uri, metadata=metadata)}, status.Status.SUCCESS

    # --- a container task (the driver, the pod, the launcher)
    def run_task(self, pipeline_resource_name, component_name, component_spec, executor_spec, arguments,
                 pipeline_root, runner, raise_on_error, block_input_artifact, unique_pipeline_id):
        from kfp.local import executor_input_utils, executor_output_utils, placeholder_utils, status

        task = executor_input_utils.get_local_task_resource_name(component_name)
        task_root = Path(executor_input_utils.construct_local_task_root(pipeline_root, pipeline_resource_name, task))
        executor_input = executor_input_utils.construct_executor_input(
            component_spec=component_spec, arguments=arguments, task_root=str(task_root), block_input_artifact=False)
        local_input = executor_input_utils.executor_input_to_dict(executor_input, component_spec)
        pod_input = copy.deepcopy(local_input)
        store = self.cluster.store
        downloads: list[tuple[str, str]] = []  # (URI, path in the pod)
        for artifacts in (pod_input.get("inputs") or {}).get("artifacts", {}).values():
            for artifact in artifacts.get("artifacts") or []:
                uri = artifact["uri"] if artifact["uri"].startswith("s3://") else store.uri(artifact["uri"])
                if uri is None:
                    raise ValueError(f"{task}: input artifact {artifact['uri']} is in no bucket of the object store")
                artifact["uri"] = uri
                if (artifact.get("metadata") or {}).get("_kfp_workspace") is not True:
                    downloads.append((uri, local_path_for_uri(uri)))
        uploads: list[tuple[str, Path]] = []  # (path in the pod, local path)
        for artifacts in (pod_input.get("outputs") or {}).get("artifacts", {}).values():
            for artifact in artifacts.get("artifacts") or []:
                local = artifact["uri"]
                artifact["uri"] = store.uri(local)
                uploads.append((local_path_for_uri(artifact["uri"]), Path(local)))
        pod_output_file = local_path_for_uri(store.uri(task_root)) + "/output_metadata.json"
        pod_input["outputs"]["outputFile"] = pod_output_file
        for name, param in (pod_input["outputs"].get("parameters") or {}).items():
            param["outputFile"] = f"{OUTPUT_PARAMETERS}/{name}"
        container = executor_spec.container
        workspace = needs_workspace_mount(pod_input)  # before kfp.local resolves the placeholders in place
        command = placeholder_utils.replace_placeholders(
            full_command=list(container.command) + list(container.args), executor_input_dict=pod_input,
            pipeline_resource_name=pipeline_resource_name, task_resource_name=task, pipeline_root=pipeline_root,
            unique_pipeline_id=unique_pipeline_id)
        if self.workspace_root:  # kfp.local resolves the placeholder to its host path: the pod sees the mount
            command = [c.replace(self.workspace_root, WORKSPACE_MOUNT) for c in command]
        config = _platform(self.platform, component_spec.executor_label)
        attempt = self.attempts.get(task, 0)
        self.attempts[task] = attempt + 1
        pod_name = _dns_name(f"{self.name}-{task}-{attempt}")
        manifest = self.manifest(pod_name, task, container, config, workspace, command)
        uid = manifest["spec"]["securityContext"].get("runAsUser")
        scratch = {name: pods.empty_dir(self.cluster.root / "emptydir" / pod_name / name) for name in SCRATCH.values()}
        scratch["kfp-outputs"] = pods.empty_dir(self.cluster.root / "emptydir" / pod_name / "kfp-outputs")
        run = TaskRun(task=task, pod=manifest, log=self.cluster.root / "logs" / f"{pod_name}.log")
        run.log.parent.mkdir(parents=True, exist_ok=True)
        with self.cluster._lock:
            self.cluster.runs.append(run)
        try:
            for uri, path in downloads:  # the launcher, in the pod, before the user's command
                mount = "/" + path.strip("/").split("/")[0]
                store.fetch(uri, scratch[SCRATCH[mount]] / path.removeprefix(mount + "/"), uid)
                run.downloaded.append(uri)
            for path, _ in uploads + [(pod_output_file, None)]:  # prepareOutputFolders, as the pod's user
                mount = "/" + path.strip("/").split("/")[0]
                parent = scratch[SCRATCH[mount]]
                for part in Path(path.removeprefix(mount + "/")).parent.parts:
                    parent = parent / part
                    parent.mkdir(exist_ok=True)
                    if uid is not None:
                        os.chown(parent, uid, uid)
            if self.cluster.api is not None and hasattr(self.cluster.api, "add"):
                manifest = self.cluster.api.add(manifest)
                run.pod = manifest
            process = self.cluster.start_pod(manifest, run.log, scratch)
            run.phase = "Running"
            deadline = float(config.get("activeDeadlineSeconds") or self.cluster.timeout)
            try:
                run.exit_code = process.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                run.exit_code = process.wait()
                with open(run.log, "a") as f:
                    f.write(f"\nDeadlineExceeded: the pod ran longer than {deadline:.0f}s\n")
        except Exception as e:  # the pod never started (a missing Secret, PVC, a refused download)
            with open(run.log, "a") as f:
                f.write(f"\n{type(e).__name__}: {e}\n")
            run.exit_code = -1
        run.phase = "Succeeded" if run.exit_code == 0 else "Failed"
        if self.cluster.api is not None and hasattr(self.cluster.api, "add"):
            self.cluster.api.add({**run.pod, "status": {"phase": run.phase}})
        print(run.log.read_text(errors="replace"), end="", flush=True)  # kfp.local shows a task's output
        if run.exit_code != 0:
            if raise_on_error:
                raise RuntimeError(f"task {task} failed (pod {pod_name}, exit code {run.exit_code})")
            return {}, status.Status.FAILURE
        # the launcher's upload (uploadOutputArtifacts), then the executor output with the local URIs
        for pod_path, local in uploads:
            mount = "/" + pod_path.strip("/").split("/")[0]
            source = scratch[SCRATCH[mount]] / pod_path.removeprefix(mount + "/")
            if source.exists():
                _copy(source, local)
        written = scratch[SCRATCH["/s3"]] / pod_output_file.removeprefix("/s3/")
        output = json.loads(written.read_text()) if written.exists() else {}
        for artifacts in (output.get("artifacts") or {}).values():
            for artifact in artifacts.get("artifacts") or []:
                if artifact.get("uri", "").startswith("s3://"):
                    artifact["uri"] = str(store.local(artifact["uri"]))
        task_root.mkdir(parents=True, exist_ok=True)
        Path(executor_input.outputs.output_file).write_text(json.dumps(output))
        for name, param in executor_input.outputs.parameters.items():
            written_param = scratch["kfp-outputs"] / name
            if written_param.exists():
                shutil.copyfile(written_param, param.output_file)
        outputs = executor_output_utils.get_outputs_for_task(executor_input=executor_input,
                                                              component_spec=component_spec)
        return outputs, status.Status.SUCCESS

    def manifest(self, name: str, task: str, container, config: dict, workspace: bool, command: list[str]) -> dict:
        """The pod as the driver's pod spec patch and Argo make it."""
        labels = {**((config.get("podMetadata") or {}).get("labels") or {}), V2_LABEL: "true",
                  WORKFLOW_LABEL: self.name}
        security = {k: int(v) if k in ("runAsUser", "runAsGroup") else v
                    for k, v in (config.get("securityContext") or {}).items()}
        env = [{"name": e.name, "value": e.value} for e in container.env]
        env += [{"name": "KFP_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "KFP_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "KFP_RETRY_INDEX", "value": str(self.attempts.get(task, 1) - 1)}]
        for entry in config.get("secretAsEnv") or []:
            for m in entry.get("keyToEnv") or []:
                env.append({"name": m["envVar"], "valueFrom": {"secretKeyRef": {
                    "name": entry["secretName"], "key": m["secretKey"], "optional": bool(entry.get("optional"))}}})
        volumes = [{"name": n, "emptyDir": {}} for n in SCRATCH.values()] + [{"name": "kfp-outputs", "emptyDir": {}}]
        mounts = [{"name": n, "mountPath": p} for p, n in SCRATCH.items()]
        mounts.append({"name": "kfp-outputs", "mountPath": OUTPUT_PARAMETERS})  # /tmp of the launcher's container
        for d in config.get("emptyDirMounts") or []:
            volumes.append({"name": d["volumeName"], "emptyDir": {k: d[k] for k in ("medium", "sizeLimit") if k in d}})
            mounts.append({"name": d["volumeName"], "mountPath": d["mountPath"]})
        if workspace:
            volumes.append({"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": self.claim}})
            mounts.append({"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE_MOUNT})
        spec = {"serviceAccountName": self.cluster.service_account or "default", "restartPolicy": "Never",
                "securityContext": security, "volumes": volumes,
                "containers": [{"name": "main", "image": container.image, "command": command, "env": env,
                                "volumeMounts": mounts}]}
        if config.get("nodeSelector"):
            spec["nodeSelector"] = dict(config["nodeSelector"].get("labels") or {})
        if config.get("tolerations"):
            spec["tolerations"] = config["tolerations"]
        if config.get("activeDeadlineSeconds"):
            spec["activeDeadlineSeconds"] = int(config["activeDeadlineSeconds"])
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": self.cluster.namespace,
                                                               "uid": str(uuid.uuid4()), "labels": labels},
                "spec": spec}


# ---------------------------------------------------------------------------------------------------------------
# A pipeline run


@dataclass
class RunResult:
    status: str
    """succeeded or failed."""
    error: str | None
    outputs: dict
    tasks: dict[str, TaskRun]
    """The last attempt of each task, by task name."""
    workspace: Path
    """The directory behind the run's workspace PVC (kept after the run)."""
    store: Path
    name: str


def compiled(spec_or_ir, root: Path) -> Path:
    """An IR file: as given, or compiled from a spec (a name, a path to a spec file, or a Spec)."""
    from pipelines.posttrain import compile_spec
    from pipelines.spec import Spec

    if not isinstance(spec_or_ir, Spec):
        path = Path(str(spec_or_ir))
        if path.is_file() and "deploymentSpec" in path.read_text():
            return path
    return compile_spec(spec_or_ir, root / "pipeline.yaml")


@contextlib.contextmanager
def _dispatch_to(run: _Run):
    """kfp.local's task dispatcher and importer replaced by the run's, for the duration."""
    from kfp.local import importer_handler, task_dispatcher

    saved = task_dispatcher.run_single_task_implementation, importer_handler.run_importer
    task_dispatcher.run_single_task_implementation, importer_handler.run_importer = run.run_task, run.run_importer
    try:
        yield
    finally:
        task_dispatcher.run_single_task_implementation, importer_handler.run_importer = saved


def run_pipeline(spec_or_ir, arguments: dict, cluster: KFPCluster, name: str | None = None) -> RunResult:
    """Run a compiled pipeline (or a spec, compiled first) on the cluster: every task a pod."""
    from kfp import components, local

    ir = compiled(spec_or_ir, cluster.root)
    pipeline_doc, *rest = list(yaml.safe_load_all(ir.read_text()))
    platform = ((rest[0] if rest else {}) or {}).get("platforms", {}).get("kubernetes", {})
    root_uri = pipeline_doc.get("defaultPipelineRoot") or "s3://kfp-artifacts"
    bucket = root_uri.removeprefix("s3://").split("/")[0]
    run = _Run(cluster, platform, name or _dns_name(f"{pipeline_doc['pipelineInfo']['name']}-{uuid.uuid4().hex[:5]}"))
    placeholder_root = cluster.root / "kfp-local-workspace" / run.name  # kfp.local deletes it at the end
    placeholder_root.mkdir(parents=True, exist_ok=True)
    run.workspace_root = str(placeholder_root)
    (cluster.store.root / bucket).mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(cluster.store.root / bucket),
               workspace_root=str(placeholder_root), raise_on_error=True, enable_caching=False)
    pipeline = components.load_component_from_file(str(ir))
    error, outputs = None, {}
    with _dispatch_to(run):
        try:
            task = pipeline(**arguments)
            outputs = dict(getattr(task, "outputs", None) or {})
        except RuntimeError as e:
            error = str(e)
    last: dict[str, TaskRun] = {}
    for r in cluster.runs:
        if r.pod["metadata"]["labels"].get(WORKFLOW_LABEL) == run.name:
            last[r.task] = r
    failed = [t for t, r in last.items() if r.phase != "Succeeded"]
    if failed and not error:
        error = f"task(s) failed: {', '.join(failed)}"
    return RunResult(status="failed" if error else "succeeded", error=error, outputs=dict(outputs), tasks=last,
                     workspace=run.workspace, store=cluster.store.root, name=run.name)


def run_task(ir_path: Path, task: str, cluster: KFPCluster, parameters: dict, artifacts: dict,
             run_name: str = "run") -> tuple[dict, TaskRun | None]:
    """One task of a compiled pipeline (an importer, or a container task as its pod) with the IR's parameters of
    the task (constants, the workspace and run-id placeholders) and `parameters` for the rest; `artifacts`: name →
    dsl artifact (an s3:// URI, or a path in the object store). Returns (outputs, the task's run; None for an
    importer)."""
    from google.protobuf import json_format
    from kfp import local
    from kfp.local import config, placeholder_utils, utils
    from kfp.pipeline_spec import pipeline_spec_pb2

    pipeline_doc, *rest = list(yaml.safe_load_all(Path(ir_path).read_text()))
    platform = ((rest[0] if rest else {}) or {}).get("platforms", {}).get("kubernetes", {})
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    task_spec = next(d.tasks[task] for d in dags if task in d.tasks)
    component_name = task_spec.component_ref.name
    component_spec = spec.components[component_name]
    executor_spec = utils.struct_to_executor_spec(spec.deployment_spec["executors"][component_spec.executor_label])
    run = _Run(cluster, platform, run_name)
    bucket = (pipeline_doc.get("defaultPipelineRoot") or "s3://kfp-artifacts").removeprefix("s3://").split("/")[0]
    job_id = placeholder_utils.make_random_id()
    arguments = {}
    for name, value in task_spec.inputs.parameters.items():
        if value.HasField("runtime_value"):
            constant = json_format.MessageToDict(value.runtime_value.constant)
            arguments[name] = job_id if constant == "{{$.pipeline_job_uuid}}" else constant
    arguments.update(parameters)
    arguments.update(artifacts)
    placeholder_root = cluster.root / "kfp-local-workspace" / run_name
    placeholder_root.mkdir(parents=True, exist_ok=True)
    run.workspace_root = str(placeholder_root)
    config.LocalExecutionConfig(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(
        cluster.store.root / bucket), workspace_root=str(placeholder_root), raise_on_error=False)
    if executor_spec.WhichOneof("spec") == "importer":
        outputs, _ = run.run_importer(run_name, component_name, component_spec, executor_spec, arguments,
                                      str(cluster.store.root / bucket), job_id)
        return outputs, None
    outputs, _ = run.run_task(run_name, component_name, component_spec, executor_spec, arguments,
                              str(cluster.store.root / bucket), None, False, False, job_id)
    return outputs, cluster.runs[-1]
