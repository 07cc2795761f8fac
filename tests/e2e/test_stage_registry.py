"""A stage is one folder plus one registry entry: a minimal `echo` stage (it copies its input model), written
and registered from within this test, is accepted by the spec, compiled into the DAG and run by the local run,
with no other file of the repository touched. A `train` stage that declares it runs on several nodes is compiled
into a step that launches a TrainJob; one whose component cannot be given the nodes is refused when registered."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

ECHO_INIT = '''\
"""echo: copies its input model. Importing this package registers the stage."""
from components.stages import Input, Output, Stage, register

register(Stage(name="echo", module="echo_stage", package="echo_stage", config="EchoConfig", component="echo",
               kind="cpu", inputs={"model": Input(feed="policy")},
               outputs={"trained_model": Output(provides=("policy", "trained_policy"))},
               wired={"model": "the pipeline: the policy", "output_dir": "the pipeline"}))
'''

ECHO_CONFIG = '''\
from dataclasses import dataclass

from components.config import require


@dataclass(kw_only=True)
class EchoConfig:
    model: str
    output_dir: str
    label: str = "echo"
    """A word written to the summary."""

    def __post_init__(self):
        require(self.label.isalpha(), "label", self.label, "letters only")
'''

ECHO_MAIN = '''\
import json
import shutil
from pathlib import Path

from echo_stage.config import EchoConfig


def run(cfg: EchoConfig) -> dict:
    shutil.copytree(cfg.model, Path(cfg.output_dir) / "model", dirs_exist_ok=True)
    summary = {"files": len(list(Path(cfg.model).iterdir())), "label": cfg.label}
    (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary))
    return summary
'''

ECHO_COMPONENT = '''\
from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def echo(model: Input[Model], settings: str, stage: str, workspace: str, trained_model: Output[Model],
         metrics: Output[Metrics]):
    """Copies its input model."""
    import os

    import echo_stage  # noqa: F401  (registers the stage in this process)
    from components.step import Step, export_model, model_dir

    step = Step(stage, settings, output_dir=os.path.join(workspace, stage))
    summary = step.run(stage, model=model_dir(model))  # a model artifact points into the run's workspace
    export_model(step.path("model"), trained_model, stage)
    step.log_metrics(metrics, summary)
'''


@pytest.fixture
def echo_stage(tmp_path, monkeypatch):
    package = tmp_path / "plugins" / "echo_stage"
    package.mkdir(parents=True)
    for name, text in (("__init__.py", ECHO_INIT), ("config.py", ECHO_CONFIG), ("main.py", ECHO_MAIN),
                       ("component.py", ECHO_COMPONENT)):
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv("PYTHONPATH", f"{package.parent}:{':'.join(sys.path)}")  # kfp.local's step processes
    import echo_stage  # noqa: F401

    from components import stages

    yield stages.STAGES["echo"]
    stages.unregister("echo")
    for name in [m for m in sys.modules if m.startswith("echo_stage")]:
        del sys.modules[name]


def spec_data(echo_settings: dict) -> dict:
    return {
        "name": "echo-demo", "base_model": "bundled:tiny",
        "data": {"max_length": 64, "sources": [{"task": "arithmetic", "rows": 300, "shape": "sft"}]},
        "stages": [{"stage": "sft", "settings": {"max_length": 64, "train": {"max_steps": 3, "batch_size": 8}}},
                   {"stage": "echo", "settings": echo_settings},
                   {"stage": "evaluate", "settings": {"max_new_tokens": 8}}],
        "eval_suites": [{"task": "arithmetic", "split": "id", "n_prompts": 8}],
    }


def test_a_stage_registered_in_a_test_is_checked_compiled_and_run(echo_stage, tmp_path):
    from pipelines.local import run_local
    from pipelines.posttrain import compile_spec
    from pipelines.spec import SpecError, parse_spec

    # the spec checks the new stage's settings with its own config, and refuses the keys the pipeline sets
    with pytest.raises(SpecError, match=r"stages\[1\].settings.label: 'e1' is invalid: letters only"):
        parse_spec(spec_data({"label": "e1"}), "echo.yaml")
    with pytest.raises(SpecError, match=r"stages\[1\].settings.model: 'x' is invalid here: set by the pipeline"):
        parse_spec(spec_data({"model": "x"}), "echo.yaml")
    spec = parse_spec(spec_data({"label": "copied"}), "echo.yaml")

    # the DAG wires it: sft's model in, its model out to evaluate, which compares it with sft and base
    ir = next(yaml.safe_load_all(compile_spec(spec, tmp_path / "echo.yaml").read_text()))  # then platform spec
    tasks = ir["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    dag = ir["components"][tasks]["dag"]["tasks"]
    assert dag["echo"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "trained_model", "producerTask": "sft"}
    evaluate = dag["evaluate"]["inputs"]
    assert evaluate["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "echo"
    assert evaluate["parameters"]["candidate"]["runtimeValue"]["constant"] == "echo"
    assert json.loads(evaluate["parameters"]["lineage"]["runtimeValue"]["constant"]) == {"sft": "base", "echo": "sft"}

    # and the local run executes it
    summary = run_local(spec, tmp_path / "out", state=tmp_path / "state")
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["stages"]["echo"]["metrics"]["files"] >= 3  # config, weights, tokenizer
    echo_eval = summary["stages"]["echo"]["eval"]["arithmetic-id"]
    sft_eval = summary["stages"]["sft"]["eval"]["arithmetic-id"]
    assert echo_eval["accuracy"] == sft_eval["accuracy"] and echo_eval["entropy"] == pytest.approx(sft_eval["entropy"])


# --- a train stage that runs on several nodes

SCALE_INIT = '''\
"""scale: a training stage that can run on several nodes. Importing this package registers it."""
from components.stages import Input, Output, Stage, register

ENTRY = dict(name="scale", module="scale_stage", package="scale_stage", config="ScaleConfig", component="scale",
             kind="train", multi_node=True, inputs={"model": Input(feed="policy")},
             outputs={"trained_model": Output(provides=("policy", "trained_policy"))},
             wired={"model": "the pipeline: the policy", "output_dir": "the pipeline"})
register(Stage(**ENTRY))
'''

SCALE_CONFIG = '''\
from dataclasses import dataclass, field

from components.training.config import TrainConfig


@dataclass(kw_only=True)
class ScaleConfig:
    model: str
    output_dir: str
    train: TrainConfig = field(default_factory=TrainConfig)
'''

SCALE_MAIN = '''\
import shutil
from pathlib import Path


def run(cfg) -> dict:
    """Copies its model: the tests compile this stage, they do not train with it."""
    shutil.copytree(cfg.model, Path(cfg.output_dir) / "model", dirs_exist_ok=True)
    return {}
'''

SCALE_COMPONENT = '''\
from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def scale(model: Input[Model], settings: str, lr: float, max_steps: int, stage: str, workspace: str,
          tracking_uri: str, parent_run_id: str, s3_endpoint: str, nproc: int, nodes: int, launch: str,
          kfp_run_id: str, trained_model: Output[Model], metrics: Output[Metrics]):
    """Trains on `nodes` nodes: components.step.train_step launches the TrainJob."""
    import scale_stage  # noqa: F401  (registers the stage in this process)
    from components.step import model_dir, train_step

    train_step(stage, stage=stage, settings=settings, lr=lr, max_steps=max_steps, workspace=workspace,
               tracking_uri=tracking_uri, parent_run_id=parent_run_id, s3_endpoint=s3_endpoint, nproc=nproc,
               nodes=nodes, launch=launch, kfp_run_id=kfp_run_id, trained_model=trained_model, metrics=metrics,
               model=model_dir(model))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def scale_one_node(model: Input[Model], settings: str, lr: float, max_steps: int, stage: str, workspace: str,
                   nproc: int, launch: str, kfp_run_id: str, trained_model: Output[Model]):
    """The same stage without `nodes`: what it would run on is decided by nothing."""
'''


@pytest.fixture
def scale_stage(tmp_path, monkeypatch):
    package = tmp_path / "plugins" / "scale_stage"
    package.mkdir(parents=True)
    for name, text in (("__init__.py", SCALE_INIT), ("config.py", SCALE_CONFIG), ("main.py", SCALE_MAIN),
                       ("component.py", SCALE_COMPONENT), ("__main__.py", "")):
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(package.parent))
    import scale_stage

    from components import stages

    yield scale_stage
    stages.unregister("scale")
    for name in [m for m in sys.modules if m.startswith("scale_stage")]:
        del sys.modules[name]


def test_a_multi_node_train_stage_registered_in_a_test_is_placed_as_a_trainjob(scale_stage, tmp_path):
    from components import stages
    from components.trainjob import Placement
    from pipelines.posttrain import compile_spec
    from pipelines.spec import parse_spec

    entry = stages.STAGES["scale"]
    assert entry.multi_node and entry.kind == "train"
    spec = parse_spec({
        "name": "scale-demo", "base_model": "s3://posttrain-data/models/m",
        "data": {"sources": [{"task": "arithmetic", "rows": 100, "shape": "sft"}]},
        "stages": [{"stage": "scale", "settings": {"train": {"max_steps": 7}}}, {"stage": "evaluate"}],
        "eval_suites": [{"task": "arithmetic", "split": "id"}],
        "resources": {"accelerator": "nvidia.com/gpu", "gpus": 4, "nodes": 2, "max_nodes": 3, "cpu": "32",
                      "memory": "200Gi", "node_selector": {"posttrain/pool": "gpu"}, "timeout": 7200, "retries": 1},
        "runtime_resources": {"cpu": "2", "memory": "8Gi"},
        "storage": {"workspace_access_modes": ["ReadWriteMany"]},
    }, "scale.yaml")
    pipeline, platform = yaml.safe_load_all(compile_spec(spec, tmp_path / "scale.yaml").read_text())
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["scale_nodes"]["defaultValue"] == 2 and "1 to 3" in params["scale_nodes"]["description"]
    assert params["scale_max_steps"]["defaultValue"] == 7
    tasks = pipeline["components"][pipeline["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]][
        "dag"]["tasks"]
    inputs = tasks["scale"]["inputs"]["parameters"]
    assert inputs["nodes"]["componentInputParameter"] == "pipelinechannel--scale_nodes"
    assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    launch = json.loads(inputs["launch"]["runtimeValue"]["constant"])
    assert launch["max_nodes"] == 3 and launch["max_nproc"] == 4
    placement = Placement.from_json(launch["trainjob"])  # the nodes: the pool's accelerators, cpu and memory
    assert (placement.accelerator, placement.cpu, placement.memory) == ("nvidia.com/gpu", "32", "200Gi")
    assert placement.node_selector == {"posttrain/pool": "gpu"} and placement.timeout == 7200
    # the step: a small pod of runtime_resources that launches the TrainJob, with the stage's timeout and retries
    container = pipeline["deploymentSpec"]["executors"]["exec-scale"]["container"]
    resources = container["resources"]
    assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("2", "8Gi")
    assert "accelerator" not in resources
    plat = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-scale"]
    assert "nodeSelector" not in plat and plat["activeDeadlineSeconds"] == "7200"
    assert tasks["scale"]["retryPolicy"]["maxRetryCount"] == 1
    # evaluate, a sampling stage, takes one node of the same pool
    assert "evaluate_nodes" not in params
    assert "trainjob" not in json.loads(tasks["evaluate"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"])


def test_a_multi_node_stage_whose_component_takes_no_nodes_is_refused_at_register(scale_stage):
    from components import stages

    entry = {**scale_stage.ENTRY, "name": "scale_one_node", "component": "scale_one_node"}
    with pytest.raises(ValueError, match=r"^stage scale_one_node: component scale_stage.component.scale_one_node "
                                         r"lacks the parameter 'nodes': the stage runs on several nodes"):
        stages.register(stages.Stage(**entry))
    assert "scale_one_node" not in stages.STAGES
    # on one node, the same component is a valid train stage
    stages.register(stages.Stage(**{**entry, "multi_node": False}))
    stages.unregister("scale_one_node")
