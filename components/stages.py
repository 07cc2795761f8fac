"""The stage registry: the one place that says what each stage of a workflow is.

A stage is a folder under components/ (config.py: its config class; main.py: `run` and its command line;
component.py: its KFP component; README.md: its keys) plus one `Stage` entry here, which also says what the stage
can do (run on several nodes, sample with which engines, train LoRA adapters). Everything else derives from the entry:
`posttrain stage NAME`, the spec's stage kinds and checks, the DAG's wiring (each input from what an earlier
step provides, each output provided to later ones), the local run's table, the models evaluate compares, and
the docs tests. A stage added at run time (`register(Stage(...))`, e.g. from a test or a plugin) is a stage
like the bundled ones. `register` checks the entry against its component's signature (check_contract): what the
stage's kind and capabilities need, and nothing no step can fill.

How a step is wired (pipelines/posttrain.py): the DAG keeps, for each thing a step can provide (a model, the
data, preference pairs, eval results, a registration), the latest output that provides it. A stage's `inputs`
name the component's artifact inputs and what feeds each; its `outputs` name the component's outputs and what
each provides. The component's parameters are filled by name from what the pipeline has (see PARAMETERS):
`settings` (the stage's settings as JSON), `stage`, `lr`, `max_steps`, `rewards`, `suites`, ...
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

KINDS = ("train", "sample", "cpu")
"""train: trains a model (torchrun with one rank per accelerator; `<stage>_lr` and `<stage>_max_steps` become
pipeline parameters); sample: samples (torchrun with one rank per accelerator, each a shard of the prompts, on one
node); cpu: the runtime image."""

SCALED_KINDS = ("train", "sample")
"""The kinds whose step runs one process per accelerator of its resources (torchrun when there are several):
their component takes `nproc` (the run parameter <stage>_gpus_per_node) and `launch` (its bounds)."""

ENGINES = ("hf", "vllm")
"""The sampling engines a stage's `rollout.engine` may name (components.training.engines)."""

SHAPES = ("sft", "preference", "prompts")
"""The row shapes of the data step's output: what a stage's `trains_on` names."""

PROMOTE = "promote"
"""What a stage with a `gate` returns to run its gate."""

FEEDS = {
    "policy": "the model of the training stage before (or the base model)",
    "trained_policy": "the model of the training stage before (there must be one)",
    "base": "the base model",
    "data": "data_prep's output",
    "preference": "the latest preference pairs: a stage's that makes them, else data_prep's preference rows",
    "eval": "the latest evaluation results",
    "registration": "the latest registration",
    "reward_model": "the latest trained reward model",
}
"""What can feed a stage's artifact input, and what a stage's output can provide."""

PARAMETERS = {
    "stage": "the stage's name",
    "settings": "the stage's settings from the spec (JSON)",
    "kind": "the stage's kind (an entry of this registry, e.g. psft), which its name (`stage`) need not be",
    "tracking_uri": "the pipeline parameter tracking_uri",
    "s3_endpoint": "the pipeline parameter s3_endpoint",
    "parent_run_id": "the pipeline's MLflow run (opened by preflight)",
    "workspace": "the run's workspace (a volume every step sees; training stages keep checkpoints there)",
    "lr": "the pipeline parameter <stage>_lr (train stages)",
    "max_steps": "the pipeline parameter <stage>_max_steps (train stages)",
    "nproc": "processes per node, one per accelerator: the pipeline parameter <stage>_gpus_per_node, else 1 "
             "(train and sample stages)",
    "nodes": "the pipeline parameter <stage>_nodes, else 1 (train stages)",
    "launch": "how the stage is launched (JSON): the bounds of nodes and nproc, and the TrainJob's placement when "
              "the spec lets it span nodes (train and sample stages; components/trainjob.py)",
    "kfp_run_id": "the KFP run's id: names the run's TrainJobs, so a retried step reattaches to its own",
    "rewards": "the spec's `rewards` (JSON)",
    "suites": "the spec's `eval_suites` (JSON)",
    "promotion": "the spec's `promotion` (JSON)",
    "registered_model": "the spec's tracking.registered_model",
    "candidate": "the name of the stage that made the policy (base if none)",
    "lineage": "the stages before that made a model, in order, each with the model it started from (JSON "
               "object {name: parent}, parent `base` or an earlier name): their models are <workspace>/<name>/model",
    "data_sources": "the pipeline parameter data_sources",
    "sources_digest": "preflight's fingerprint of the data and the tokenizer (S3 ETags and sizes, local sha256s): "
                      "in a cached step's parameters, it makes the cache key change when the bytes do",
    "base_model": "the pipeline parameter base_model, as a URI: for a step that reads only part of the model "
                  "(the data step: the tokenizer) and fetches just that, where an artifact input is downloaded whole",
    "namespace": "the spec's storage.namespace: where the steps run",
    "spec_name": "the spec's name: with kfp_run_id, the pipeline run's name (`<spec name> <KFP run id>`) a report "
                 "is titled with (KFP substitutes its run id only in a parameter that is the placeholder alone)",
}
"""The component parameters a step is given by name (a component declares those it takes)."""

PARAMETER_TYPES = {"lr": float, "max_steps": int, "nproc": int, "nodes": int}
"""The type of each parameter of PARAMETERS that is not a string."""

KIND_PARAMETERS = {"train": ("lr", "max_steps", "nproc", "launch"), "sample": ("nproc", "launch"), "cpu": ()}
"""The parameters a component of each kind must take: without them the pipeline parameters the kind makes
(`<stage>_lr`, `<stage>_max_steps`, `<stage>_gpus_per_node`) would reach nothing."""

MULTI_NODE_PARAMETERS = ("nodes", "launch", "kfp_run_id")
"""The parameters a stage that runs on several nodes takes and hands to components.step.train_step: the run's node
count (`<stage>_nodes`), the TrainJob's placement, and the run id that names its TrainJob."""

INJECTED_PARAMETERS = {"rewards": "rewards", "suites": "suites", "name": "registered_model", "promotion": "promotion"}
"""A config key the spec's top level fills (Stage.injected) → the component parameter that carries it."""

MODEL_FEEDS = ("policy", "trained_policy", "base", "reward_model")
"""The feeds that are models: they live in the run's workspace, so a step that reads one takes `workspace` (KFP
mounts the workspace only in a step that takes it), as does a step that makes one."""


@dataclass(frozen=True, kw_only=True)
class Input:
    """An artifact input of a stage's component and what feeds it (one of FEEDS)."""

    feed: str
    file_param: str | None = None
    """A component parameter that gets the file inside the fed artifact (e.g. dpo's pairs_file)."""
    optional: bool = False
    """The stage runs without it when no step before provides it (the component's parameter defaults to None):
    e.g. ppo's reward model, read only when a reward names `uri: stage:reward_model`."""


@dataclass(frozen=True, kw_only=True)
class Output:
    """An output artifact of a stage's component and what it provides to later steps (FEEDS), with the file in
    it that holds that (for a feed read as a file)."""

    provides: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One kind of stage."""

    name: str
    """The spec's `stage:` value."""
    module: str
    """The stage's package under components/ (config.py, main.py, component.py, README.md); `posttrain stage
    <module>`."""
    config: str
    """The config class in its config.py."""
    component: str
    """The KFP component (a function of its component.py)."""
    kind: str
    """train, sample or cpu (KINDS)."""
    multi_node: bool = False
    """It can run on several nodes: a train stage whose component hands `nodes`, `launch` and `kfp_run_id` to
    components.step.train_step, which runs its package under torchrun on every node of a TrainJob. A spec may
    give it max_nodes > 1 (<stage>_nodes); any other stage runs on one node."""
    engines: tuple[str, ...] = ()
    """The sampling engines its config's `rollout.engine` may name (ENGINES); none: it has no `rollout` part."""
    lora: bool = False
    """Its config has a `lora` part: it can train low-rank adapters on a frozen base instead of every weight."""
    asynchronous: bool = False
    """Its config has `rollout_worker` and `max_staleness`: a rollout worker process may sample ahead of the
    trainer with weights up to max_staleness versions old (components/training/rollout_worker.py)."""
    gate: str | None = None
    """A component of its component.py that runs after the stage's step when the step returns PROMOTE (register's
    promotion): its artifact inputs are the step's outputs and inputs of the same names, its parameters are given
    by name like a step's."""
    inputs: dict[str, Input] = field(default_factory=dict)
    outputs: dict[str, Output] = field(default_factory=dict)
    wired: dict[str, str] = field(default_factory=dict)
    """Config keys (dotted paths) the pipeline sets, and by what: a spec's settings may not set them."""
    fixed: dict = field(default_factory=dict)
    """Config values of this kind of stage that are not settings (e.g. psft's objective.method)."""
    trains_on: str | None = None
    """The data shape whose train rows the stage reads (sft, prompts or preference): a spec needs a training
    source of that shape, or (preference) a stage before that makes pairs."""
    requires: tuple[str, ...] = ()
    """Top-level spec keys that must be set for this stage (rewards, eval_suites, promotion)."""
    injected: tuple[str, ...] = ()
    """Config keys the spec's top level fills (rewards, suites, name, promotion): checked with the settings."""
    last: bool = False
    """The stage ends the list (register), but for stages that follow its gate (after_gate)."""
    after_gate: bool = False
    """Its step runs after the gate of the stage before it that has one, in the gate's condition: only when that
    stage decided PROMOTE, once the gate has acted (deploy, which serves the champion the gate moved). It may follow
    the last stage."""
    cached: bool = False
    """KFP may reuse the step's outputs when its inputs are the same (data_prep: the sources, the settings and
    `sources_digest`, the fingerprint of the data's and the tokenizer's bytes); every other step runs each time."""
    in_spec: bool = True
    """Listed in a spec's stages (data_prep is not: every pipeline runs it once, cached, after preflight)."""
    headline: tuple[str, str] | None = None
    """The number that says most about the stage's training, for the local run's table: (label, metric key)."""
    package: str = ""
    """The stage's Python package, when it is not components.<module> (a stage that lives outside this
    repository: its package registers it on import)."""

    @property
    def python_package(self) -> str:
        """The package torchrun runs (`python -m <package> --config FILE`) and its modules' prefix."""
        return self.package or f"components.{self.module}"

    @property
    def main(self) -> str:
        return f"{self.python_package}.main"

    @property
    def scaled(self) -> bool:
        """Its step runs one process per accelerator (SCALED_KINDS): it takes nproc and launch."""
        return self.kind in SCALED_KINDS

    @property
    def makes_model(self) -> bool:
        """It provides the policy: a model in <workspace>/<name>/model, evaluated against the ones before it."""
        return any("policy" in out.provides for out in self.outputs.values())

    def config_class(self):
        """The config class, from the stage's config.py (a light module: checking a spec imports no torch)."""
        return getattr(importlib.import_module(f"{self.python_package}.config"), self.config)

    def component_fn(self, name: str | None = None):
        """The stage's KFP component (or another component of its component.py, e.g. its gate)."""
        return getattr(importlib.import_module(f"{self.python_package}.component"), name or self.component)

    def parameters(self) -> set[str]:
        """The names of PARAMETERS the pipeline gives this stage's step (components.stages.PARAMETERS)."""
        out = set(PARAMETERS) - {"lr", "max_steps", "nproc", "launch", "nodes"}
        out |= set(KIND_PARAMETERS[self.kind])
        if self.multi_node:
            out |= set(MULTI_NODE_PARAMETERS)
        return out

    def needs(self) -> dict[str, str]:
        """Each component parameter this stage's kind and capabilities need → why."""
        out = {"settings": "it carries the stage's settings from the spec"}
        if self.in_spec:
            out["stage"] = "a spec may list the stage twice under two names: each step has its own directory and run"
        out |= {p: f"a {self.kind} stage is given it" for p in KIND_PARAMETERS[self.kind]}
        if self.multi_node:
            out |= {p: "the stage runs on several nodes (multi_node)" for p in MULTI_NODE_PARAMETERS}
        if self.makes_model or any(inp.feed in MODEL_FEEDS for inp in self.inputs.values()):
            out["workspace"] = "the stage reads or makes a model, which lives in the run's workspace"
        out |= {INJECTED_PARAMETERS[k]: f"the spec's top level fills its config's `{k}`" for k in self.injected}
        for name, inp in self.inputs.items():
            if inp.file_param:
                out[inp.file_param] = f"the file inside its input {name}"
        return out


_PREV = "the pipeline: the model of the training stage before, or base_model"
_OUT = "the pipeline: a directory of the run's workspace or an output artifact"
_PROMPTS = "the pipeline: data_prep's prompts rows (a source of shape prompts in data.sources)"
_TRAINED = {"trained_model": Output(provides=("policy", "trained_policy"))}


def _sft(method: str) -> Stage:
    return Stage(name=method, module="sft", config="SFTConfig", component="sft", kind="train",
                 inputs={"model": Input(feed="policy"), "data": Input(feed="data")}, outputs=_TRAINED,
                 wired={"model": _PREV, "train_data": "the pipeline: data_prep's sft rows", "output_dir": _OUT,
                        "objective.method": "the stage kind (sft, psft or sft_kl)"},
                 fixed={"objective": {"method": method}}, trains_on="sft", headline=("nll", "final/nll"),
                 multi_node=True, lora=True)


_BUILTIN = [
    Stage(name="data_prep", module="data_prep", config="DataPrepConfig", component="data_prep", kind="cpu",
          outputs={"data": Output(provides=("data", "preference"), files={"preference": "preference.train.jsonl"})},
          wired={"tokenizer": "the pipeline: base_model", "output_dir": _OUT}, cached=True, in_spec=False),
    _sft("sft"), _sft("psft"), _sft("sft_kl"),
    Stage(name="reward_scoring", module="reward_scoring", config="RewardScoringConfig", component="reward_scoring",
          kind="sample", inputs={"model": Input(feed="policy"), "data": Input(feed="data")},
          outputs={"scored": Output(provides=("preference",), files={"preference": "pairs.jsonl"})},
          wired={"model": _PREV, "prompts.path": _PROMPTS, "prompts.task": _PROMPTS,
                 "rewards": "the spec's `rewards`", "output_dir": _OUT},
          trains_on="prompts", requires=("rewards",), injected=("rewards",), headline=("pairs", "pairs"),
          engines=ENGINES),
    Stage(name="dpo", module="dpo", config="DPOConfig", component="dpo", kind="train",
          inputs={"model": Input(feed="policy"), "pairs": Input(feed="preference", file_param="pairs_file")},
          outputs=_TRAINED,
          wired={"model": _PREV, "train_data": "the pipeline: reward_scoring's pairs, or data_prep's preference rows",
                 "output_dir": _OUT},
          trains_on="preference", headline=("pref acc", "final/rewards/accuracies"), multi_node=True, lora=True),
    Stage(name="reward_model", module="reward_model", config="RewardModelConfig", component="reward_model",
          kind="train",
          inputs={"model": Input(feed="policy"), "pairs": Input(feed="preference", file_param="pairs_file")},
          outputs={"trained_model": Output(provides=("reward_model",))},
          wired={"model": _PREV, "train_data": "the pipeline: reward_scoring's pairs, or data_prep's preference rows",
                 "output_dir": _OUT},
          trains_on="preference", headline=("rm acc", "final/eval/accuracy"), multi_node=True),
    Stage(name="grpo", module="grpo", config="GRPOConfig", component="grpo", kind="train",
          inputs={"model": Input(feed="policy"), "data": Input(feed="data")}, outputs=_TRAINED,
          wired={"model": _PREV, "prompts.path": _PROMPTS, "prompts.task": _PROMPTS,
                 "rewards": "the spec's `rewards`", "output_dir": _OUT},
          trains_on="prompts", requires=("rewards",), injected=("rewards",), headline=("reward", "final/reward"),
          multi_node=True, engines=ENGINES, lora=True, asynchronous=True),
    Stage(name="ppo", module="ppo", config="PPOConfig", component="ppo", kind="train",
          inputs={"model": Input(feed="policy"), "data": Input(feed="data"),
                  "reward_model": Input(feed="reward_model", optional=True)},
          outputs=_TRAINED,
          wired={"model": _PREV, "prompts.path": _PROMPTS, "prompts.task": _PROMPTS, "output_dir": _OUT},
          trains_on="prompts", injected=("rewards",), headline=("score", "final/objective/scores"),
          multi_node=True, engines=ENGINES, lora=True, asynchronous=True),
    Stage(name="evaluate", module="evaluate", config="EvaluateConfig", component="evaluate", kind="sample",
          inputs={"model": Input(feed="policy"), "base_model": Input(feed="base")},
          outputs={"results": Output(provides=("eval",))},
          wired={"model": "the pipeline: the last training stage's model", "name": "the pipeline: that stage's name",
                 "baselines": "the pipeline: base_model and every training stage's model",
                 "base_model": "the pipeline: base_model", "suites": "the spec's `eval_suites`",
                 "rewards": "the spec's `rewards`", "training_metrics": "the pipeline: each training stage's metrics",
                 "run_name": "the pipeline: the run's name, <spec name> <KFP run id>", "output_dir": _OUT},
          requires=("eval_suites",), injected=("rewards", "suites"), engines=ENGINES),
    Stage(name="register", module="register", config="RegisterConfig", component="register", kind="cpu",
          inputs={"model": Input(feed="trained_policy"), "eval_results": Input(feed="eval")},
          outputs={"registration": Output(provides=("registration",))},
          wired={"model": "the pipeline: the last training stage's model", "name": "tracking.registered_model",
                 "eval": "the pipeline: the evaluate stage's eval.json",
                 "promotion": "the spec's `promotion` (applied by the promotion gate)",
                 "parent_run_id": "the pipeline's MLflow run", "output_dir": _OUT},
          requires=("promotion",), injected=("name", "promotion"), last=True, gate="promote"),
    Stage(name="deploy", module="deploy", config="DeployConfig", component="deploy", kind="cpu",
          inputs={"registration": Input(feed="registration")},
          wired={"name": "tracking.registered_model", "version": "the pipeline: the version register registered",
                 "namespace": "storage.namespace", "output_dir": _OUT},
          injected=("name",), after_gate=True),
]

STAGES: dict[str, Stage] = {}
"""Every stage by name, in the order the bundled ones are listed."""


def register(stage: Stage, *, check: bool = True) -> Stage:
    """Add a stage kind (or replace one of the same name); returns it. The entry is checked against its
    component's signature (check_contract): a stage whose component cannot take what the pipeline gives it is an
    error here, not a parameter the DAG drops. `check=False` defers that to compile time (pipelines.posttrain checks
    every stage it compiles): the bundled entries, so that importing the registry does not import kfp (about a
    second, with its Kubernetes client) in every step, rank and spec check; tests/unit/test_stage_contract.py
    checks each of them."""
    if stage.kind not in KINDS:
        raise ValueError(f"stage {stage.name}: kind={stage.kind!r} is invalid: one of {', '.join(KINDS)}")
    if stage.multi_node and stage.kind != "train":
        raise ValueError(f"stage {stage.name}: multi_node=True is invalid for a {stage.kind} stage: only a train "
                         "stage runs on several nodes")
    if unknown := sorted(set(stage.engines) - set(ENGINES)):
        raise ValueError(f"stage {stage.name}: engines {unknown} are invalid: among {', '.join(ENGINES)}")
    if stage.trains_on is not None and stage.trains_on not in SHAPES:
        raise ValueError(f"stage {stage.name}: trains_on={stage.trains_on!r} is invalid: one of {', '.join(SHAPES)}")
    for name, inp in stage.inputs.items():
        if inp.feed not in FEEDS:
            raise ValueError(f"stage {stage.name}: input {name} is fed by {inp.feed!r}: one of {', '.join(FEEDS)}")
    for name, out in stage.outputs.items():
        if unknown := set(out.provides) - set(FEEDS):
            raise ValueError(f"stage {stage.name}: output {name} provides {sorted(unknown)}: not among FEEDS")
    if unknown := sorted(set(stage.injected) - set(INJECTED_PARAMETERS)):
        raise ValueError(f"stage {stage.name}: injected {unknown} are invalid: among {', '.join(INJECTED_PARAMETERS)}")
    if check and os.environ.get("_KFP_RUNTIME") != "true":  # in a KFP step kfp.dsl has no @component to import
        check_contract(stage)  # components with: the pipeline that runs the step was checked where it was compiled
    STAGES[stage.name] = stage
    return stage


_KFP_TYPES = {str: "String", int: "Integer", float: "Float"}


def check_contract(stage: Stage) -> None:
    """The stage's component takes what its kind and capabilities need (Stage.needs), an artifact input for each of
    the entry's inputs and an output for each of its outputs, and nothing that no step can fill: every other
    parameter is one of PARAMETERS the stage is given (Stage.parameters) or has a default. A stage that runs under
    torchrun (SCALED_KINDS) has a __main__ module. ValueError naming the stage and the parameter otherwise."""
    from kfp.dsl.types.type_utils import is_parameter_type

    where = f"stage {stage.name}: component {stage.python_package}.component.{stage.component}"
    try:
        component = stage.component_fn()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where} cannot be imported: {e}") from None
    declared = component.component_spec.inputs or {}
    made = component.component_spec.outputs or {}

    def check_type(name: str, expected: type) -> None:
        got = declared[name].type
        if got != _KFP_TYPES[expected]:
            raise ValueError(f"{where}: parameter {name!r} is {got}: {expected.__name__} expected")

    for name, inp in stage.inputs.items():
        got = declared.get(name)
        if got is None or is_parameter_type(got.type):
            raise ValueError(f"{where} lacks the artifact input {name!r} (the entry's input fed by {inp.feed})")
        if inp.optional and not got.optional:
            raise ValueError(f"{where}: input {name!r} needs the default None: the entry's input is optional")
    for name, out in stage.outputs.items():
        if name not in made or is_parameter_type(made[name].type):
            raise ValueError(f"{where} lacks the output artifact {name!r} (it provides {', '.join(out.provides)})")
    for name, why in stage.needs().items():
        if name not in declared:
            raise ValueError(f"{where} lacks the parameter {name!r}: {why}")
    file_params = {inp.file_param for inp in stage.inputs.values() if inp.file_param}
    given = stage.parameters()
    for name, got in declared.items():
        if name in stage.inputs:
            continue
        if name in file_params or name in given:
            check_type(name, PARAMETER_TYPES.get(name, str))
        elif not got.optional:
            why = (f"PARAMETERS gives {name!r} to other stages, not to a {stage.kind} stage"
                   + ("" if stage.multi_node else " on one node") if name in PARAMETERS
                   else "not one of PARAMETERS, an input of the entry or a file_param")
            raise ValueError(f"{where}: parameter {name!r} is filled by nothing ({why}) and has no default")
    if stage.gate:
        _check_gate(stage, where, made, given)
    _check_config(stage)
    if stage.scaled:
        import importlib.util

        if importlib.util.find_spec(f"{stage.python_package}.__main__") is None:
            raise ValueError(f"stage {stage.name}: {stage.python_package} has no __main__.py: a {stage.kind} stage "
                             "runs as `python -m <package> --config FILE` under torchrun")


def _check_config(stage: Stage) -> None:
    """The config class exists in the stage's config.py, `run` in its main.py, and the capabilities the entry
    declares are what the config offers: `lora` a `lora` part, `engines` a `rollout` part whose engine takes each,
    `asynchronous` the keys max_staleness and rollout_worker."""
    import dataclasses
    import importlib.util

    try:
        fields = {f.name: f for f in dataclasses.fields(stage.config_class())}
    except (ImportError, AttributeError, TypeError) as e:
        raise ValueError(f"stage {stage.name}: config {stage.python_package}.config.{stage.config} cannot be "
                         f"loaded as a dataclass: {e}") from None
    if importlib.util.find_spec(stage.main) is None:
        raise ValueError(f"stage {stage.name}: {stage.main} does not exist: it runs the stage (`run`, `main`)")
    if stage.lora != ("lora" in fields):
        raise ValueError(f"stage {stage.name}: lora={stage.lora} is invalid: its config "
                         f"{'has' if 'lora' in fields else 'has no'} `lora` part")
    if bool(stage.engines) != ("rollout" in fields):
        raise ValueError(f"stage {stage.name}: engines={stage.engines} is invalid: its config "
                         f"{'has' if 'rollout' in fields else 'has no'} `rollout` part")
    if stage.asynchronous != ("max_staleness" in fields and "rollout_worker" in fields):
        raise ValueError(f"stage {stage.name}: asynchronous={stage.asynchronous} is invalid: its config "
                         f"{'has' if 'max_staleness' in fields else 'has no'} `max_staleness` and `rollout_worker`")


def _check_gate(stage: Stage, where: str, made: dict, given: set[str]) -> None:
    """The gate runs on the step's decision (its returned string) and takes only what it can be given."""
    if made.get("Output") is None or made["Output"].type != "String":
        raise ValueError(f"{where} returns no decision (a str): its gate {stage.gate} runs when it returns {PROMOTE!r}")
    try:
        gate = stage.component_fn(stage.gate)
    except AttributeError:
        raise ValueError(f"stage {stage.name}: gate {stage.gate!r} is not a component of "
                         f"{stage.python_package}.component") from None
    for name, got in (gate.component_spec.inputs or {}).items():
        if name not in stage.outputs and name not in stage.inputs and name not in given and not got.optional:
            raise ValueError(f"stage {stage.name}: gate {stage.gate}: parameter {name!r} is filled by nothing (not "
                             "an output or input of the stage, nor one of PARAMETERS) and has no default")


def unregister(name: str) -> None:
    STAGES.pop(name, None)


for _stage in _BUILTIN:
    register(_stage, check=False)


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(spec_kinds())}") from None


def providers(feed: str) -> list[Stage]:
    """The stages whose outputs provide `feed` (FEEDS), in registry order."""
    return [s for s in STAGES.values() if any(feed in out.provides for out in s.outputs.values())]


def data_stage() -> Stage:
    """The stage every pipeline runs once before the spec's stages (not in a spec's list), which provides `data`:
    its settings are the spec's `data`."""
    found = [s for s in providers("data") if not s.in_spec]
    if len(found) != 1:
        raise ValueError(f"the registry needs exactly one stage that provides data and is not listed in specs; "
                         f"found {', '.join(s.name for s in found) or 'none'}")
    return found[0]


def spec_kinds() -> list[str]:
    """The stage kinds a spec may list."""
    return [s.name for s in STAGES.values() if s.in_spec]


def modules() -> dict[str, str]:
    """Each stage package's command (`posttrain stage NAME`) → its main module."""
    return {s.module: s.main for s in STAGES.values()}
