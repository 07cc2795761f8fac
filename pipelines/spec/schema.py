"""The spec's schema: one dataclass per part, each field documented (its docstring is its entry in
docs/spec.md) and each part validated on its own in __post_init__ (components.config.require)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from components.config import ConfigError, Invalid
from components.images import RUNTIME_IMAGE, TRAINER_IMAGE
from components.stages import STAGES, spec_kinds
from components.stages import get as get_stage

RUNTIME_KEYS = {"lr": (float, "a positive number"), "max_steps": (int, "a positive integer")}
"""Keys of the `train` part of every training stage that become pipeline parameters (`<stage>_lr`,
`<stage>_max_steps`)."""

BUNDLED_MODELS = ("bundled:tiny",)
"""Base models built on the machine that runs the pipeline locally instead of read from a URI."""
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
STEP_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?$")


class SpecError(ConfigError):
    """A spec is invalid: the message names the file, the key's path, the bad value and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# The spec's parts. Each field's docstring is its entry in docs/spec.md.

@dataclass(kw_only=True)
class Toleration:
    """A Kubernetes toleration, so a step can run on a tainted node pool (e.g. GPU nodes)."""

    key: str = ""
    """The taint key; empty with operator Exists tolerates every taint."""
    operator: str = "Equal"
    """Equal (the taint's value must equal `value`) or Exists (any value)."""
    value: str = ""
    """The taint value (operator Equal)."""
    effect: str = ""
    """NoSchedule, PreferNoSchedule, NoExecute, or empty for all effects."""
    toleration_seconds: int | None = None
    """NoExecute only: how long the pod stays on a node after the taint appears (default: forever)."""

    def __post_init__(self):
        if self.operator not in ("Equal", "Exists"):
            raise Invalid("operator", self.operator, "Equal or Exists")
        if self.effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise Invalid("effect", self.effect, "NoSchedule, PreferNoSchedule, NoExecute or empty")
        if self.operator == "Exists" and self.value:
            raise Invalid("value", self.value, "empty with operator Exists")
        if not self.key and self.operator != "Exists":
            raise Invalid("operator", self.operator, "Exists when key is empty")


@dataclass(kw_only=True)
class Resources:
    """Where and how a step runs on Kubernetes. Ignored by local runs, which use this machine."""

    accelerator: str | None = None
    """The accelerator's extended resource name, e.g. nvidia.com/gpu or amd.com/gpu; pick the model of
    accelerator with node_selector (e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3)."""
    gpus: int = 0
    """Accelerators per pod (per node of a multi-node stage); needs `accelerator`. With more than one, a stage runs
    under torchrun with one rank per accelerator: a training stage under DeepSpeed ZeRO, a sampling stage each
    rank sampling a shard of the prompts (with the vllm engine, groups of rollout.tensor_parallel_size ranks share
    one engine: it must divide this). The run parameter
    <stage>_gpus_per_node (default this) may lower it to as few as 1."""
    cpu: str | None = None
    """CPU request and limit, a Kubernetes quantity: "8" or "500m"."""
    memory: str | None = None
    """Memory request and limit, a Kubernetes quantity: "64Gi"."""
    shm_size: str | None = None
    """Size of a memory-backed /dev/shm for the step (NCCL and data loader workers need more than the
    container default of 64Mi), a Kubernetes quantity: "16Gi"."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels the pod must match, e.g. {cloud.google.com/gke-accelerator: nvidia-h100-80gb}."""
    tolerations: list[Toleration] = field(default_factory=list)
    """Taints the pod tolerates (see Toleration)."""
    timeout: int = 0
    """Seconds the step may run before its pod is stopped (activeDeadlineSeconds); 0: no limit."""
    retries: int = 0
    """How many times a failed step is retried; a training stage resumes from its last checkpoint, which lives
    in the run's workspace (storage.workspace_size), not in the pod."""
    queue: str | None = None
    """A Kueue LocalQueue in the steps' namespace, e.g. posttrain-gpu (k8s/overlays/kueue): set as the pod label
    kueue.x-k8s.io/queue-name, so Kueue admits the step against its ClusterQueue's quota; none: not queued."""
    nodes: int = 1
    """Nodes a training stage runs on, each with `gpus` accelerators; the run parameter <stage>_nodes (default
    this) may change it up to `max_nodes`. With max_nodes above 1 the stage's step creates a Kubeflow Trainer
    TrainJob (k8s/overlays/trainer) of that many nodes and streams its logs, and the step's own pod is a launcher
    with `runtime_resources`; with max_nodes 1 the stage runs inside the step's pod. Several nodes share the run's
    workspace: storage.workspace_access_modes must include ReadWriteMany."""
    max_nodes: int | None = None
    """The most nodes a run may ask for with <stage>_nodes; none: `nodes`. The run parameter
    <stage>_gpus_per_node (default `gpus`) may likewise lower the accelerators per node to as few as 1."""
    training_runtime: str = "posttrain-trainer"
    """The TrainingRuntime (in storage.namespace) a multi-node stage's TrainJob references (k8s/overlays/trainer)."""

    def __post_init__(self):
        if self.queue is not None and not NAME_RE.match(self.queue):
            raise Invalid("queue", self.queue, "a LocalQueue name: lowercase letters, digits and '-'")
        if self.gpus < 0:
            raise Invalid("gpus", self.gpus, "an integer ≥ 0")
        if self.gpus and not self.accelerator:
            raise Invalid("gpus", self.gpus, "0 unless `accelerator` names the accelerator type "
                                             "(e.g. accelerator: nvidia.com/gpu)")
        if self.accelerator and not self.gpus:
            raise Invalid("gpus", self.gpus, "at least 1 when `accelerator` is set")
        for name in ("cpu", "memory", "shm_size"):
            value = getattr(self, name)
            if value is not None and not QUANTITY_RE.match(value):
                raise Invalid(name, value, 'a Kubernetes quantity such as "8", "500m" or "64Gi"')
        if self.timeout < 0:
            raise Invalid("timeout", self.timeout, "seconds ≥ 0 (0: no limit)")
        if self.retries < 0:
            raise Invalid("retries", self.retries, "an integer ≥ 0")
        if self.nodes < 1:
            raise Invalid("nodes", self.nodes, "an integer ≥ 1")
        if self.max_nodes is not None and self.max_nodes < self.nodes:
            raise Invalid("max_nodes", self.max_nodes, f"at least nodes ({self.nodes})")
        if not NAME_RE.match(self.training_runtime):
            raise Invalid("training_runtime", self.training_runtime, "a TrainingRuntime name: lowercase letters, "
                                                                     "digits and '-'")

    @property
    def most_nodes(self) -> int:
        """The most nodes a run may use: max_nodes, else nodes."""
        return self.max_nodes if self.max_nodes is not None else self.nodes

    @property
    def multi_node(self) -> bool:
        """The stage runs as a TrainJob (its step launches it) rather than inside the step's pod."""
        return self.most_nodes > 1


@dataclass(kw_only=True)
class Stage:
    """One step of the workflow. Stages run in the order listed; a training stage starts from the model of
    the training stage before it (or base_model), unless `start_from` names another."""

    stage: str
    """A stage of the stage registry (components/stages.py; the bundled ones are listed under Stages below, with
    the data each trains on, what it needs from a stage before it and what it can do). A kind that trains a model
    may appear more than once, each time with its own `name`; any other kind appears at most once."""
    settings: dict = field(default_factory=dict)
    """The stage's config keys (components/<module>/README.md), except those the pipeline wires: model and
    data paths, output_dir, rewards and suites (from the spec's `rewards` and `eval_suites`). Keys of a part
    go under the part's name, e.g. {rpo_alpha: 1.0, train: {lr: 1.0e-5, max_steps: 120}}
    (components/README.md)."""
    resources: Resources | None = None
    """Where this stage runs; default: the spec's `resources` (a stage of kind cpu: `runtime_resources`)."""
    name: str = ""
    """The step's name, unique in the spec (default: `stage`): its workspace directory, MLflow run, pipeline
    parameters (`<name>_lr`, `<name>_max_steps`) and row in the tables. Lowercase letters, digits and '_'."""
    start_from: str | None = None
    """The name of an earlier stage that made a model, or `base` (the base model): this stage starts from (or,
    sampling, samples) that model instead of the latest one. Branches from one start compare stages fairly, e.g.
    two stages that each start from `base`."""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise Invalid("stage", self.stage, f"one of {', '.join(spec_kinds())}")
        self.name = self.name or self.stage
        if not isinstance(self.name, str) or not STEP_NAME_RE.match(self.name):
            raise Invalid("name", self.name, "lowercase letters, digits and '_', starting with a letter (≤ 40)")

    @property
    def module(self) -> str:
        """The stage package under components/ that runs this kind (components.stages)."""
        return get_stage(self.stage).module


@dataclass(kw_only=True)
class Guard:
    """A metric the challenger may not lose by more than a margin."""

    metric: str
    """`<suite>/<metric>`, e.g. arithmetic-ood/accuracy."""
    max_drop: float = 0.0
    """Largest drop from the champion's value that still promotes (in the metric's units)."""
    direction: str = "max"
    """max (higher is better: a drop is a fall) or min (lower is better, e.g. kl_to_base: a drop is a rise)."""

    def __post_init__(self):
        if self.max_drop < 0:
            raise Invalid("max_drop", self.max_drop, "a number ≥ 0")
        if self.direction not in ("max", "min"):
            raise Invalid("direction", self.direction, "max or min")


@dataclass(kw_only=True)
class Promotion:
    """When the registered challenger becomes the champion."""

    metric: str
    """The primary metric, `<suite>/<metric>` with a suite of eval_suites, e.g. arithmetic-id/accuracy (the
    names are listed at the end of this page); a metric the eval will not produce fails validation."""
    direction: str = "max"
    """max (higher is better) or min."""
    min_improvement: float = 0.0
    """How much better than the champion the challenger must be. With no champion yet, the challenger must be
    that much better than the base model (the evaluation's baseline `base`), with the guards applied."""
    guards: list[Guard] = field(default_factory=list)
    """Metrics that may not drop by more than their max_drop, e.g. out-of-domain accuracy."""
    min_value: float | None = None
    """An absolute floor of the primary metric (a ceiling with direction min): a challenger below it is never
    promoted, whatever it is compared with; none: no floor."""

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise Invalid("direction", self.direction, "max or min")
        if self.min_value is not None and not math.isfinite(self.min_value):
            raise Invalid("min_value", self.min_value, "a finite number")
        if self.min_improvement < 0:
            raise Invalid("min_improvement", self.min_improvement, "a number ≥ 0")


@dataclass(kw_only=True)
class Images:
    """The container images of the steps (defaults: components/images.py, POSTTRAIN_REGISTRY / POSTTRAIN_TAG)."""

    trainer: str | None = None
    """Image of the stages of kind train and sample (default: components/images.py TRAINER_IMAGE,
    ghcr.io/posttrain/posttrain-trainer:0.1.0 unless POSTTRAIN_REGISTRY or POSTTRAIN_TAG say otherwise)."""
    runtime: str | None = None
    """Image of the CPU steps: preflight, the data step, the stages of kind cpu, their gates and the run's closing
    step (default: components/images.py RUNTIME_IMAGE)."""
    pull_policy: str = "IfNotPresent"
    """Always, IfNotPresent or Never."""
    pull_secrets: list[str] = field(default_factory=list)
    """Names of Secrets (type docker-registry) for a private registry."""

    def __post_init__(self):
        self.trainer, self.runtime = self.trainer or TRAINER_IMAGE, self.runtime or RUNTIME_IMAGE
        if self.pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise Invalid("pull_policy", self.pull_policy, "Always, IfNotPresent or Never")
        for name in ("trainer", "runtime"):
            image = getattr(self, name)
            if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
                raise Invalid(name, image, "an image with a pinned tag or digest (not :latest)")


@dataclass(kw_only=True)
class Storage:
    """Where artifacts and checkpoints live, and the Secrets holding the credentials (never in the spec)."""

    pipeline_root: str = "s3://posttrain-pipelines"
    """KFP pipeline root: every artifact passed between steps is stored under it."""
    s3_endpoint: str = "http://minio.posttrain.svc.cluster.local:9000"
    """The S3 (MinIO) endpoint for s3:// URIs, given to every step as MLFLOW_S3_ENDPOINT_URL."""
    minio_secret: str = "posttrain-minio"
    """Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, set as environment variables of every step."""
    mlflow_secret: str = "posttrain-mlflow"
    """Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, set likewise."""
    namespace: str = "posttrain"
    """Kubernetes namespace the steps run in (preflight checks the Secrets exist there)."""
    workspace_size: str = "100Gi"
    """Size of the run's workspace volume (a PVC KFP creates per run), which holds each training stage's
    checkpoints so a retried step resumes where it stopped, and the models: the base model (imported there once)
    and each training stage's, which the later steps read there rather than through their pods' scratch volumes."""
    workspace_storage_class: str | None = None
    """StorageClass of the workspace volume (default: the cluster's default class). KFP 2.15 and 2.16 need it
    unless their admin set a default workspace spec; never an empty string, which KFP refuses."""
    workspace_access_modes: list[str] = field(default_factory=lambda: ["ReadWriteOnce"])
    """Access modes of the workspace volume, always sent to KFP (whose backend refuses a workspace without
    them, 2.15 on): ReadWriteOnce suits steps that run one after another; ReadWriteMany if steps on
    different nodes share the workspace at once."""

    def __post_init__(self):
        if not QUANTITY_RE.match(self.workspace_size):
            raise Invalid("workspace_size", self.workspace_size, 'a Kubernetes quantity such as "100Gi"')
        if self.workspace_storage_class is not None and not re.match(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$",
                                                                     self.workspace_storage_class):
            raise Invalid("workspace_storage_class", self.workspace_storage_class,
                          "a StorageClass name (lowercase letters, digits, '-' and '.'), or null for the default class")
        modes = ("ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany")
        if not self.workspace_access_modes or any(m not in modes for m in self.workspace_access_modes):
            raise Invalid("workspace_access_modes", self.workspace_access_modes,
                          f"a non-empty list of {', '.join(modes)}")
        for name in ("minio_secret", "mlflow_secret", "namespace"):
            if not NAME_RE.match(getattr(self, name)):
                raise Invalid(name, getattr(self, name), "a Kubernetes name: lowercase letters, digits and '-'")


@dataclass(kw_only=True)
class Tracking:
    """MLflow: one experiment per spec, one parent run per pipeline run, one child run per stage."""

    uri: str = "http://mlflow.posttrain.svc.cluster.local:5000"
    """The MLflow tracking server (local runs use a sqlite file under .posttrain/ instead)."""
    experiment: str | None = None
    """The MLflow experiment (default: the spec's name)."""
    registered_model: str | None = None
    """The registered model that the registering stage adds versions to (default: the spec's name)."""


@dataclass(kw_only=True)
class Schedule:
    """A recurring run (`posttrain schedule`), named after the spec (one per spec: scheduling again replaces it),
    on the pipeline version that `posttrain schedule` uploads. It stays on that version: a later upload (e.g.
    by `posttrain submit`) does not move it; schedule again to move it."""

    cron: str
    """When, as a 6-field cron expression with seconds: "0 0 3 * * 1" is 03:00 every Monday. In UTC, unless the
    cluster's scheduled-workflow controller sets CRON_SCHEDULE_TIMEZONE."""
    max_concurrency: int = 1
    """How many runs of the schedule may run at once."""
    catchup: bool = False
    """Whether runs missed while the schedule was paused are started afterwards, one per missed time."""

    def __post_init__(self):
        if len(self.cron.split()) != 6:
            raise Invalid("cron", self.cron, 'a cron expression of 6 fields (seconds first), e.g. "0 0 3 * * 1"')
        if self.max_concurrency < 1:
            raise Invalid("max_concurrency", self.max_concurrency, "a positive integer")


@dataclass(kw_only=True)
class Spec:
    """A post-training workflow."""

    name: str
    """The pipeline's name: lowercase letters, digits and '-', at most 63 characters (it labels pods)."""
    description: str = ""
    """Shown with the pipeline in the KFP UI."""
    base_model: str
    """The model the first training stage starts from: a Hugging Face directory (config.json, *.safetensors,
    tokenizer) at s3://bucket/key or a local path, or bundled:tiny (the demo's tiny model, built on the machine
    that runs the pipeline locally). A pipeline parameter."""
    data: dict = field(default_factory=dict)
    """The settings of the data step every pipeline runs first (its README under components/): `sources`, each a
    file or directory {uri, shape, fields, ...} or a bundled task {task, rows, shape, ...} with a row shape,
    and max_length, eval_fraction, contamination, max_bad_fraction. The sources are a pipeline parameter."""
    stages: list[Stage]
    """The stages, in order (see Stage)."""
    rewards: list[dict] = field(default_factory=list)
    """Reward functions for the stages that score completions, e.g. [{name: arithmetic, weight: 1.0}]
    (components/rewards)."""
    eval_suites: list[dict] = field(default_factory=list)
    """The evaluation's suites (its stage's README): a bundled task's test prompts {task, split
    (id or ood), n_prompts, seed} named <task>-<split> unless `name` says otherwise, or {name, data: a JSONL of
    prompts with reference answers (s3:// or a path)}."""
    promotion: Promotion | None = None
    """The rule by which the registering stage's new version is promoted (needed when a spec registers)."""
    resources: Resources = field(default_factory=Resources)
    """Where the GPU-image stages run unless a stage sets its own; a sampling stage takes one node of it
    (its accelerators, cpu and memory, one process per accelerator): give them their own resources to size
    those."""
    runtime_resources: Resources = field(default_factory=lambda: Resources(cpu="1", memory="4Gi"))
    """Where the CPU steps run: preflight, the data step, the stages of kind cpu, their gates, the closing step."""
    images: Images = field(default_factory=Images)
    """Container images."""
    storage: Storage = field(default_factory=Storage)
    """Artifacts, checkpoints and credentials."""
    tracking: Tracking = field(default_factory=Tracking)
    """MLflow."""
    schedule: Schedule | None = None
    """A recurring run, used by `posttrain schedule` (whose --cron overrides it)."""

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise Invalid("name", self.name, "lowercase letters, digits and '-', starting and ending with a letter "
                                             "or digit, at most 63 characters")
        if self.base_model.startswith("s3://"):
            from components.storage import split_s3

            try:
                split_s3(self.base_model)
            except ValueError as e:
                raise Invalid("base_model", self.base_model, f"s3://bucket/key with plain key segments ({e})") from None
        if not is_model_uri(self.base_model):
            raise Invalid("base_model", self.base_model, f"s3://bucket/key, a local path, or one of "
                                                         f"{', '.join(BUNDLED_MODELS)}")
        self.tracking.experiment = self.tracking.experiment or self.name
        self.tracking.registered_model = self.tracking.registered_model or self.name

    # --- what the pipeline builder asks of a spec

    def stage_resources(self, stage: Stage) -> Resources:
        if stage.resources is not None:
            return stage.resources
        kind = get_stage(stage.stage).kind
        if kind == "cpu":
            return self.runtime_resources
        if kind == "sample" and self.resources.multi_node:  # one node
            return dataclasses.replace(self.resources, nodes=1, max_nodes=None)
        return self.resources

    def runtime_defaults(self, stage: Stage) -> dict:
        """The stage's pipeline parameters (RUNTIME_KEYS of its `train` part) with their defaults: the
        settings' values, else the stage config's defaults."""
        kind = get_stage(stage.stage)
        if kind.kind != "train":
            return {}
        train = next(f for f in dataclasses.fields(kind.config_class()) if f.name == "train").default_factory()
        given = stage.settings.get("train") or {}
        return {key: cast(given.get(key, getattr(train, key))) for key, (cast, _) in RUNTIME_KEYS.items()}

    def fingerprint(self) -> str:
        """A short hash of the whole spec, as a lineage tag."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_model_uri(uri: str) -> bool:
    """s3://bucket/key (plain key segments: no '..'), a bundled model, or a local path (no other scheme: nothing
    is read from a hub)."""
    if uri.startswith("s3://"):
        from components.storage import split_s3

        try:
            return bool(split_s3(uri)[1])
        except ValueError:
            return False
    return uri in BUNDLED_MODELS or bool(uri) and not re.match(r"^[A-Za-z][\w+.-]*:", uri)

