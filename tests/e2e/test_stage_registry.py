"""A stage is one folder plus one registry entry: a minimal `echo` stage (it copies its input model), written
and registered from within this test, is accepted by the spec, compiled into the DAG and run by the local run,
with no other file of the repository touched."""

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

ECHO_MAIN = '''\
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.config import require


@dataclass(kw_only=True)
class EchoConfig:
    model: str
    output_dir: str
    label: str = "echo"
    """A word written to the summary."""

    def __post_init__(self):
        require(self.label.isalpha(), "label", self.label, "letters only")


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
    for name, text in (("__init__.py", ECHO_INIT), ("main.py", ECHO_MAIN), ("component.py", ECHO_COMPONENT)):
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
