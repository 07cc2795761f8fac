"""The KFP v2 pipeline of a spec: the spec fixes the DAG's shape, the run fixes its parameters.

    pipeline = build_pipeline(load_spec("cluster"))         # a kfp GraphComponent
    compile_spec("cluster", "pipeline.yaml")                 # IR YAML for the KFP UI or `posttrain submit`

The DAG, in order:

    close-run (exit handler: closes the MLflow parent run as finished or failed, whatever happens inside)
      base-model (importer) → preflight → the data step → the spec's stages, each after the one before →
      If(the decision of the stage with a gate == PROMOTE) → its gate (components.stages: Stage.gate) → the
      stages that follow the gate (Stage.after_gate: deploy)

Runtime parameters, with the spec's values as defaults and a description each (the KFP UI shows them when a
run is started): base_model, data_sources, <stage>_lr and <stage>_max_steps of every training stage,
<stage>_gpus_per_node of every training or sampling stage with accelerators (one process each) and <stage>_nodes
of a training stage that may span nodes (bounded by the spec's resources: the step refuses more), tracking_uri
and s3_endpoint. Everything else (settings,
resources, images, secret names) is fixed at compile time: change the spec and compile again.

On Kubernetes (kfp-kubernetes), from the spec: each step's image, pull policy and pull secrets; CPU and memory
requests and limits; the accelerator type and count, node selectors and tolerations of the GPU stages; a
memory-backed /dev/shm; a timeout (activeDeadlineSeconds) and retries; pod labels posttrain/spec,
posttrain/stage and sidecar.istio.io/inject=false (and kueue.x-k8s.io/queue-name for resources with a `queue`);
the images' non-root user; MinIO and MLflow credentials as environment variables from the named Secrets only
(no credential is ever a parameter). Training stages keep their checkpoints in the run's workspace (a PVC KFP
creates per run, with the spec's access modes, ReadWriteOnce by default), so a retried step resumes. The data step
is cached (its parameters: the sources, the settings, and preflight's fingerprint of the data's and the
tokenizer's bytes, so a scheduled run re-runs it when the data under the same URIs change); every other step
runs each time. preflight and the data step read the base model by its URI and fetch only its config and tokenizer
(and preflight the safetensors headers). Models stay in the run's workspace and never go through a step's pod: the
importer downloads the base model into the workspace once (download_to_workspace), each training stage writes its
model to <workspace>/<stage>/model and its output artifact only points there (components/step.py), so no launcher
pod downloads or uploads weights, and a TrainJob's nodes (which mount the workspace, not the step pod's scratch
volume) read every input there. (KFP's IR has no ephemeral-storage request, its ResourceSpec being cpu, memory and
accelerator: what the steps keep in their emptyDir scratch volumes are data files, eval results and pointers.)
A stage that can run on several nodes (its registry entry says multi_node; the spec check refuses max_nodes > 1 for
any other) and whose resources allow them (max_nodes > 1) runs as a Kubeflow Trainer TrainJob that its
step creates, watches and deletes (components/trainjob.py); the step itself is then a small pod of
runtime_resources with the stage's timeout and retries.
Uploading, running and scheduling: pipelines/kfp_client.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.preflight.component import close_run, preflight
from components.stages import PROMOTE, check_contract, data_stage
from components.stages import get as get_stage
from pipelines.spec import Resources, Spec, load_spec
from pipelines.spec import Stage as StageSpec

SDK_VERSION_LINE = re.compile(r"^sdkVersion: .*\n", re.MULTILINE)
MINIO_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ISTIO_INJECT_LABEL = "sidecar.istio.io/inject"
IMAGE_UID = 10001
"""The non-root user (and group) of the trainer and runtime images (images/*/Dockerfile: USER 10001:10001)."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters

def pipeline_parameters(spec: Spec) -> list[tuple[str, type, object, str]]:
    """(name, type, default, description) of every runtime parameter of the spec's pipeline."""
    params = [
        ("base_model", str, spec.base_model,
         "The model the first training stage starts from: a Hugging Face directory with safetensors weights "
         "(s3://bucket/key)."),
        ("data_sources", str, json.dumps(spec.data.get("sources", [])),
         "The data step's sources, a JSON list of {uri, shape, fields, ...} or {task, rows, shape, ...} "
         "(docs/spec.md, key data)."),
    ]
    for stage in spec.stages:
        kind = get_stage(stage.stage)
        if kind.kind == "train":
            defaults = spec.runtime_defaults(stage)
            params += [(f"{stage.name}_lr", float, defaults["lr"], f"Peak learning rate of the {stage.name} stage."),
                       (f"{stage.name}_max_steps", int, defaults["max_steps"],
                        f"Optimizer steps of the {stage.name} stage.")]
        if kind.scaled:
            params += scale_parameters(stage.name, spec.stage_resources(stage))
    params += [
        ("tracking_uri", str, spec.tracking.uri,
         f"MLflow tracking server (credentials: Secret {spec.storage.mlflow_secret})."),
        ("s3_endpoint", str, spec.storage.s3_endpoint,
         f"S3 (MinIO) endpoint of s3:// URIs (credentials: Secret {spec.storage.minio_secret}); empty: none."),
    ]
    return params


def scale_parameters(stage: str, resources: Resources) -> list[tuple[str, type, object, str]]:
    """<stage>_nodes (when the spec lets the stage span nodes) and <stage>_gpus_per_node (when it has
    accelerators), with their bounds in the description: the step refuses a value outside them."""
    params = []
    if resources.multi_node:
        params.append((f"{stage}_nodes", int, resources.nodes,
                       f"Nodes of the {stage} stage's TrainJob, 1 to {resources.most_nodes}."))
    if resources.gpus:
        params.append((f"{stage}_gpus_per_node", int, resources.gpus,
                       f"Accelerators (torchrun processes) per node of the {stage} stage, 1 to {resources.gpus}."))
    return params


def scale_bounds(spec: Spec) -> dict[str, tuple[int, int]]:
    """Each scale parameter's (lowest, highest) value."""
    bounds = {}
    for stage in spec.stages:
        if get_stage(stage.stage).scaled:
            resources = spec.stage_resources(stage)
            bounds |= {f"{stage.name}_nodes": (1, resources.most_nodes), f"{stage.name}_gpus_per_node":
                       (1, resources.gpus)}
    return bounds


def launch_settings(spec: Spec, stage: StageSpec) -> dict:
    """How a training or sampling step launches its stage (components.step): the bounds of its scale and, when the
    stage may span nodes, the TrainJob's placement (components.trainjob.Placement) from the stage's resources."""
    from components.trainjob import Placement

    resources = spec.stage_resources(stage)
    launch = {"max_nodes": resources.most_nodes, "max_nproc": max(1, resources.gpus)}
    if resources.multi_node:
        keys = {spec.storage.minio_secret: list(MINIO_KEYS), spec.storage.mlflow_secret: list(MLFLOW_KEYS)}
        tolerations = [{k: v for k, v in (("key", t.key), ("operator", t.operator), ("value", t.value),
                                          ("effect", t.effect), ("tolerationSeconds", t.toleration_seconds)) if v}
                       for t in resources.tolerations]
        launch["trainjob"] = Placement(
            namespace=spec.storage.namespace, runtime=resources.training_runtime, image=spec.images.trainer,
            spec_name=spec.name, accelerator=resources.accelerator, cpu=resources.cpu, memory=resources.memory,
            shm_size=resources.shm_size, node_selector=dict(resources.node_selector), tolerations=tolerations,
            secrets=keys, pull_secrets=list(spec.images.pull_secrets), queue=resources.queue,
            timeout=resources.timeout).to_json()
    return launch


def _function_with_signature(name: str, doc: str, params, body):
    """A function whose signature and docstring are `params`: KFP reads parameters, types, defaults and
    descriptions from them."""
    names = [p[0] for p in params]

    def pipeline_fn(*args):
        return body(dict(zip(names, args)))

    pipeline_fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=t)
         for n, t, d, _ in params])
    pipeline_fn.__doc__ = doc + "\n\nArgs:\n" + "".join(f"    {n}: {desc}\n" for n, _, _, desc in params)
    pipeline_fn.__name__ = name.replace("-", "_")
    return pipeline_fn


# ---------------------------------------------------------------------------------------------------------------
# Placement: where and how each step runs on Kubernetes

def place(task, spec: Spec, stage: str, resources: Resources, image: str, *, secrets: tuple[str, ...],
          optional_secrets: bool = False):
    """Image, resources, scheduling, timeout, retries, labels and Secrets of one step, from the spec."""
    task.set_display_name(stage)
    task.set_container_image(image)
    kubernetes.set_image_pull_policy(task, spec.images.pull_policy)
    if spec.images.pull_secrets:
        kubernetes.set_image_pull_secrets(task, spec.images.pull_secrets)
    if resources.cpu:
        task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
    if resources.memory:
        task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if resources.accelerator:
        task.set_accelerator_type(resources.accelerator).set_accelerator_limit(resources.gpus)
    for key, value in sorted(resources.node_selector.items()):
        kubernetes.add_node_selector(task, key, value)
    for t in resources.tolerations:
        kubernetes.add_toleration(task, key=t.key or None, operator=t.operator, value=t.value or None,
                                  effect=t.effect or None, toleration_seconds=t.toleration_seconds)
    if resources.shm_size:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=resources.shm_size)
    if resources.timeout:
        kubernetes.set_timeout(task, resources.timeout)
    if resources.retries:
        task.set_retry(resources.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    kubernetes.add_pod_label(task, "posttrain/spec", spec.name)
    kubernetes.add_pod_label(task, "posttrain/stage", stage)
    # no Istio sidecar in a Kubeflow profile namespace: MinIO and MLflow have none either (k8s/README.md)
    kubernetes.add_pod_label(task, ISTIO_INJECT_LABEL, "false")
    if resources.queue:  # Kueue's pod integration admits a pod by this label (k8s/overlays/kueue)
        kubernetes.add_pod_label(task, KUEUE_QUEUE_LABEL, resources.queue)
    # the images' user (images/*/Dockerfile); KFP ≥ 2.17 adds no privilege escalation, all capabilities
    # dropped and RuntimeDefault seccomp to every step's container (k8s/README.md, "Pod security")
    kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
    keys = {spec.storage.minio_secret: MINIO_KEYS, spec.storage.mlflow_secret: MLFLOW_KEYS}
    for name in secrets:
        kubernetes.use_secret_as_env(task, name, {k: k for k in keys[name]}, optional=optional_secrets)
    return task


# ---------------------------------------------------------------------------------------------------------------
# The DAG: preflight, then the data step and the spec's stages, each wired by the registry (components.stages)

def lineage(stages: list[StageSpec]) -> dict[str, str]:
    """Each stage that made a model → the model it started from: `start_from` (an earlier stage's name, or `base`:
    the base model), else the latest model before it (`base` for the first)."""
    out, latest = {}, "base"
    for st in stages:
        if get_stage(st.stage).makes_model:
            out[st.name] = st.start_from or latest
            latest = st.name
    return out


def _step_parameters(spec: Spec, p: dict, opened, kind: StageSpec, done: list[StageSpec]) -> dict:
    """What a step may be given by parameter name (components.stages.PARAMETERS); its component takes the
    ones it declares. `opened`: the preflight task (the MLflow parent run, the data's fingerprint); `done`: the
    stages before it."""
    parents = lineage(done)
    trained = list(parents)  # in order: the last one made the policy
    values = {"stage": kind.name, "kind": kind.stage, "settings": json.dumps(kind.settings),
              "tracking_uri": p["tracking_uri"], "s3_endpoint": p["s3_endpoint"],
              "parent_run_id": opened.outputs["parent_run_id"],
              "sources_digest": opened.outputs["sources_digest"], "base_model": p["base_model"],
              "workspace": dsl.WORKSPACE_PATH_PLACEHOLDER, "data_sources": p["data_sources"],
              "rewards": json.dumps(spec.rewards), "suites": json.dumps(spec.eval_suites),
              "registered_model": spec.tracking.registered_model, "candidate": trained[-1] if trained else "base",
              "lineage": json.dumps(parents), "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "spec_name": spec.name,
              "namespace": spec.storage.namespace}
    if spec.promotion is not None:
        values["promotion"] = json.dumps(asdict(spec.promotion))
    stage = get_stage(kind.stage)
    if stage.kind == "train":
        values.update(lr=p[f"{kind.name}_lr"], max_steps=p[f"{kind.name}_max_steps"])
    if stage.scaled:
        values.update(nproc=p.get(f"{kind.name}_gpus_per_node", 1),
                      launch=json.dumps(launch_settings(spec, kind), sort_keys=True))
    if stage.multi_node:
        values["nodes"] = p.get(f"{kind.name}_nodes", 1)
    return values


def _add_step(spec: Spec, kind: StageSpec, provided: dict, parameters: dict, policy: tuple | None = None):
    """One step of the stage: its inputs from what earlier steps provide (the model it starts from: `policy`,
    when it is not the latest), its parameters by name; what it provides is added to `provided`."""
    stage = get_stage(kind.stage)
    check_contract(stage)  # the component takes what the stage is given: no parameter is silently dropped
    component = stage.component_fn()
    inputs = provided if policy is None else {**provided, "policy": policy, "trained_policy": policy}
    arguments = {}
    for name, inp in stage.inputs.items():
        if inp.optional and inp.feed not in inputs:
            continue  # the component's parameter keeps its default, None
        source, output, file = inputs[inp.feed]
        arguments[name] = source.outputs[output] if output else source.output
        if inp.file_param:
            arguments[inp.file_param] = file
    declared = component.component_spec.inputs or {}
    for name in declared:
        if name not in arguments and name in parameters:
            arguments[name] = parameters[name]
    task = component(**arguments)
    image = spec.images.trainer if stage.kind in ("train", "sample") else spec.images.runtime
    # a step that reaches S3 (it takes s3_endpoint) gets MinIO's credentials, one that talks to MLflow MLflow's
    secrets = tuple(secret for secret, used in ((spec.storage.minio_secret, "s3_endpoint" in declared),
                                                (spec.storage.mlflow_secret, "tracking_uri" in declared)) if used)
    resources = spec.stage_resources(kind)
    if resources.multi_node:  # the step launches a TrainJob: a small pod, as long-lived and retried as the stage
        resources = dataclasses.replace(spec.runtime_resources, timeout=resources.timeout, retries=resources.retries)
    place(task, spec, kind.name, resources, image, secrets=secrets)
    task.set_caching_options(stage.cached)
    for name, out in stage.outputs.items():
        for feed in out.provides:
            provided[feed] = (task, name, out.files.get(feed))
    return task


def _dag(spec: Spec, p: dict) -> None:
    storage, tracking = spec.storage, spec.tracking
    both = (storage.minio_secret, storage.mlflow_secret)
    runtime = spec.images.runtime

    closing = close_run(tracking_uri=p["tracking_uri"], experiment=tracking.experiment,
                        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    place(closing, spec, "close-run", spec.runtime_resources, runtime, secrets=(storage.mlflow_secret,))
    closing.set_caching_options(False)

    with dsl.ExitHandler(closing, name="posttrain"):
        # into the run's workspace once (KFP ≥ 2.15): every step that reads it, and every node of a TrainJob, finds it
        # there; KFP's launcher does not download a workspace artifact into the step's pod (launcher_v2.go)
        base = dsl.importer(artifact_uri=p["base_model"], artifact_class=dsl.Model, reimport=False,
                            download_to_workspace=True)
        base.set_display_name("base-model")
        root = storage.pipeline_root
        check = preflight(
            base_model_uri=p["base_model"], data_sources=p["data_sources"],
            tracking_uri=p["tracking_uri"], experiment=tracking.experiment, s3_endpoint=p["s3_endpoint"],
            buckets=[root.removeprefix("s3://").split("/")[0]] if root.startswith("s3://") else [],
            secrets=list(both), namespace=storage.namespace, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            tags={"posttrain.spec": spec.name, "posttrain.spec_hash": spec.fingerprint(),
                  "posttrain.image.trainer": spec.images.trainer, "posttrain.image.runtime": runtime})
        place(check, spec, "preflight", spec.runtime_resources, runtime, secrets=both, optional_secrets=True)
        check.set_caching_options(False)

        provided = {"policy": (base, None, None), "base": (base, None, None)}
        prep_settings = {k: v for k, v in spec.data.items() if k != "sources"}  # the sources: a parameter
        prep_kind = StageSpec(stage=data_stage().name, settings=prep_settings)
        prep = _add_step(spec, prep_kind, provided, _step_parameters(spec, p, check, prep_kind, [])).after(check)
        models = {}  # the provider of each model made so far, by stage name (start_from)
        gated = []  # (stage, its task, the feeds and parameters it was given): the steps with a gate
        followers = []  # (stage spec, parameters): the steps that run after the gate (Stage.after_gate)
        for i, kind in enumerate(spec.stages):
            values = _step_parameters(spec, p, check, kind, spec.stages[:i])
            if get_stage(kind.stage).after_gate:
                followers.append((kind, values))
                continue
            start = provided["base"] if kind.start_from == "base" else models.get(kind.start_from)
            inputs = dict(provided)
            task = _add_step(spec, kind, provided, values, policy=start).after(prep)
            if "lineage" in (task.component_spec.inputs or {}):  # it reads every earlier model from the workspace
                for source, _, _ in models.values():
                    task.after(source)
            stage = get_stage(kind.stage)
            if stage.makes_model:
                models[kind.name] = provided["policy"]
            if stage.gate:
                gated.append((stage, task, inputs, values))
        for j, (stage, task, inputs, values) in enumerate(gated):
            _add_gate(spec, stage, task, inputs, values, provided, followers if j == len(gated) - 1 else [])


def _add_gate(spec: Spec, stage, task, inputs: dict, values: dict, provided: dict, followers: list) -> None:
    """The stage's gate (Stage.gate), run when its step returns PROMOTE: its artifact inputs are the step's outputs
    and the step's inputs of the same names, its parameters are given by name like the step's. `followers` (the
    stages after_gate, with their parameters) run after it, in its condition."""
    gate = stage.component_fn(stage.gate)
    declared = gate.component_spec.inputs or {}
    arguments = {}
    for name in declared:
        if name in stage.outputs:
            arguments[name] = task.outputs[name]
        elif name in stage.inputs and stage.inputs[name].feed in inputs:
            source, output, _ = inputs[stage.inputs[name].feed]
            arguments[name] = source.outputs[output] if output else source.output
        elif name in values:
            arguments[name] = values[name]
    with dsl.If(task.outputs["Output"] == PROMOTE, name="promotion-gate"):
        move = gate(**arguments)
        tracked = "tracking_uri" in declared
        place(move, spec, stage.gate, spec.runtime_resources, spec.images.runtime,
              secrets=(spec.storage.mlflow_secret,) if tracked else (spec.storage.minio_secret,))
        move.set_caching_options(False)
        for kind, given in followers:
            _add_step(spec, kind, provided, given).after(move)


def workspace_pvc_patch(spec: Spec) -> dict:
    """The workspace PVC's spec patch: access modes always (KFP ≥ 2.15 refuses a workspace without them), the
    StorageClass when the spec names one (else the cluster's default)."""
    patch = {"accessModes": list(spec.storage.workspace_access_modes)}
    if spec.storage.workspace_storage_class:
        patch["storageClassName"] = spec.storage.workspace_storage_class
    return patch


def build_pipeline(spec: Spec):
    """The spec's KFP pipeline (a GraphComponent), ready to compile or to run with kfp.local."""
    workspace = dsl.WorkspaceConfig(size=spec.storage.workspace_size,
                                    kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=workspace_pvc_patch(spec)))
    doc = spec.description or f"The {spec.name} post-training workflow."
    fn = _function_with_signature(spec.name, doc, pipeline_parameters(spec), lambda p: _dag(spec, p))
    return dsl.pipeline(name=spec.name, description=doc, pipeline_root=spec.storage.pipeline_root,
                        pipeline_config=dsl.PipelineConfig(workspace=workspace))(fn)


def compile_spec(spec_or_path: Spec | str | Path, out_yaml: str | Path) -> Path:
    """Compile a spec (or a spec file, or a bundled spec's name) to KFP IR YAML at `out_yaml`."""
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    out = Path(out_yaml)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(spec), str(out))
    return out


def without_sdk_version(ir_yaml: str) -> str:
    """The IR with its `sdkVersion` line removed, so two SDK releases that compile alike compare equal."""
    return SDK_VERSION_LINE.sub("", ir_yaml)


# ---------------------------------------------------------------------------------------------------------------
# Run parameters from the command line (uploading, running and scheduling on a cluster: pipelines/kfp_client.py)

def parse_params(spec: Spec, items: list[str]) -> dict:
    """NAME=VALUE pairs as typed pipeline arguments; an unknown name or a bad value names what is allowed."""
    types = {name: kind for name, kind, _, _ in pipeline_parameters(spec)}
    bounds = scale_bounds(spec)
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--param {item!r} is invalid: NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            out[name] = types[name](value)
        except ValueError:
            raise ValueError(f"--param {name}={value!r} is invalid: {types[name].__name__} expected") from None
        if name in bounds and not bounds[name][0] <= out[name] <= bounds[name][1]:
            low, high = bounds[name]
            raise ValueError(f"--param {name}={value!r} is invalid: between {low} and {high} (the spec's resources)")
        if types[name] in (int, float) and not (math.isfinite(out[name]) and out[name] > 0):  # lr, max_steps
            kind = "a positive integer" if types[name] is int else "a positive number"
            raise ValueError(f"--param {name}={value!r} is invalid: {kind}")
        if name == "data_sources":
            check_data_sources(value, spec)
    return out


def check_data_sources(value: str, spec: Spec) -> None:
    """The data_sources parameter, checked before anything runs: a JSON list of sources, each valid for the config of
    the data step (components.stages.data_stage), with the spec's other `data` settings."""
    from pipelines.spec import validate_settings

    try:
        sources = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--param data_sources={value!r} is invalid: not JSON ({e.msg} at column {e.colno}); a "
                         'JSON list of sources, e.g. [{"uri": "s3://bucket/rows/", "shape": "prompts"}]') from None
    if not isinstance(sources, list) or not sources:
        raise ValueError(f"--param data_sources={value!r} is invalid: a non-empty JSON list of sources")
    settings = {**spec.data, "sources": sources}
    validate_settings(data_stage(), settings, "--param data_sources", "")
