"""The KFP v2 pipeline of a spec: the spec fixes the DAG's shape, the run fixes its parameters.

    pipeline = build_pipeline(load_spec("cluster"))         # a kfp GraphComponent
    compile_spec("cluster", "pipeline.yaml")                 # IR YAML for the KFP UI or `posttrain submit`

The DAG, in order:

    close-run (exit handler: closes the MLflow parent run as finished or failed, whatever happens inside)
      base-model (importer) → preflight → data-prep → the spec's stages, each after the one before →
      register → If(decision == promote) → promote

Runtime parameters, with the spec's values as defaults and a description each (the KFP UI shows them when a
run is started): base_model, data_sources, <stage>_lr and <stage>_max_steps of every training stage,
tracking_uri and s3_endpoint. Everything else (settings, resources, images, secret names) is fixed at compile
time: change the spec and compile again.

On Kubernetes (kfp-kubernetes), from the spec: each step's image, pull policy and pull secrets; CPU and memory
requests and limits; the accelerator type and count, node selectors and tolerations of the GPU stages; a
memory-backed /dev/shm; a timeout (activeDeadlineSeconds) and retries; pod labels posttrain/spec and
posttrain/stage; MinIO and MLflow credentials as environment variables from the named Secrets only (no
credential is ever a parameter). Training stages keep their checkpoints in the run's workspace (a PVC KFP
creates per run), so a retried step resumes. data_prep is cached (its inputs are the data and the tokenizer);
every other step runs each time.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.data_prep.component import data_prep
from components.dpo.component import dpo
from components.evaluate.component import evaluate
from components.grpo.component import grpo
from components.preflight.component import close_run, preflight
from components.register.component import promote, register
from components.reward_scoring.component import reward_scoring
from components.sft.component import sft
from pipelines.spec import GPU_KINDS, SFT_METHODS, TRAINING, Resources, Spec, Stage, load_spec

SDK_VERSION_LINE = re.compile(r"^sdkVersion: .*\n", re.MULTILINE)
MINIO_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# ---------------------------------------------------------------------------------------------------------------
# Parameters

def pipeline_parameters(spec: Spec) -> list[tuple[str, type, object, str]]:
    """(name, type, default, description) of every runtime parameter of the spec's pipeline."""
    params = [
        ("base_model", str, spec.base_model,
         "The model the first training stage starts from: a Hugging Face directory with safetensors weights "
         "(s3://bucket/key)."),
        ("data_sources", str, json.dumps(spec.data.get("sources", [])),
         "data_prep's sources, a JSON list of {uri, shape, fields, ...} or {task, rows, shape, ...} "
         "(docs/spec.md, key data)."),
    ]
    for stage in spec.stages:
        if stage.stage in TRAINING:
            defaults = spec.runtime_defaults(stage)
            params += [(f"{stage.stage}_lr", float, defaults["lr"], f"Peak learning rate of the {stage.stage} stage."),
                       (f"{stage.stage}_max_steps", int, defaults["max_steps"],
                        f"Optimizer steps of the {stage.stage} stage.")]
    params += [
        ("tracking_uri", str, spec.tracking.uri,
         f"MLflow tracking server (credentials: Secret {spec.storage.mlflow_secret})."),
        ("s3_endpoint", str, spec.storage.s3_endpoint,
         f"S3 (MinIO) endpoint of s3:// URIs (credentials: Secret {spec.storage.minio_secret}); empty: none."),
    ]
    return params


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
    keys = {spec.storage.minio_secret: MINIO_KEYS, spec.storage.mlflow_secret: MLFLOW_KEYS}
    for name in secrets:
        kubernetes.use_secret_as_env(task, name, {k: k for k in keys[name]}, optional=optional_secrets)
    return task


# ---------------------------------------------------------------------------------------------------------------
# The DAG

def _dag(spec: Spec, p: dict) -> None:
    storage, tracking = spec.storage, spec.tracking
    both = (storage.minio_secret, storage.mlflow_secret)
    runtime = spec.images.runtime

    def step_image(stage: Stage) -> str:
        return spec.images.trainer if stage.stage in GPU_KINDS else runtime

    def context(stage: Stage) -> dict:
        return {"stage": stage.stage, "tracking_uri": p["tracking_uri"], "parent_run_id": parent_run_id,
                "s3_endpoint": p["s3_endpoint"]}

    def training(stage: Stage) -> dict:
        return {**context(stage), "workspace": dsl.WORKSPACE_PATH_PLACEHOLDER, "lr": p[f"{stage.stage}_lr"],
                "max_steps": p[f"{stage.stage}_max_steps"], "nproc": max(1, spec.stage_resources(stage).gpus)}

    closing = close_run(tracking_uri=p["tracking_uri"], experiment=tracking.experiment,
                        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    place(closing, spec, "close-run", spec.runtime_resources, runtime, secrets=(storage.mlflow_secret,))
    closing.set_caching_options(False)

    with dsl.ExitHandler(closing, name="posttrain"):
        base = dsl.importer(artifact_uri=p["base_model"], artifact_class=dsl.Model, reimport=False)
        base.set_display_name("base-model")
        root = storage.pipeline_root
        check = preflight(
            base_model=base.output, base_model_uri=p["base_model"], data_sources=p["data_sources"],
            tracking_uri=p["tracking_uri"], experiment=tracking.experiment, s3_endpoint=p["s3_endpoint"],
            buckets=[root.removeprefix("s3://").split("/")[0]] if root.startswith("s3://") else [],
            secrets=list(both), namespace=storage.namespace, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            tags={"posttrain.spec": spec.name, "posttrain.spec_hash": spec.fingerprint(),
                  "posttrain.image.trainer": spec.images.trainer, "posttrain.image.runtime": runtime})
        place(check, spec, "preflight", spec.runtime_resources, runtime, secrets=both, optional_secrets=True)
        check.set_caching_options(False)
        parent_run_id = check.outputs["Output"]

        prep_settings = {k: v for k, v in spec.data.items() if k != "sources"}  # the sources: a parameter
        prep = data_prep(tokenizer=base.output, data_sources=p["data_sources"], settings=json.dumps(prep_settings),
                         s3_endpoint=p["s3_endpoint"]).after(check)
        place(prep, spec, "data_prep", spec.runtime_resources, runtime, secrets=(storage.minio_secret,))
        prep.set_caching_options(True)
        data = prep.outputs["data"]

        model, candidate, trained, pairs, results = base.output, "base", {}, None, None
        for stage in spec.stages:
            kind, settings = stage.stage, json.dumps(stage.settings)
            if kind in SFT_METHODS:
                task = sft(model=model, data=data, settings=settings, **training(stage))
            elif kind == "reward_scoring":
                task = reward_scoring(model=model, data=data, settings=settings, rewards=json.dumps(spec.rewards),
                                      **context(stage))
                pairs = task.outputs["scored"]
            elif kind == "dpo":
                task = dpo(model=model, pairs=pairs or data,
                           pairs_file="pairs.jsonl" if pairs else "preference.train.jsonl", settings=settings,
                           **training(stage))
            elif kind == "grpo":
                task = grpo(model=model, data=data, settings=settings, rewards=json.dumps(spec.rewards),
                            **training(stage))
            elif kind == "evaluate":
                task = evaluate(model=model, base_model=base.output, settings=settings,
                                suites=json.dumps(spec.eval_suites), rewards=json.dumps(spec.rewards),
                                candidate=candidate, workspace=dsl.WORKSPACE_PATH_PLACEHOLDER, **context(stage),
                                **trained)
                results = task.outputs["results"]
            else:  # register, then the promotion gate
                task = register(model=model, eval_results=results, registered_model=tracking.registered_model,
                                promotion=json.dumps(asdict(spec.promotion)), settings=settings, **context(stage))
            place(task, spec, kind, spec.stage_resources(stage), step_image(stage), secrets=both)
            task.set_caching_options(False)
            task.after(prep)
            if kind in TRAINING:
                model = task.outputs["trained_model"]
                candidate, trained[kind] = kind, model
            if kind == "register":
                with dsl.If(task.outputs["Output"] == "promote", name="promotion-gate"):
                    move = promote(registration=task.outputs["registration"], eval_results=results,
                                   promotion=json.dumps(asdict(spec.promotion)), tracking_uri=p["tracking_uri"],
                                   kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
                    place(move, spec, "promote", spec.runtime_resources, runtime, secrets=(storage.mlflow_secret,))
                    move.set_caching_options(False)


def build_pipeline(spec: Spec):
    """The spec's KFP pipeline (a GraphComponent), ready to compile or to run with kfp.local."""
    workspace = dsl.WorkspaceConfig(
        size=spec.storage.workspace_size,
        kubernetes=dsl.KubernetesWorkspaceConfig(
            pvcSpecPatch={"storageClassName": spec.storage.workspace_storage_class}
            if spec.storage.workspace_storage_class else {}))
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
# A KFP cluster: upload, run, schedule, list (kfp.Client; the host from --host, a token from POSTTRAIN_KFP_TOKEN)

def cluster_problems(spec: Spec) -> list[str]:
    """What a cluster cannot read in this spec: local paths and bundled models exist only on this machine."""
    uris = [("base_model", spec.base_model)]
    uris += [(f"data.sources[{i}].uri", s["uri"]) for i, s in enumerate(spec.data.get("sources", [])) if "uri" in s]
    uris += [(f"eval_suites[{i}].data", s["data"]) for i, s in enumerate(spec.eval_suites) if "data" in s]
    return [f"{key}: {uri!r} is not on S3; a cluster run reads s3:// URIs (bundled tasks need no data)"
            for key, uri in uris if not uri.startswith("s3://")]


def kfp_client(host: str, namespace: str | None = None):
    """A kfp.Client for `host`; a bearer token, when the endpoint needs one, comes from POSTTRAIN_KFP_TOKEN."""
    import os
    import warnings

    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, existing_token=os.environ.get("POSTTRAIN_KFP_TOKEN") or None,
                          **({"namespace": namespace} if namespace else {}))


def upload(client, spec: Spec, package: str | Path) -> tuple[str, str]:
    """Upload the compiled pipeline, as a new pipeline or as a new version of the spec's pipeline.

    Returns (pipeline id, version id); the version is named after the spec's hash and the time.
    """
    import time

    pipeline_id = client.get_pipeline_id(spec.name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=spec.name,
                                             description=spec.description or None).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    name = f"{spec.name}-{spec.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}"
    version = client.upload_pipeline_version(str(package), pipeline_version_name=name, pipeline_id=pipeline_id,
                                             description=spec.description or None)
    return pipeline_id, version.pipeline_version_id


def _prepare(spec: Spec, host: str, namespace: str | None, package_dir: str | Path):
    problems = cluster_problems(spec)
    if problems:
        raise ValueError(f"{spec.name} cannot run on a cluster:\n" + "\n".join(f"- {p}" for p in problems))
    client = kfp_client(host, namespace)
    package = compile_spec(spec, Path(package_dir) / f"{spec.name}.yaml")
    pipeline_id, version_id = upload(client, spec, package)
    experiment = client.create_experiment(spec.tracking.experiment, namespace=namespace)
    return client, pipeline_id, version_id, experiment.experiment_id


def submit(spec: Spec, host: str, *, params: dict | None = None, namespace: str | None = None,
           package_dir: str | Path = ".posttrain/compiled") -> dict:
    """Upload the spec's pipeline (or a new version of it) and start a run on it; returns the ids."""
    import time

    client, pipeline_id, version_id, experiment_id = _prepare(spec, host, namespace, package_dir)
    run = client.run_pipeline(experiment_id, f"{spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                              pipeline_id=pipeline_id, version_id=version_id, params=params or {})
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id,
            "run_id": run.run_id}


def schedule(spec: Spec, host: str, *, cron: str | None = None, max_concurrency: int | None = None,
             catchup: bool | None = None, params: dict | None = None, namespace: str | None = None,
             package_dir: str | Path = ".posttrain/compiled") -> dict:
    """Upload the spec's pipeline (or a new version: the latest) and create a recurring run on that version.

    The cron expression, concurrency and catch-up come from the arguments, else from the spec's `schedule`;
    by default at most one run at a time and no catch-up of missed runs.
    """
    from pipelines.spec import Schedule

    if cron is None and spec.schedule is None:
        raise ValueError(f"{spec.name}: no schedule: give --cron or a `schedule` in the spec")
    base = spec.schedule or Schedule(cron=cron)
    rule = Schedule(cron=cron or base.cron, max_concurrency=max_concurrency or base.max_concurrency,
                    catchup=base.catchup if catchup is None else catchup)
    client, pipeline_id, version_id, experiment_id = _prepare(spec, host, namespace, package_dir)
    job = client.create_recurring_run(experiment_id, f"{spec.name} ({rule.cron})", cron_expression=rule.cron,
                                      max_concurrency=rule.max_concurrency, no_catchup=not rule.catchup,
                                      pipeline_id=pipeline_id, version_id=version_id, params=params or {})
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id,
            "recurring_run_id": job.recurring_run_id, "cron": rule.cron, "max_concurrency": rule.max_concurrency,
            "catchup": rule.catchup}


def list_runs(host: str, *, experiment: str | None = None, namespace: str | None = None,
              limit: int = 20) -> list[dict]:
    """The latest runs (of one experiment, when named): id, name, state, created."""
    client = kfp_client(host, namespace)
    experiment_id = client.get_experiment(experiment_name=experiment, namespace=namespace).experiment_id \
        if experiment else None
    runs = client.list_runs(page_size=limit, sort_by="created_at desc", experiment_id=experiment_id,
                            namespace=namespace).runs or []
    return [{"run_id": r.run_id, "name": r.display_name, "state": r.state,
             "created_at": r.created_at.isoformat() if r.created_at else ""} for r in runs]


def parse_params(spec: Spec, items: list[str]) -> dict:
    """NAME=VALUE pairs as typed pipeline arguments; an unknown name or a bad value names what is allowed."""
    types = {name: kind for name, kind, _, _ in pipeline_parameters(spec)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--param {item!r} is invalid: NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            out[name] = types[name](value)
        except ValueError:
            raise ValueError(f"--param {name}={value!r} is invalid: {types[name].__name__} expected") from None
        if types[name] in (int, float) and not (math.isfinite(out[name]) and out[name] > 0):  # lr, max_steps
            kind = "a positive integer" if types[name] is int else "a positive number"
            raise ValueError(f"--param {name}={value!r} is invalid: {kind}")
    return out
