"""The workflow spec: one YAML file read into typed, documented dataclasses and validated once, at the edge.

    spec = load_spec("demo")                         # a bundled spec by name (pipelines/specs/demo.yaml)
    spec = load_spec("my-spec.yaml")                 # or a path

A spec names the base model, the data, the ordered stages with their settings, the reward functions, the
eval suites, the promotion rule, where each step runs (resources, images) and where things are kept
(storage, tracking). Everything a run would trip over is caught here, before a step starts: an unknown key,
a value of the wrong type, a negative learning rate, a stage order that cannot work (DPO with no preference
data, GRPO with no reward function, register with no evaluate before it), a GPU count with no accelerator
type, a promotion rule naming a metric the eval will not produce. Each error names the file, the key's path
(`stages[2].settings.lr`), the bad value and what is allowed.

A stage's settings are its own config's keys (components/<stage>/README.md), checked by that config class
through components.config.from_mapping; the keys that wire a stage to its inputs and outputs (model,
train_data, output_dir, ...) are the pipeline's and may not be set. docs/spec.md is generated from the
field docstrings below (`python -m pipelines.spec docs > docs/spec.md`).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.config import ConfigError, from_mapping
from pipelines.images import RUNTIME_IMAGE, TRAINER_IMAGE

SPECS_DIR = Path(__file__).with_name("specs")
BUNDLED_SPECS = ("demo", "cluster")
"""Workflow specs shipped in pipelines/specs/, loadable by name."""

TRAINING = ("sft", "psft", "sft_kl", "dpo", "grpo")
"""Stage kinds that train a model: each starts from the previous one's model (or the base model)."""
STAGE_KINDS = (*TRAINING[:3], "reward_scoring", *TRAINING[3:], "evaluate", "register")
SFT_METHODS = ("sft", "psft", "sft_kl")
"""Kinds run by the sft stage module, with its `method` set to the kind."""
SAMPLING = ("reward_scoring", "evaluate")
"""Stage kinds that sample in one process: one accelerator at most."""
GPU_KINDS = (*TRAINING, *SAMPLING)
"""Kinds that run on the trainer image (and on accelerators when their resources ask for them)."""
RUNTIME_KEYS = {"lr": (float, "a positive number"), "max_steps": (int, "a positive integer")}
"""Settings of every training stage that become pipeline parameters (`<stage>_lr`, `<stage>_max_steps`)."""
_PREV = "the pipeline: the model of the training stage before, or base_model"
_OUT = "the pipeline: a directory of the run's workspace or an output artifact"
_PROMPTS = "the pipeline: data_prep's prompts rows (a source of shape prompts in data.sources)"
WIRED = {
    "data_prep": {"tokenizer": "the pipeline: base_model", "output_dir": _OUT},
    "sft": {"model": _PREV, "train_data": "the pipeline: data_prep's sft rows", "output_dir": _OUT,
            "method": "the stage kind (sft, psft or sft_kl)"},
    "reward_scoring": {"model": _PREV, "prompts": _PROMPTS, "task": _PROMPTS, "rewards": "the spec's `rewards`",
                       "output_dir": _OUT},
    "dpo": {"model": _PREV, "train_data": "the pipeline: reward_scoring's pairs, or data_prep's preference rows",
            "output_dir": _OUT},
    "grpo": {"model": _PREV, "prompts": _PROMPTS, "task": _PROMPTS, "rewards": "the spec's `rewards`",
             "output_dir": _OUT},
    "evaluate": {"model": "the pipeline: the last training stage's model", "name": "the pipeline: that stage's name",
                 "baselines": "the pipeline: base_model and every training stage's model",
                 "base_model": "the pipeline: base_model", "suites": "the spec's `eval_suites`",
                 "rewards": "the spec's `rewards`", "training_metrics": "the pipeline: each training stage's metrics",
                 "output_dir": _OUT},
    "register": {"model": "the pipeline: the last training stage's model", "name": "tracking.registered_model",
                 "eval": "the pipeline: the evaluate stage's eval.json",
                 "promotion": "the spec's `promotion` (applied by the promotion gate)",
                 "parent_run_id": "the pipeline's MLflow run", "output_dir": _OUT},
}
"""The config keys of each stage module that the pipeline sets (components/<module>/component.py), and by what:
inputs, outputs and what comes from the spec's top level. A stage's settings may not set them."""
BUNDLED_MODELS = ("bundled:tiny",)
"""Base models built on the machine that runs the pipeline locally instead of read from a URI."""
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?$")


class SpecError(ConfigError):
    """A spec is invalid: the message names the file, the key's path, the bad value and what is allowed."""


class Invalid(ValueError):
    """Raised by a spec dataclass's __post_init__: `key` (relative to the dataclass) holds `value`, not `allowed`."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


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
    """Accelerators per pod; needs `accelerator`. With more than one, a training stage (sft, psft, sft_kl, dpo,
    grpo) runs under torchrun with one rank per accelerator (DeepSpeed ZeRO); reward_scoring and evaluate run
    one process and take at most 1."""
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

    def __post_init__(self):
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


@dataclass(kw_only=True)
class Stage:
    """One step of the workflow. Stages run in the order listed; a training stage starts from the model of
    the training stage before it, or from base_model."""

    stage: str
    """sft, psft or sft_kl (the sft stage with that method), reward_scoring, dpo, grpo, evaluate or register.
    Each kind appears at most once. Data: sft/psft/sft_kl train on the `sft` rows of `data`, dpo on the
    `preference` rows (or on the pairs of a reward_scoring stage before it), reward_scoring and grpo on the
    `prompts` rows; evaluate runs `eval_suites`; register follows evaluate and ends the list."""
    settings: dict = field(default_factory=dict)
    """The stage's config keys (components/<module>/README.md), except those the pipeline wires: model and
    data paths, output_dir, rewards and suites (from the spec's `rewards` and `eval_suites`)."""
    resources: Resources | None = None
    """Where this stage runs; default: the spec's `resources` (register: `runtime_resources`)."""

    def __post_init__(self):
        if self.stage not in STAGE_KINDS:
            raise Invalid("stage", self.stage, f"one of {', '.join(STAGE_KINDS)}")

    @property
    def module(self) -> str:
        """The stage module under components/ that runs this kind."""
        return "sft" if self.stage in SFT_METHODS else self.stage


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
    """How much better than the champion the challenger must be; with no champion yet it is promoted."""
    guards: list[Guard] = field(default_factory=list)
    """Metrics that may not drop by more than their max_drop, e.g. out-of-domain accuracy."""

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise Invalid("direction", self.direction, "max or min")
        if self.min_improvement < 0:
            raise Invalid("min_improvement", self.min_improvement, "a number ≥ 0")


@dataclass(kw_only=True)
class Images:
    """The container images of the steps (defaults: pipelines/images.py, POSTTRAIN_REGISTRY / POSTTRAIN_TAG)."""

    trainer: str | None = None
    """Image of the GPU stages: sft, psft, sft_kl, reward_scoring, dpo, grpo, evaluate (default:
    pipelines/images.py TRAINER_IMAGE, ghcr.io/posttrain/posttrain-trainer:0.1.0 unless POSTTRAIN_REGISTRY or
    POSTTRAIN_TAG say otherwise)."""
    runtime: str | None = None
    """Image of the CPU steps: preflight, data_prep, register, the promotion and the run's closing step
    (default: pipelines/images.py RUNTIME_IMAGE)."""
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
    checkpoints so a retried step resumes where it stopped."""
    workspace_storage_class: str | None = None
    """StorageClass of the workspace volume (default: the cluster's default class)."""

    def __post_init__(self):
        if not QUANTITY_RE.match(self.workspace_size):
            raise Invalid("workspace_size", self.workspace_size, 'a Kubernetes quantity such as "100Gi"')
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
    """The registered model that register adds versions to (default: the spec's name)."""


@dataclass(kw_only=True)
class Schedule:
    """A recurring run (`posttrain schedule`), on the latest pipeline version."""

    cron: str
    """When, as a 6-field cron expression with seconds: "0 0 3 * * 1" is 03:00 every Monday."""
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
    """The data_prep stage's settings (components/data_prep/README.md): `sources`, each a file or directory
    {uri, shape, fields, ...} or a bundled task {task, rows, shape, ...} with shape sft, preference or prompts,
    and max_length, eval_fraction, contamination, max_bad_fraction. The sources are a pipeline parameter."""
    stages: list[Stage]
    """The stages, in order (see Stage)."""
    rewards: list[dict] = field(default_factory=list)
    """Reward functions for reward_scoring, grpo and evaluate, e.g. [{name: arithmetic, weight: 1.0}]
    (components/rewards)."""
    eval_suites: list[dict] = field(default_factory=list)
    """The evaluate stage's suites (components/evaluate/README.md): a bundled task's test prompts {task, split
    (id or ood), n_prompts, seed} named <task>-<split> unless `name` says otherwise, or {name, data: a JSONL of
    prompts with reference answers (s3:// or a path)}."""
    promotion: Promotion | None = None
    """The rule register applies to promote its new version (needed when a register stage exists)."""
    resources: Resources = field(default_factory=Resources)
    """Where the GPU-image stages run unless a stage sets its own; reward_scoring and evaluate take one of its
    accelerators (they run one process) with its cpu and memory: give them their own resources to size those."""
    runtime_resources: Resources = field(default_factory=lambda: Resources(cpu="1", memory="4Gi"))
    """Where the CPU steps run: preflight, data_prep, register, the promotion, the closing step."""
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
        if not is_model_uri(self.base_model):
            raise Invalid("base_model", self.base_model, f"s3://bucket/key, a local path, or one of "
                                                         f"{', '.join(BUNDLED_MODELS)}")
        self.tracking.experiment = self.tracking.experiment or self.name
        self.tracking.registered_model = self.tracking.registered_model or self.name

    # --- what the pipeline builder asks of a spec

    def stage_resources(self, stage: Stage) -> Resources:
        if stage.resources is not None:
            return stage.resources
        if stage.stage not in GPU_KINDS:
            return self.runtime_resources
        if stage.stage in SAMPLING and self.resources.gpus > 1:  # one accelerator of the pool
            return dataclasses.replace(self.resources, gpus=1)
        return self.resources

    def runtime_defaults(self, stage: Stage) -> dict:
        """The stage's pipeline parameters (RUNTIME_KEYS) with their defaults: the settings' values, else the
        stage config's defaults."""
        if stage.stage not in TRAINING:
            return {}
        from components.training.loop import TrainConfig

        cls = stage_config(stage.module) or TrainConfig
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return {key: kind(stage.settings.get(key, defaults[key])) for key, (kind, _) in RUNTIME_KEYS.items()}

    def fingerprint(self) -> str:
        """A short hash of the whole spec, as a lineage tag."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_model_uri(uri: str) -> bool:
    """s3://bucket/key, a bundled model, or a local path (no other scheme: nothing is read from a hub)."""
    return uri.startswith("s3://") or uri in BUNDLED_MODELS or bool(uri) and not re.match(r"^[A-Za-z][\w+.-]*:", uri)


# ---------------------------------------------------------------------------------------------------------------
# Reading: nested dataclasses from mappings, with paths.

def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    origin = typing.get_origin(hint)
    if origin is list or hint is list:
        return "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


class _Reader:
    """Builds spec dataclasses from YAML data; every error is a SpecError naming `where` (the file) and a path."""

    def __init__(self, where: str):
        self.where = where

    def error(self, path: str, message: str) -> SpecError:
        return SpecError(f"{self.where}: {path}: {message}")

    def build(self, cls, data, path: str):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise self.error(path or "(top level)", f"{data!r} is invalid: a mapping with keys "
                                                   f"{', '.join(fields)}")
        for key in data:
            if key not in fields:
                raise self.error(_join(path, key), f"unknown key; allowed: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls)
        for name, f in fields.items():
            if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(_join(path, name), "missing; this key is required")
        values = {key: self.value(hints[key], value, _join(path, key)) for key, value in data.items()}
        try:
            return cls(**values)
        except Invalid as e:
            raise self.error(_join(path, e.key), f"{e.value!r} is invalid: {e.allowed}") from None

    def value(self, hint, value, path: str):
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, value, path)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path)
        if origin is list or hint is list:
            if not isinstance(value, list):
                raise self.error(path, f"{value!r} is invalid: {_type_name(hint)}")
            return [self.value(args[0], v, _join(path, i)) if args else v for i, v in enumerate(value)]
        if origin is dict or hint is dict:
            if not isinstance(value, dict):
                raise self.error(path, f"{value!r} is invalid: {_type_name(hint)}")
            if args:
                for k, v in value.items():
                    if not isinstance(k, str) or not isinstance(v, args[1]):
                        raise self.error(_join(path, str(k)), f"{v!r} is invalid: {_type_name(args[1])}")
            return value
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float else
              isinstance(value, int) and not isinstance(value, bool) if hint is int else isinstance(value, hint))
        if not ok:
            raise self.error(path, f"{value!r} is invalid: {_type_name(hint)}")
        return float(value) if hint is float else value


# ---------------------------------------------------------------------------------------------------------------
# Checks across keys: the stage order, each stage's settings, rewards, suites and the promotion rule.

def stage_config(module: str):
    """The config class of components/<module>/main.py, or None while that stage does not exist."""
    try:
        return importlib.import_module(f"components.{module}.main").CONFIG
    except ModuleNotFoundError as e:
        if e.name in (f"components.{module}", f"components.{module}.main"):
            return None
        raise


def validate_settings(module: str, settings: dict, where: str, injected: dict | None = None) -> None:
    """Check a stage's settings with its own config (when the stage exists). The keys the pipeline sets are
    refused; `injected` (what the spec gives the stage, e.g. rewards) and a placeholder for every other wired
    string key are added, so only the user's keys can fail."""
    for key in settings:
        if key in WIRED[module]:
            raise SpecError(f"{where}.{key}: {settings[key]!r} is invalid here: set by {WIRED[module][key]}; "
                            "remove it")
    cls = stage_config(module)
    if cls is None:
        return
    hints = typing.get_type_hints(cls)
    injected = {k: v for k, v in (injected or {}).items() if k in hints}
    placeholders = {k: f"pipeline-{k}" for k in WIRED[module] if k in hints and k not in injected
                    and k != "task" and _admits_str(hints[k])}
    try:
        from_mapping(cls, {**placeholders, **injected, **settings}, where)
    except ConfigError as e:
        raise SpecError(str(e)) from None


def _admits_str(hint) -> bool:
    return hint is str or typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)


class _Checker:
    def __init__(self, spec: Spec, where: str):
        self.spec, self.where = spec, where

    def error(self, path: str, message: str) -> SpecError:
        return SpecError(f"{self.where}: {path}: {message}")

    def run(self) -> None:
        reward_names = self.rewards()
        shapes = self.data()
        suites = self.suites()
        self.order(shapes)
        for i, stage in enumerate(self.spec.stages):
            self.settings(i, stage)
        self.promotion(suites, reward_names)

    def rewards(self) -> list[str]:
        """The reward names, checked without loading anything (a reward model is loaded by the stage that uses it)."""
        if not self.spec.rewards:
            return []
        from components.rewards import check_rewards

        return [name for name, *_ in check_rewards(self.spec.rewards, where=f"{self.where}: rewards")]

    def data(self) -> set[str]:
        """Validate `data` with data_prep's config; return the row shapes its sources provide for training
        (sources whose role is train or both)."""
        sources = self.spec.data.get("sources", [])
        if not isinstance(sources, list):
            raise self.error("data.sources", f"{sources!r} is invalid: a list of sources")
        for i, src in enumerate(sources):
            if not isinstance(src, dict) or "shape" not in src:
                raise self.error(f"data.sources[{i}]", f"{src!r} is invalid: a mapping with a shape "
                                                      "(sft, preference or prompts) and a uri or a task")
        if not sources:
            return set()
        validate_settings("data_prep", self.spec.data, f"{self.where}: data")
        from components.data_prep.main import _source

        return {src.shape for src in map(_source, sources, range(len(sources))) if src.role in ("train", "both")}

    def suites(self) -> list[dict]:
        """The eval suites in full form (names defaulted), each checked by the evaluate stage's rules."""
        from components.evaluate.main import normalize_suite

        out = []
        for i, suite in enumerate(self.spec.eval_suites):
            try:
                out.append(normalize_suite(suite, f"eval_suites[{i}]", 0))
            except ValueError as e:
                raise SpecError(f"{self.where}: {e}") from None
        names = [s["name"] for s in out]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise self.error(f"eval_suites[{i}].name", f"{name!r} is invalid: each suite needs its own name")
        return out

    def order(self, shapes: set[str]) -> None:
        stages = self.spec.stages
        if not stages:
            raise self.error("stages", "[] is invalid: at least one stage")
        seen: list[str] = []
        for i, st in enumerate(stages):
            path, kind = f"stages[{i}].stage", st.stage
            if kind in seen:
                raise self.error(path, f"{kind!r} is invalid: each kind of stage appears once "
                                       f"(already stages[{seen.index(kind)}])")
            if "register" in seen:
                raise self.error(path, f"{kind!r} is invalid: register is the last stage")
            need = {"sft": "sft", "psft": "sft", "sft_kl": "sft", "grpo": "prompts", "reward_scoring": "prompts"}
            if kind in need and need[kind] not in shapes:
                raise self.error(path, f"{kind!r} is invalid here: it trains on data of shape {need[kind]!r}, and "
                                       f"no source in data.sources gives training rows of it (training shapes: "
                                       f"{', '.join(sorted(shapes)) or 'none'}; a source trains when its role is "
                                       "train or both, and a task source's default role is train only for "
                                       "split id, part train)")
            if kind == "dpo" and "preference" not in shapes and "reward_scoring" not in seen:
                raise self.error(path, "'dpo' is invalid here: it needs preference data, and there is neither a "
                                       "source of shape 'preference' with role train or both in data.sources nor "
                                       "a reward_scoring stage before it")
            if kind in ("grpo", "reward_scoring") and not self.spec.rewards:
                raise self.error(path, f"{kind!r} is invalid: it scores completions, and `rewards` is empty "
                                       "(add e.g. rewards: [{name: arithmetic}])")
            if kind == "evaluate" and not self.spec.eval_suites:
                raise self.error(path, "'evaluate' is invalid: `eval_suites` is empty")
            if kind in SAMPLING and st.resources is not None and st.resources.gpus > 1:
                raise self.error(f"stages[{i}].resources.gpus", f"{st.resources.gpus} is invalid for the {kind} "
                                                               "stage: it runs one process on one accelerator (1)")
            if kind == "register":
                if "evaluate" not in seen:
                    raise self.error(path, "'register' is invalid here: it needs an evaluate stage before it "
                                           "(the promotion rule reads the eval results)")
                if not any(k in TRAINING for k in seen):
                    raise self.error(path, "'register' is invalid here: no training stage before it produces "
                                           "a model to register")
                if self.spec.promotion is None:
                    raise self.error("promotion", "missing; a register stage needs a promotion rule")
            seen.append(kind)

    def settings(self, i: int, stage: Stage) -> None:
        where = f"stages[{i}].settings"
        if stage.stage in TRAINING:
            for key, (kind, allowed) in RUNTIME_KEYS.items():
                v = stage.settings.get(key)
                ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
                if v is not None and (not ok or not math.isfinite(v) or v <= 0):
                    raise self.error(f"{where}.{key}", f"{v!r} is invalid: {allowed}")
        validate_settings(stage.module, stage.settings, f"{self.where}: {where}", self.injected(stage))

    def injected(self, stage: Stage) -> dict:
        """What the spec's top level gives a stage's config."""
        spec = self.spec
        values = {"method": stage.stage, "suites": spec.eval_suites, "name": spec.tracking.registered_model,
                  "promotion": dataclasses.asdict(spec.promotion) if spec.promotion else None}
        if spec.rewards:
            values["rewards"] = spec.rewards
        if stage.stage != "register":
            del values["name"]
        return {k: v for k, v in values.items() if k in WIRED[stage.module]}

    def promotion(self, suites: list[dict], reward_names: list[str]) -> None:
        rule = self.spec.promotion
        if rule is None:
            return
        from components.evaluate.main import default_reward_specs, metric_names

        evaluate = next((s for s in self.spec.stages if s.stage == "evaluate"), None)
        settings = evaluate.settings if evaluate else {}
        names = reward_names or [r["name"] for r in default_reward_specs(suites)]
        known = sorted(metric_names(suites, settings.get("k", [1]), names, kl_to_base=True,
                                    heldout=settings.get("heldout_text") is not None))
        for path, metric in [("promotion.metric", rule.metric)] + [
                (f"promotion.guards[{i}].metric", g.metric) for i, g in enumerate(rule.guards)]:
            if metric not in known:
                listed = ", ".join(s["name"] for s in suites) or "none: eval_suites is empty"
                raise self.error(path, f"{metric!r} is invalid: the eval will not produce it; metrics are "
                                       f"<suite>/<metric> with the suites of eval_suites ({listed}): "
                                       f"{', '.join(known) or 'none'}")


# ---------------------------------------------------------------------------------------------------------------

def parse_spec(data, where: str = "spec") -> Spec:
    """Build and validate a Spec from a mapping (a YAML document); `where` names it in errors."""
    spec = _Reader(where).build(Spec, data, "")
    _Checker(spec, where).run()
    return spec


def spec_path(name_or_path: str | Path) -> Path:
    """A bundled spec by name (demo, cluster) or a path to a YAML file."""
    if str(name_or_path) in BUNDLED_SPECS:
        return SPECS_DIR / f"{name_or_path}.yaml"
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    raise SpecError(f"{name_or_path}: no such file, and no bundled spec of that name (bundled: "
                    f"{', '.join(BUNDLED_SPECS)})")


def load_spec(name_or_path: str | Path) -> Spec:
    """Read and validate a spec file (or a bundled spec by name)."""
    path = spec_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read YAML: {e}") from e
    return parse_spec(data, str(path))


# ---------------------------------------------------------------------------------------------------------------
# The reference page, from the field docstrings.

SPEC_CLASSES = (Spec, Stage, Resources, Toleration, Promotion, Guard, Images, Storage, Tracking, Schedule)


def field_docs(cls) -> dict[str, str]:
    """Field name → the docstring under it in the class body (what `help()` cannot see)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        return f"see [{type(value).__name__}](#{type(value).__name__.lower()})"
    return "—" if value is None else f"`{json.dumps(value)}`"


def _hint_text(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_hint_text(a) for a in args if a is not type(None)) + " \\| null"
    if dataclasses.is_dataclass(hint):
        return f"[{hint.__name__}](#{hint.__name__.lower()})"
    if origin is list:
        return f"list of {_hint_text(args[0])}"
    if origin is dict:
        return f"mapping {_hint_text(args[0])} → {_hint_text(args[1])}"
    return {str: "string", int: "integer", float: "number", bool: "boolean", dict: "mapping"}[hint]


def reference_markdown() -> str:
    """docs/spec.md: every key of the spec with its type, default and meaning."""
    lines = ["# The workflow spec", "",
             "<!-- Generated from the field docstrings of pipelines/spec.py by "
             "`python -m pipelines.spec docs > docs/spec.md`; tests/unit/test_spec_docs.py checks it is current. -->",
             "", inspect.cleandoc(sys.modules[__name__].__doc__.split("\n\n", 2)[2]), "",
             "Bundled specs: `pipelines/specs/demo.yaml` (CPU, tiny model) and `pipelines/specs/cluster.yaml` "
             "(8 GPUs).",
             ""]
    for cls in SPEC_CLASSES:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        lines += [f"## {cls.__name__}", "", " ".join(inspect.cleandoc(cls.__doc__).split()), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            lines.append(f"| `{f.name}` | {_hint_text(hints[f.name])} | {_default_text(f)} | {docs[f.name]} |")
        lines.append("")
    lines += ["## Metrics the promotion rule can name", "",
              "`<suite>/<metric>` for each suite of `eval_suites` (a task suite is named `<task>-<split>` unless it "
              "names itself), with metric one of: `accuracy`, `pass@k` for each k of the evaluate stage's `k` "
              "(default [1]), `reward/<fn>` for each reward function (default: each suite task's verifier) and "
              "`length`, each also with `_ci_low` and `_ci_high` (the 95% bootstrap interval); task suites add "
              "`entropy` and `kl_to_base`. `heldout/entropy` and `heldout/kl_to_base` exist when the evaluate "
              "stage sets `heldout_text`. (components.evaluate.main.metric_names.)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["docs"]:
        sys.stdout.write(reference_markdown())
    elif len(sys.argv) == 3 and sys.argv[1] == "check":
        try:
            s = load_spec(sys.argv[2])
        except SpecError as e:
            sys.exit(str(e))
        print(f"{s.name}: valid ({len(s.stages)} stages: {', '.join(st.stage for st in s.stages)})")
    else:
        sys.exit("usage: python -m pipelines.spec docs | check SPEC")
