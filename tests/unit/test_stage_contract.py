"""The contract between a stage's registry entry and its KFP component: `register()` refuses a component that
lacks what the stage's kind and capabilities need, or that takes a parameter nothing fills; the spec check
refuses several nodes for a stage that does not declare them; and every bundled stage keeps the contract."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from components import stages
from components.stages import KIND_PARAMETERS, MULTI_NODE_PARAMETERS, PARAMETERS, Input, Output, Stage

ROOT = Path(__file__).resolve().parents[2]

TYPES = {"lr": "float", "max_steps": "int", "nproc": "int", "nodes": "int"}
"""Each parameter's annotation in a generated component (str otherwise)."""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """make(name, kind, params, **entry) writes a package `<name>` whose component.py has one component with
    `params` (parameter names, or `name: type = default`; `model`/`trained_model` are its artifacts), and returns
    the Stage entry. Every package and stage made is removed afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(name: str, kind: str, params: list[str], *, main: bool = True, config: str | None = None,
             types: dict[str, str] | None = None, **entry) -> Stage:
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        if main:
            (package / "__main__.py").write_text("")
        if config != "":  # "": no config.py at all; None: one that offers what the entry declares
            (package / "config.py").write_text(default_config(entry) if config is None else config)
        (package / "main.py").write_text("def run(cfg):\n    return {}\n")
        annotations = {**TYPES, **(types or {})}
        args = ["model: Input[Model]", *(f"{p}: {annotations.get(p, 'str')}" for p in params if ":" not in p),
                "trained_model: Output[Model]", *(p for p in params if ":" in p)]
        (package / "component.py").write_text(
            "from kfp import dsl\nfrom kfp.dsl import Input, Model, Output\n\n\n"
            "@dsl.component(base_image='python:3.11', install_kfp_package=False)\n"
            f"def {name}({', '.join(args)}):\n    pass\n")
        made.append(name)
        return Stage(name=name, module=name, package=name, config="PluginConfig", component=name, kind=kind,
                     inputs={"model": Input(feed="policy")},
                     outputs={"trained_model": Output(provides=("policy", "trained_policy"))},
                     wired={"model": "the pipeline", "output_dir": "the pipeline"}, **entry)

    yield make
    for name in made:
        stages.unregister(name)
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


def default_config(entry: dict) -> str:
    """A config.py whose PluginConfig offers what the entry declares (a `lora` part, a `rollout` part)."""
    return ("from dataclasses import dataclass, field\n\n\n@dataclass(kw_only=True)\nclass PluginConfig:\n"
            "    output_dir: str = ''\n"
            + ("    lora: dict = field(default_factory=dict)\n" if entry.get("lora") else "")
            + ("    rollout: dict = field(default_factory=dict)\n" if entry.get("engines") else ""))


def needed(kind: str, multi_node: bool = False) -> list[str]:
    """What a plugin of `kind` (reading and making a model) must take."""
    return list(dict.fromkeys(["settings", "stage", "workspace", *KIND_PARAMETERS[kind],
                               *(MULTI_NODE_PARAMETERS if multi_node else ())]))


CASES = [(kind, multi, param) for kind, multi in (("train", False), ("train", True), ("sample", False), ("cpu", False))
         for param in needed(kind, multi)]


@pytest.mark.parametrize("kind, multi_node, missing", CASES, ids=[f"{k}{'-multi' if m else ''}-without-{p}"
                                                                   for k, m, p in CASES])
def test_a_stage_lacking_a_needed_parameter_is_refused_at_register(plugin, kind, multi_node, missing):
    params = needed(kind, multi_node)
    full = plugin(f"full_{kind}_{int(multi_node)}_{missing}", kind, params, multi_node=multi_node)
    assert stages.register(full) is full  # the whole signature is accepted...
    lacking = plugin(f"lacking_{kind}_{int(multi_node)}_{missing}", kind, [p for p in params if p != missing],
                     multi_node=multi_node)
    with pytest.raises(ValueError, match=rf"^stage {lacking.name}: component .* lacks the parameter '{missing}'"):
        stages.register(lacking)  # ...and without one parameter it is refused, naming the stage and the parameter
    assert lacking.name not in stages.STAGES


@pytest.mark.parametrize("injected, param", [("rewards", "rewards"), ("suites", "suites"),
                                             ("name", "registered_model"), ("promotion", "promotion")])
def test_what_the_spec_injects_needs_its_parameter(plugin, injected, param):
    entry = plugin(f"inj_{injected}", "cpu", needed("cpu"), injected=(injected,))
    with pytest.raises(ValueError, match=rf"stage inj_{injected}: .* lacks the parameter '{param}': the spec's top "
                                         rf"level fills its config's `{injected}`"):
        stages.register(entry)
    stages.register(plugin(f"inj_ok_{injected}", "cpu", [*needed("cpu"), param], injected=(injected,)))


def test_an_input_a_file_param_and_an_output_must_be_in_the_signature(plugin):
    entry = plugin("no_pairs", "cpu", needed("cpu"))
    with pytest.raises(ValueError, match=r"stage no_pairs: .* lacks the artifact input 'pairs' \(the entry's input "
                                         r"fed by preference\)"):
        stages.register(dataclasses.replace(entry, inputs={**entry.inputs, "pairs": Input(feed="preference")}))
    with pytest.raises(ValueError, match=r"lacks the parameter 'pairs_file': the file inside its input model"):
        stages.register(dataclasses.replace(entry, inputs={"model": Input(feed="policy", file_param="pairs_file")}))
    with pytest.raises(ValueError, match=r"lacks the output artifact 'scored'"):
        stages.register(dataclasses.replace(entry, outputs={"scored": Output(provides=("preference",))}))
    with pytest.raises(ValueError, match=r"input 'model' needs the default None: the entry's input is optional"):
        stages.register(dataclasses.replace(entry, inputs={"model": Input(feed="policy", optional=True)}))


def test_a_parameter_nothing_fills_is_refused(plugin):
    with pytest.raises(ValueError, match=r"stage odd: .* parameter 'temperature' is filled by nothing \(not one of "
                                         r"PARAMETERS, an input of the entry or a file_param\) and has no default"):
        stages.register(plugin("odd", "cpu", [*needed("cpu"), "temperature"]))
    # one of PARAMETERS that this kind of stage is not given: lr is a train stage's, nodes a multi-node stage's
    with pytest.raises(ValueError, match=r"stage cpu_lr: .* parameter 'lr' is filled by nothing \(PARAMETERS gives "
                                         r"'lr' to other stages, not to a cpu stage on one node\)"):
        stages.register(plugin("cpu_lr", "cpu", [*needed("cpu"), "lr"]))
    with pytest.raises(ValueError, match=r"stage one_node: .* parameter 'nodes' is filled by nothing"):
        stages.register(plugin("one_node", "train", [*needed("train"), "nodes"]))
    with pytest.raises(ValueError, match=r"stage int_lr: .* parameter 'lr' is Integer: float expected"):
        stages.register(plugin("int_lr", "train", needed("train"), types={"lr": "int"}))
    # a parameter with a default may be anything: the component fills it itself
    stages.register(plugin("defaulted", "cpu", [*needed("cpu"), "temperature: float = 1.0"]))


def test_an_entry_registered_unchecked_is_checked_when_compiled(plugin, tmp_path):
    """The bundled entries are registered with check=False (importing the registry imports no kfp): compiling a
    pipeline checks every stage it places."""
    from pipelines.posttrain import compile_spec
    from pipelines.spec import parse_spec

    config = ("from dataclasses import dataclass\n\n\n@dataclass(kw_only=True)\nclass PluginConfig:\n"
              "    model: str\n    output_dir: str\n")
    stages.register(plugin("unchecked", "cpu", ["stage", "workspace"], config=config), check=False)
    data = copy.deepcopy(CLUSTER_7B)
    data["stages"].insert(1, {"stage": "unchecked"})
    spec = parse_spec(data, "7b.yaml")
    with pytest.raises(ValueError, match=r"^stage unchecked: .* lacks the parameter 'settings': it carries the "
                                         r"stage's settings from the spec$"):
        compile_spec(spec, tmp_path / "7b.yaml")


def test_capabilities_are_checked_at_register(plugin):
    with pytest.raises(ValueError, match=r"stage multi_sampler: multi_node=True is invalid for a sample stage: only "
                                         r"a train stage runs on several nodes"):
        stages.register(plugin("multi_sampler", "sample", needed("sample", True), multi_node=True))
    with pytest.raises(ValueError, match=r"stage sglang: engines \['sglang'\] are invalid: among hf, vllm"):
        stages.register(plugin("sglang", "sample", needed("sample"), engines=("sglang",)))
    with pytest.raises(ValueError, match=r"stage no_main: no_main has no __main__.py: a train stage runs as "
                                         r"`python -m <package> --config FILE` under torchrun"):
        stages.register(plugin("no_main", "train", needed("train"), main=False))
    with pytest.raises(ValueError, match=r"stage gated: .* returns no decision \(a str\): its gate gate runs when it "
                                         r"returns 'promote'"):
        stages.register(plugin("gated", "cpu", needed("cpu"), gate="gate"))


def test_the_config_and_the_declared_capabilities_are_checked_at_register(plugin):
    with pytest.raises(ValueError, match=r"stage no_config: config no_config.config.PluginConfig cannot be loaded as "
                                         r"a dataclass: No module named 'no_config.config'"):
        stages.register(plugin("no_config", "cpu", needed("cpu"), config=""))
    lora = plugin("says_lora", "train", needed("train"), lora=True, config=default_config({}))
    with pytest.raises(ValueError, match=r"stage says_lora: lora=True is invalid: its config has no `lora` part"):
        stages.register(lora)
    quiet = plugin("hides_rollout", "sample", needed("sample"), config=default_config({"engines": ("hf",)}))
    with pytest.raises(ValueError, match=r"stage hides_rollout: engines=\(\) is invalid: its config has `rollout`"):
        stages.register(quiet)
    assert stages.register(plugin("fine", "train", needed("train"), lora=True)).lora


# --- every bundled stage


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_bundled_stage_keeps_the_contract(name):
    stage = stages.STAGES[name]
    stages.check_contract(stage)  # raises on a broken contract
    declared = set(stage.component_fn().component_spec.inputs)
    assert set(stage.needs()) <= declared
    fields = {f.name: f for f in dataclasses.fields(stage.config_class())}
    # LoRA and the rollout engines are what the stage's config offers
    assert stage.lora == ("lora" in fields), name
    assert bool(stage.engines) == ("rollout" in fields), name
    if stage.engines:
        rollout = fields["rollout"].default_factory
        for engine in stage.engines:
            assert rollout(engine=engine).engine == engine
    if stage.multi_node:  # it hands nodes, launch and kfp_run_id to train_step, which runs it on every node
        assert stage.kind == "train" and set(MULTI_NODE_PARAMETERS) <= declared
        body = (ROOT / "components" / stage.module / "component.py").read_text()
        assert re.search(r"train_step\(.*nodes=nodes, launch=launch, kfp_run_id=kfp_run_id", body, re.S), name


def test_the_bundled_training_stages_all_run_on_several_nodes():
    assert [s.name for s in stages.STAGES.values() if s.kind == "train" and not s.multi_node] == []


# --- the spec check: several nodes only for a stage that declares them


CLUSTER_7B = yaml.safe_load((ROOT / "pipelines/specs/cluster-7b.yaml").read_text())


def with_ppo() -> dict:
    """cluster-7b with ppo in place of grpo (ppo's own settings, ZeRO-3 on the same pool)."""
    data = copy.deepcopy(CLUSTER_7B)
    at = next(i for i, s in enumerate(data["stages"]) if s["stage"] == "grpo")
    data["stages"][at] = {"stage": "ppo", "settings": {"train": {"max_steps": 500, "lr": 1.0e-6, "zero_stage": 3,
                                                                  "precision": "bf16-mixed"}}}
    return data


@pytest.mark.parametrize("name", [s.name for s in stages.STAGES.values() if s.in_spec and not s.multi_node])
def test_a_stage_that_runs_on_one_node_is_refused_max_nodes_2(name):
    from pipelines.spec import SpecError, parse_spec

    data = copy.deepcopy(CLUSTER_7B)
    if not any(s["stage"] == name for s in data["stages"]):
        data["stages"].insert(1, {"stage": name})
    at = next(i for i, s in enumerate(data["stages"]) if s["stage"] == name)
    data["stages"][at]["resources"] = {"max_nodes": 2}
    with pytest.raises(SpecError) as e:
        parse_spec(data, "7b.yaml")
    message = str(e.value)
    assert message.count("\n") == 0 and message.startswith(
        f"7b.yaml: stages[{at}].resources.max_nodes: 2 is invalid for the {name} stage: only a stage that declares "
        "multi_node runs on several nodes"), message


def test_a_training_stage_without_multi_node_on_a_multi_node_pool_names_resources_max_nodes(plugin):
    from pipelines.spec import SpecError, parse_spec

    config = ("from dataclasses import dataclass, field\n\nfrom components.training.config import TrainConfig\n\n\n"
              "@dataclass(kw_only=True)\nclass PluginConfig:\n    model: str\n    output_dir: str\n"
              "    train: TrainConfig = field(default_factory=TrainConfig)\n")
    stages.register(plugin("single", "train", needed("train"), config=config))
    data = copy.deepcopy(CLUSTER_7B)
    data["stages"].insert(1, {"stage": "single"})
    with pytest.raises(SpecError, match=r"^7b.yaml: resources.max_nodes: 4 is invalid for the single stage: only a "
                                        r"stage that declares multi_node runs on several nodes \(.*\); 1$"):
        parse_spec(data, "7b.yaml")
    # declaring multi_node takes a component that can be given the nodes...
    with pytest.raises(ValueError, match=r"stage single: .* lacks the parameter 'nodes'"):
        stages.register(dataclasses.replace(stages.STAGES["single"], multi_node=True))
    # ...and then the stage takes the pool's nodes
    stages.register(plugin("multi", "train", needed("train", True), config=config, multi_node=True))
    data["stages"][1] = {"stage": "multi"}
    assert parse_spec(data, "7b.yaml").stage_resources(parse_spec(data, "7b.yaml").stages[1]).most_nodes == 4


def test_a_rollout_engine_the_stage_does_not_declare_is_refused(plugin):
    from pipelines.spec import SpecError, parse_spec

    config = ("from dataclasses import dataclass, field\n\nfrom components.training.config import RolloutEngine\n\n\n"
              "@dataclass(kw_only=True)\nclass PluginConfig:\n    model: str\n    output_dir: str\n"
              "    rollout: RolloutEngine = field(default_factory=RolloutEngine)\n")
    stages.register(plugin("hf_only", "sample", needed("sample"), config=config, engines=("hf",)))
    data = copy.deepcopy(CLUSTER_7B)
    data["stages"].insert(1, {"stage": "hf_only", "settings": {"rollout": {"engine": "hf"}}})
    parse_spec(copy.deepcopy(data), "7b.yaml")
    data["stages"][1]["settings"]["rollout"]["engine"] = "vllm"
    with pytest.raises(SpecError, match=r"^7b.yaml: stages\[1\].settings.rollout.engine: 'vllm' is invalid for the "
                                        r"hf_only stage: hf \(its registry entry\)$"):
        parse_spec(data, "7b.yaml")


def test_cluster_7b_with_ppo_places_ppo_as_a_trainjob(tmp_path):
    """The bug this contract closes: ppo's component took no nodes, launch or kfp_run_id, so the pipeline exposed
    ppo_nodes while the ppo step ran 8 torchrun processes on a 4-CPU pod with no GPU."""
    from components.trainjob import Placement
    from pipelines.posttrain import compile_spec
    from pipelines.spec import parse_spec

    spec = parse_spec(with_ppo(), "7b.yaml")
    pipeline, platform = yaml.safe_load_all(compile_spec(spec, tmp_path / "7b.yaml").read_text())
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["ppo_nodes"]["defaultValue"] == 2 and params["ppo_gpus_per_node"]["defaultValue"] == 8
    tasks = {}
    for comp in [pipeline["root"], *pipeline["components"].values()]:
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    inputs = tasks["ppo"]["inputs"]["parameters"]
    assert inputs["nodes"]["componentInputParameter"] == "pipelinechannel--ppo_nodes"
    assert inputs["nproc"]["componentInputParameter"] == "pipelinechannel--ppo_gpus_per_node"
    assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    launch = json.loads(inputs["launch"]["runtimeValue"]["constant"])
    assert launch["max_nodes"] == 4 and launch["max_nproc"] == 8
    placement = Placement.from_json(launch["trainjob"])
    assert placement.accelerator == "nvidia.com/gpu" and placement.cpu == "64" and placement.memory == "900Gi"
    # the step itself is a small pod of runtime_resources, with the stage's timeout and retries
    resources = pipeline["deploymentSpec"]["executors"]["exec-ppo"]["container"]["resources"]
    assert "accelerator" not in resources and resources["cpuLimit"] == 4.0
    plat = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ppo"]
    assert plat["activeDeadlineSeconds"] == "86400" and "nodeSelector" not in plat


# --- the docs


def test_components_readme_names_every_parameter():
    """components/README.md lists the parameters a component may take: exactly PARAMETERS."""
    text = (ROOT / "components" / "README.md").read_text()
    paragraph = re.search(r"A component's parameters are given by name.*?\n\n", text, re.S)[0]
    listed = set(re.findall(r"`(\w+)`", paragraph.split("(`stages.PARAMETERS`)", 1)[1]))
    assert listed == set(PARAMETERS), f"components/README.md: add {sorted(set(PARAMETERS) - listed)}, remove " \
                                      f"{sorted(listed - set(PARAMETERS))}"
