"""The stage registry: the one place that says what each stage of a workflow is.

A stage is a folder under components/ (main.py: its config class, `run` and command line; component.py: its
KFP component; README.md: its keys) plus one `Stage` entry here. Everything else derives from the entry:
`posttrain stage NAME`, the spec's stage kinds and checks, the DAG's wiring (each input from what an earlier
step provides, each output provided to later ones), the local run's table, the models evaluate compares, and
the docs tests. A stage added at run time (`register(Stage(...))`, e.g. from a test or a plugin) is a stage
like the bundled ones.

How a step is wired (pipelines/posttrain.py): the DAG keeps, for each thing a step can provide (a model, the
data, preference pairs, eval results, a registration), the latest output that provides it. A stage's `inputs`
name the component's artifact inputs and what feeds each; its `outputs` name the component's outputs and what
each provides. The component's parameters are filled by name from what the pipeline has (see PARAMETERS):
`settings` (the stage's settings as JSON), `stage`, `lr`, `max_steps`, `rewards`, `suites`, ...
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

KINDS = ("train", "sample", "cpu")
"""train: trains a model (torchrun with one rank per accelerator; `<stage>_lr` and `<stage>_max_steps` become
pipeline parameters); sample: samples (torchrun with one rank per accelerator, each a shard of the prompts, on one
node); cpu: the runtime image."""

SCALED_KINDS = ("train", "sample")
"""The kinds whose step runs one process per accelerator of its resources (torchrun when there are several):
their component takes `nproc` (the run parameter <stage>_gpus_per_node) and `launch` (its bounds)."""

MULTI_NODE_KINDS = ("train",)
"""The kinds a spec may spread over several nodes (a Kubeflow Trainer TrainJob; <stage>_nodes)."""

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
                  "(data_prep: the tokenizer) and fetches just that, where an artifact input is downloaded whole",
}
"""The component parameters a step is given by name (a component declares those it takes)."""


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
    """The stage's package under components/ (main.py, component.py, README.md); `posttrain stage <module>`."""
    config: str
    """The config class in its main.py."""
    component: str
    """The KFP component (a function of its component.py)."""
    kind: str
    """train, sample or cpu (KINDS)."""
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
    """The stage ends the list (register)."""
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
    def main(self) -> str:
        return f"{self.package or 'components.' + self.module}.main"

    @property
    def scaled(self) -> bool:
        """Its step runs one process per accelerator (SCALED_KINDS): it takes nproc and launch."""
        return self.kind in SCALED_KINDS

    @property
    def multi_node(self) -> bool:
        """A spec may spread it over several nodes (MULTI_NODE_KINDS)."""
        return self.kind in MULTI_NODE_KINDS

    @property
    def makes_model(self) -> bool:
        """It provides the policy: a model in <workspace>/<name>/model, evaluated against the ones before it."""
        return any("policy" in out.provides for out in self.outputs.values())

    def config_class(self):
        return getattr(importlib.import_module(self.main), self.config)

    def component_fn(self):
        component = f"{self.package or 'components.' + self.module}.component"
        return getattr(importlib.import_module(component), self.component)


_PREV = "the pipeline: the model of the training stage before, or base_model"
_OUT = "the pipeline: a directory of the run's workspace or an output artifact"
_PROMPTS = "the pipeline: data_prep's prompts rows (a source of shape prompts in data.sources)"
_TRAINED = {"trained_model": Output(provides=("policy", "trained_policy"))}


def _sft(method: str) -> Stage:
    return Stage(name=method, module="sft", config="SFTConfig", component="sft", kind="train",
                 inputs={"model": Input(feed="policy"), "data": Input(feed="data")}, outputs=_TRAINED,
                 wired={"model": _PREV, "train_data": "the pipeline: data_prep's sft rows", "output_dir": _OUT,
                        "objective.method": "the stage kind (sft, psft or sft_kl)"},
                 fixed={"objective": {"method": method}}, trains_on="sft", headline=("nll", "final/nll"))


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
          trains_on="prompts", requires=("rewards",), injected=("rewards",), headline=("pairs", "pairs")),
    Stage(name="dpo", module="dpo", config="DPOConfig", component="dpo", kind="train",
          inputs={"model": Input(feed="policy"), "pairs": Input(feed="preference", file_param="pairs_file")},
          outputs=_TRAINED,
          wired={"model": _PREV, "train_data": "the pipeline: reward_scoring's pairs, or data_prep's preference rows",
                 "output_dir": _OUT},
          trains_on="preference", headline=("pref acc", "final/rewards/accuracies")),
    Stage(name="reward_model", module="reward_model", config="RewardModelConfig", component="reward_model",
          kind="train",
          inputs={"model": Input(feed="policy"), "pairs": Input(feed="preference", file_param="pairs_file")},
          outputs={"trained_model": Output(provides=("reward_model",))},
          wired={"model": _PREV, "train_data": "the pipeline: reward_scoring's pairs, or data_prep's preference rows",
                 "output_dir": _OUT},
          trains_on="preference", headline=("rm acc", "final/eval/accuracy")),
    Stage(name="grpo", module="grpo", config="GRPOConfig", component="grpo", kind="train",
          inputs={"model": Input(feed="policy"), "data": Input(feed="data")}, outputs=_TRAINED,
          wired={"model": _PREV, "prompts.path": _PROMPTS, "prompts.task": _PROMPTS,
                 "rewards": "the spec's `rewards`", "output_dir": _OUT},
          trains_on="prompts", requires=("rewards",), injected=("rewards",), headline=("reward", "final/reward")),
    Stage(name="ppo", module="ppo", config="PPOConfig", component="ppo", kind="train",
          inputs={"model": Input(feed="policy"), "data": Input(feed="data"),
                  "reward_model": Input(feed="reward_model", optional=True)},
          outputs=_TRAINED,
          wired={"model": _PREV, "prompts.path": _PROMPTS, "prompts.task": _PROMPTS, "output_dir": _OUT},
          trains_on="prompts", injected=("rewards",), headline=("score", "final/objective/scores")),
    Stage(name="evaluate", module="evaluate", config="EvaluateConfig", component="evaluate", kind="sample",
          inputs={"model": Input(feed="policy"), "base_model": Input(feed="base")},
          outputs={"results": Output(provides=("eval",))},
          wired={"model": "the pipeline: the last training stage's model", "name": "the pipeline: that stage's name",
                 "baselines": "the pipeline: base_model and every training stage's model",
                 "base_model": "the pipeline: base_model", "suites": "the spec's `eval_suites`",
                 "rewards": "the spec's `rewards`", "training_metrics": "the pipeline: each training stage's metrics",
                 "output_dir": _OUT},
          requires=("eval_suites",), injected=("rewards", "suites")),
    Stage(name="register", module="register", config="RegisterConfig", component="register", kind="cpu",
          inputs={"model": Input(feed="trained_policy"), "eval_results": Input(feed="eval")},
          outputs={"registration": Output(provides=("registration",))},
          wired={"model": "the pipeline: the last training stage's model", "name": "tracking.registered_model",
                 "eval": "the pipeline: the evaluate stage's eval.json",
                 "promotion": "the spec's `promotion` (applied by the promotion gate)",
                 "parent_run_id": "the pipeline's MLflow run", "output_dir": _OUT},
          requires=("promotion",), injected=("name", "promotion"), last=True),
]

STAGES: dict[str, Stage] = {}
"""Every stage by name, in the order the bundled ones are listed."""


def register(stage: Stage) -> Stage:
    """Add a stage kind (or replace one of the same name); returns it."""
    if stage.kind not in KINDS:
        raise ValueError(f"stage {stage.name}: kind={stage.kind!r} is invalid: one of {', '.join(KINDS)}")
    for name, inp in stage.inputs.items():
        if inp.feed not in FEEDS:
            raise ValueError(f"stage {stage.name}: input {name} is fed by {inp.feed!r}: one of {', '.join(FEEDS)}")
    for name, out in stage.outputs.items():
        if unknown := set(out.provides) - set(FEEDS):
            raise ValueError(f"stage {stage.name}: output {name} provides {sorted(unknown)}: not among FEEDS")
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    STAGES.pop(name, None)


for _stage in _BUILTIN:
    register(_stage)


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(spec_kinds())}") from None


def spec_kinds() -> list[str]:
    """The stage kinds a spec may list."""
    return [s.name for s in STAGES.values() if s.in_spec]


def modules() -> dict[str, str]:
    """Each stage package's command (`posttrain stage NAME`) → its main module."""
    return {s.module: s.main for s in STAGES.values()}
