"""Compiling a spec to KFP IR: the DAG's shape, the runtime parameters, Kubernetes placement and credentials.

The bundled specs are also compared with golden files (tests/golden/<spec>.yaml, the SDK version line
removed), so any change to the compiled pipeline is seen in review. After an intended change:

    POSTTRAIN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_compile.py
"""

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG, image
from pipelines.cli import main as cli
from pipelines.posttrain import compile_spec, pipeline_parameters, without_sdk_version
from pipelines.spec import load_spec, parse_spec

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SECRET_KEYS = {"posttrain-minio": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
               "posttrain-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]}
GPU_POOL = {"accelerator": "nvidia.com/gpu", "gpus": 2, "node_selector": {"posttrain/pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "retries": 2, "timeout": 3600, "shm_size": "8Gi"}
MINI = {
    "name": "mini", "base_model": "s3://posttrain-data/models/m",
    "data": {"sources": [{"task": "arithmetic", "rows": 100, "shape": "sft"}]},
    "stages": [{"stage": "psft", "settings": {"train": {"max_steps": 10, "lr": 0.001}}}, {"stage": "evaluate"},
               {"stage": "register"}],
    "eval_suites": [{"task": "arithmetic", "split": "id"}],
    "promotion": {"metric": "arithmetic-id/accuracy"},
    "resources": GPU_POOL,
}


def compiled(spec, tmp_path) -> tuple[str, dict, dict]:
    """(IR text, pipeline spec, kubernetes platform spec), with the default images whatever the environment."""
    spec.images.trainer = image("trainer", DEFAULT_REGISTRY, DEFAULT_TAG)
    spec.images.runtime = image("runtime", DEFAULT_REGISTRY, DEFAULT_TAG)
    text = compile_spec(spec, tmp_path / f"{spec.name}.yaml").read_text()
    pipeline, platform = yaml.safe_load_all(text)
    return text, pipeline, platform["platforms"]["kubernetes"]


def executor(pipeline: dict, name: str) -> dict:
    return pipeline["deploymentSpec"]["executors"][f"exec-{name}"]["container"]


def dag_tasks(pipeline: dict) -> dict:
    """Every task of every DAG (the exit handler's and the gate's included), by task name."""
    tasks = dict(pipeline["root"]["dag"]["tasks"])
    for comp in pipeline["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_dag_shape_and_gate(tmp_path):
    _, pipeline, _ = compiled(parse_spec(copy.deepcopy(MINI)), tmp_path)
    tasks = dag_tasks(pipeline)
    names = {t["taskInfo"]["name"]: n for n, t in tasks.items()}
    assert {"base-model", "preflight", "data_prep", "psft", "evaluate", "register", "promote", "close-run",
            "promotion-gate"} <= set(names)
    # close-run is the exit handler: it runs whatever the steps inside did
    closing = tasks[names["close-run"]]
    assert closing["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert closing["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    # the gate: the promotion runs only when register decided to promote
    gate = tasks[names["promotion-gate"]]
    condition = "inputs.parameter_values['pipelinechannel--register-Output'] == 'promote'"
    assert gate["triggerPolicy"]["condition"] == condition
    # preflight first, then data_prep, then the training stage
    assert names["preflight"] in tasks[names["data_prep"]]["dependentTasks"]
    assert names["data_prep"] in tasks[names["psft"]]["dependentTasks"]
    # caching: data_prep yes (same inputs, same rows); training, evaluation and registration run every time
    assert tasks[names["data_prep"]]["cachingOptions"].get("enableCache") is True
    for stage in ("preflight", "psft", "evaluate", "register", "promote", "close-run"):
        assert not tasks[names[stage]]["cachingOptions"].get("enableCache"), stage


def test_gpu_stage_placement(tmp_path):
    _, pipeline, k8s = compiled(parse_spec(copy.deepcopy(MINI)), tmp_path)
    tasks = dag_tasks(pipeline)
    sft = executor(pipeline, "sft")
    assert sft["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert sft["resources"]["accelerator"]["resourceCount"] == "2"
    assert sft["image"] == image("trainer", DEFAULT_REGISTRY, DEFAULT_TAG)
    # evaluate takes the pool's node like a training stage: one process per accelerator, each a shard of the prompts
    assert executor(pipeline, "evaluate")["resources"]["accelerator"]["resourceCount"] == "2"
    nproc = tasks["evaluate"]["inputs"]["parameters"]["nproc"]
    assert nproc["componentInputParameter"] == "pipelinechannel--evaluate_gpus_per_node"
    assert pipeline["root"]["inputDefinitions"]["parameters"]["evaluate_gpus_per_node"]["defaultValue"] == 2
    assert json.loads(tasks["evaluate"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]) == {
        "max_nodes": 1, "max_nproc": 2}
    assert "evaluate_nodes" not in pipeline["root"]["inputDefinitions"]["parameters"]  # one node
    assert "lr" not in tasks["evaluate"]["inputs"]["parameters"]
    assert executor(pipeline, "register")["image"] == image("runtime", DEFAULT_REGISTRY, DEFAULT_TAG)
    assert "accelerator" not in executor(pipeline, "data-prep").get("resources", {})
    plat = k8s["deploymentSpec"]["executors"]["exec-sft"]
    assert plat["nodeSelector"]["labels"] == {"posttrain/pool": "gpu"}
    assert plat["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert plat["activeDeadlineSeconds"] == "3600"
    assert plat["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi",
                                       "volumeName": "dshm"}]
    assert plat["podMetadata"]["labels"] == {"posttrain/spec": "mini", "posttrain/stage": "psft",
                                             "sidecar.istio.io/inject": "false"}
    assert plat["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}
    assert plat["imagePullPolicy"] == "IfNotPresent"
    assert tasks["sft"]["retryPolicy"]["maxRetryCount"] == 2
    # training writes checkpoints to the run's workspace (a PVC per run): a retry resumes from them
    assert tasks["sft"]["inputs"]["parameters"]["workspace"]["runtimeValue"]["constant"] == "{{$.workspace_path}}"
    assert k8s["pipelineConfig"]["workspace"] == {"size": "100Gi",
                                                  "kubernetes": {"pvcSpecPatch": {"accessModes": ["ReadWriteOnce"]}}}
    # torchrun with one rank per GPU: the run parameter psft_gpus_per_node, the spec's gpus by default; one node
    nproc = tasks["sft"]["inputs"]["parameters"]["nproc"]
    assert nproc["componentInputParameter"] == "pipelinechannel--psft_gpus_per_node"
    assert pipeline["root"]["inputDefinitions"]["parameters"]["psft_gpus_per_node"]["defaultValue"] == 2
    assert "psft_nodes" not in pipeline["root"]["inputDefinitions"]["parameters"]
    assert tasks["sft"]["inputs"]["parameters"]["nodes"]["runtimeValue"]["constant"] == 1
    launch = json.loads(tasks["sft"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"])
    assert launch == {"max_nodes": 1, "max_nproc": 2}  # no TrainJob: the stage runs in the step's pod


def test_models_stay_in_the_runs_workspace(tmp_path):
    """The base model is imported into the workspace (KFP ≥ 2.15: the launcher then downloads it into no step's pod,
    backend/src/v2/component/launcher_v2.go); every step that reads a model takes the workspace, so KFP mounts it
    (backend/src/v2/driver/driver.go needsWorkspaceMount)."""
    _, pipeline, _ = compiled(parse_spec(copy.deepcopy(MINI)), tmp_path)
    importer = pipeline["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["downloadToWorkspace"] is True
    tasks = dag_tasks(pipeline)
    for task in ("sft", "evaluate", "register"):
        workspace = tasks[task]["inputs"]["parameters"]["workspace"]
        assert workspace["runtimeValue"]["constant"] == "{{$.workspace_path}}", task


def test_credentials_come_only_from_secrets(tmp_path):
    text, pipeline, k8s = compiled(parse_spec(copy.deepcopy(MINI)), tmp_path)
    executors = k8s["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{n}" for n in ("close-run", "data-prep", "evaluate", "preflight", "promote",
                                                     "register", "sft")}
    for name, plat in executors.items():
        assert plat["secretAsEnv"], name
        for entry in plat["secretAsEnv"]:
            keys = [m["secretKey"] for m in entry["keyToEnv"]]
            assert keys == SECRET_KEYS[entry["secretName"]], name
            assert all(m["envVar"] == m["secretKey"] for m in entry["keyToEnv"])
            assert entry["optional"] is (name == "exec-preflight")  # preflight reports a missing Secret itself
    for name, ex in pipeline["deploymentSpec"]["executors"].items():
        env = {e["name"] for e in ex.get("container", {}).get("env", [])}
        assert not env & {k for keys in SECRET_KEYS.values() for k in keys}, name
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert not [n for n in params if any(w in n.upper() for w in ("KEY", "PASSWORD", "TOKEN", "SECRET"))]


def test_cli_compile_writes_the_ir(tmp_path):
    spec_file = tmp_path / "mini.yaml"
    spec_file.write_text(yaml.safe_dump(MINI))
    assert cli(["compile", str(spec_file), "-o", str(tmp_path / "out" / "p.yaml")]) == 0
    pipeline, _ = yaml.safe_load_all((tmp_path / "out" / "p.yaml").read_text())
    assert pipeline["pipelineInfo"]["name"] == "mini"
    spec_file.write_text(yaml.safe_dump({**MINI, "stages": [{"stage": "dpo"}]}))
    assert cli(["compile", str(spec_file), "-o", str(tmp_path / "bad.yaml")]) == 2  # a bad spec: a message
    assert not (tmp_path / "bad.yaml").exists()


# --- the bundled specs

def test_cluster_training_stages_request_the_gpu_pool(tmp_path):
    spec = load_spec("cluster")
    _, pipeline, k8s = compiled(spec, tmp_path)
    executors = k8s["deploymentSpec"]["executors"]
    for exe, count in (("sft", "8"), ("grpo", "8"), ("evaluate", "1")):
        acc = executor(pipeline, exe)["resources"]["accelerator"]
        assert (acc["resourceType"], acc["resourceCount"]) == ("nvidia.com/gpu", count), exe
        plat = executors[f"exec-{exe}"]
        assert plat["nodeSelector"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in plat["tolerations"]
        assert {"key": "posttrain/dedicated", "operator": "Equal", "value": "gpu-training",
                "effect": "NoSchedule"} in plat["tolerations"]
    for exe in ("preflight", "data-prep", "register", "promote", "close-run"):
        assert "accelerator" not in executor(pipeline, exe).get("resources", {}), exe
        assert "tolerations" not in executors[f"exec-{exe}"], exe
    tasks = dag_tasks(pipeline)
    assert tasks["sft"]["retryPolicy"]["maxRetryCount"] == 2 and tasks["grpo"]["retryPolicy"]["maxRetryCount"] == 2
    assert k8s["pipelineConfig"]["workspace"]["size"] == "500Gi"
    assert pipeline["defaultPipelineRoot"] == "s3://posttrain-pipelines"


def test_cluster_runtime_parameters_have_defaults_and_descriptions(tmp_path):
    spec = load_spec("cluster")
    _, pipeline, _ = compiled(spec, tmp_path)
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"base_model", "data_sources", "psft_lr", "psft_max_steps", "grpo_lr", "grpo_max_steps",
                           "psft_gpus_per_node", "grpo_gpus_per_node", "evaluate_gpus_per_node", "tracking_uri",
                           "s3_endpoint"}
    for name, _kind, default, _ in pipeline_parameters(spec):
        p = params[name]
        assert p["description"] and p["isOptional"] is True, name
        assert (json.loads(p["defaultValue"]) if name == "data_sources" else p["defaultValue"]) == (
            json.loads(default) if name == "data_sources" else default), name
    assert params["psft_lr"]["defaultValue"] == 1e-5 and params["psft_lr"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["grpo_max_steps"]["parameterType"] == "NUMBER_INTEGER"
    assert params["base_model"]["defaultValue"] == "s3://posttrain-data/models/qwen2.5-1.5b-instruct"


@pytest.mark.parametrize("name", ["cluster", "demo", "rlhf-demo"])
def test_golden_ir(name, tmp_path):
    text, _, _ = compiled(load_spec(name), tmp_path)
    got = without_sdk_version(text)
    golden = GOLDEN / f"{name}.yaml"
    if os.environ.get("POSTTRAIN_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert "sdkVersion" not in got
    assert golden.read_text() == got, (f"the compiled {name} pipeline changed; if intended: "
                                       "POSTTRAIN_UPDATE_GOLDEN=1 pytest tests/unit/test_compile.py")


def test_reward_model_after_a_stage_that_makes_pairs_compiles(tmp_path):
    spec = copy.deepcopy(MINI)
    spec["data"]["sources"].append({"task": "arithmetic", "rows": 50, "shape": "prompts", "name": "prompts"})
    spec["rewards"] = [{"name": "task"}]
    spec["stages"] = [{"stage": "sft"}, {"stage": "reward_scoring"},
                      {"stage": "reward_model", "settings": {"eval_fraction": 0.1, "margin": 0.5}},
                      {"stage": "evaluate"}, {"stage": "register"}]
    _, pipeline, _ = compiled(parse_spec(spec), tmp_path)
    tasks = dag_tasks(pipeline)
    names = {t["taskInfo"]["name"]: n for n, t in tasks.items()}
    rm = tasks[names["reward_model"]]
    # its pairs are reward_scoring's, its model the sft policy; the lr and steps are pipeline parameters
    assert rm["inputs"]["artifacts"]["pairs"]["taskOutputArtifact"]["producerTask"] == names["reward_scoring"]
    assert rm["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == names["sft"]
    assert {"reward_model_lr", "reward_model_max_steps"} <= set(pipeline["root"]["inputDefinitions"]["parameters"])
    # the reward model is not the policy: evaluate still scores sft's model
    assert tasks[names["evaluate"]]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] \
        == names["sft"]


# --- several nodes: a TrainJob per training stage -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cluster-7b", "cluster-70b-lora"])
def test_multi_node_specs_compile_to_launcher_steps(name, tmp_path):
    """A stage whose resources allow several nodes: its step is a small pod (runtime_resources, the stage's timeout
    and retries) that launches a TrainJob; nodes and GPUs per node are run parameters with the spec's bounds."""
    from components.trainjob import Placement

    spec = load_spec(name)
    _, pipeline, k8s = compiled(spec, tmp_path)
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    for stage in ("psft", "grpo"):
        assert params[f"{stage}_nodes"]["defaultValue"] == 2 and "1 to 4" in params[f"{stage}_nodes"]["description"]
        assert params[f"{stage}_gpus_per_node"]["defaultValue"] == 8
    tasks = dag_tasks(pipeline)
    for task, stage in (("sft", "psft"), ("grpo", "grpo")):
        inputs = tasks[task]["inputs"]["parameters"]
        assert inputs["nodes"]["componentInputParameter"] == f"pipelinechannel--{stage}_nodes"
        assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        launch = json.loads(inputs["launch"]["runtimeValue"]["constant"])
        assert launch["max_nodes"] == 4 and launch["max_nproc"] == 8
        placement = Placement.from_json(launch["trainjob"])
        assert placement.runtime == "posttrain-trainer" and placement.namespace == "posttrain"
        assert placement.accelerator == "nvidia.com/gpu" and placement.shm_size == "64Gi"
        assert placement.secrets == {"posttrain-minio": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
                                     "posttrain-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]}
        assert placement.node_selector["posttrain/pool"] == "gpu-training" and placement.timeout == 86400
        # the launcher pod: no accelerator, no GPU node pool, the stage's timeout and retries
        assert "accelerator" not in executor(pipeline, task).get("resources", {})
        plat = k8s["deploymentSpec"]["executors"][f"exec-{task}"]
        assert "tolerations" not in plat and "nodeSelector" not in plat
        assert plat["activeDeadlineSeconds"] == "86400" and tasks[task]["retryPolicy"]["maxRetryCount"] == 2
    assert k8s["pipelineConfig"]["workspace"]["kubernetes"]["pvcSpecPatch"]["accessModes"] == ["ReadWriteMany"]


def test_scale_parameters_are_checked_against_the_spec():
    from pipelines.posttrain import parse_params

    spec = load_spec("cluster-7b")
    assert parse_params(spec, ["psft_nodes=4", "grpo_gpus_per_node=4"]) == {"psft_nodes": 4, "grpo_gpus_per_node": 4}
    with pytest.raises(ValueError, match=r"psft_nodes='5' is invalid: between 1 and 4"):
        parse_params(spec, ["psft_nodes=5"])
    with pytest.raises(ValueError, match=r"grpo_gpus_per_node='9' is invalid: between 1 and 8"):
        parse_params(spec, ["grpo_gpus_per_node=9"])
    with pytest.raises(ValueError, match="NAME one of"):  # one node: no <stage>_nodes parameter
        parse_params(load_spec("cluster"), ["psft_nodes=2"])


def test_the_step_refuses_a_scale_outside_the_spec():
    from components.step import check_scale

    check_scale("psft", 4, 8, {"max_nodes": 4, "max_nproc": 8})
    with pytest.raises(ValueError, match=r"stage psft: psft_nodes=5 is invalid: between 1 and 4"):
        check_scale("psft", 5, 8, {"max_nodes": 4, "max_nproc": 8})
    with pytest.raises(ValueError, match=r"psft_gpus_per_node=0 is invalid: between 1 and 8"):
        check_scale("psft", 1, 0, {"max_nodes": 4, "max_nproc": 8})
    with pytest.raises(ValueError, match="runs this stage on one node"):
        check_scale("psft", 2, 1, {"max_nodes": 1, "max_nproc": 1})


def test_multi_node_needs_a_shared_workspace_and_a_training_stage():
    from pipelines.spec import SpecError, parse_spec

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "pipelines/specs/cluster-7b.yaml").read_text())
    data["storage"]["workspace_access_modes"] = ["ReadWriteOnce"]
    with pytest.raises(SpecError, match=r"storage.workspace_access_modes: .* add ReadWriteMany"):
        parse_spec(copy.deepcopy(data))
    data["storage"]["workspace_access_modes"] = ["ReadWriteMany"]
    data["stages"][2]["resources"]["max_nodes"] = 2  # evaluate
    with pytest.raises(SpecError, match=r"stages\[2\].resources.max_nodes: 2 is invalid for the evaluate stage: "
                                        r"only a stage that declares multi_node"):
        parse_spec(copy.deepcopy(data))
    data["stages"][2]["resources"].pop("max_nodes")
    data["resources"]["max_nodes"] = 1
    with pytest.raises(SpecError, match=r"max_nodes: 1 is invalid: at least nodes \(2\)"):
        parse_spec(copy.deepcopy(data))


def test_ppo_reads_the_runs_reward_model_through_its_optional_input(tmp_path):
    spec = copy.deepcopy(MINI)
    spec["data"]["sources"].append({"task": "arithmetic", "rows": 50, "shape": "prompts", "name": "prompts"})
    spec["rewards"] = [{"name": "task"}]
    spec["stages"] = [{"stage": "sft"}, {"stage": "ppo"}, {"stage": "evaluate"}, {"stage": "register"}]
    _, pipeline, _ = compiled(parse_spec(spec), tmp_path / "a")
    tasks = dag_tasks(pipeline)
    names = {t["taskInfo"]["name"]: n for n, t in tasks.items()}
    # no reward_model stage: the optional input is left out, the spec's verifier is the reward
    assert set(tasks[names["ppo"]]["inputs"]["artifacts"]) == {"model", "data"}
    assert pipeline["components"]["comp-ppo"]["inputDefinitions"]["artifacts"]["reward_model"]["isOptional"]

    spec["stages"][1:1] = [{"stage": "reward_scoring"}, {"stage": "reward_model"}]
    spec["stages"][3]["settings"] = {"rewards": [{"name": "reward_model", "uri": "stage:reward_model"}]}
    _, pipeline, _ = compiled(parse_spec(spec), tmp_path / "b")
    tasks = dag_tasks(pipeline)
    names = {t["taskInfo"]["name"]: n for n, t in tasks.items()}
    ppo = tasks[names["ppo"]]["inputs"]["artifacts"]
    assert ppo["reward_model"]["taskOutputArtifact"]["producerTask"] == names["reward_model"]
    assert ppo["model"]["taskOutputArtifact"]["producerTask"] == names["sft"]  # the reward model is not the policy
    assert tasks[names["evaluate"]]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] \
        == names["ppo"]


def test_branches_start_from_their_named_model_and_evaluate_waits_for_every_model(tmp_path):
    """compare: each arm's model input comes from the stage it starts from; evaluate reads every model from the
    workspace, so it runs after all of them, not only after the candidate's chain."""
    _, pipeline, _ = compiled(load_spec("compare"), tmp_path)
    tasks = dag_tasks(pipeline)
    names = {t["taskInfo"]["name"]: n for n, t in tasks.items()}

    def source(stage: str) -> str:
        return tasks[names[stage]]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"]
    assert {s: source(s) for s in ("sft_longer", "psft", "sft_grpo", "sft_dpo", "sft_grpo_half")} == {
        s: names["sft"] for s in ("sft_longer", "psft", "sft_grpo", "sft_dpo", "sft_grpo_half")}
    assert source("sft_grpo_dpo") == names["sft_grpo_half"] and source("evaluate") == names["sft_grpo_dpo"]
    trained = {"sft", "sft_longer", "psft", "sft_grpo", "sft_dpo", "sft_grpo_half", "sft_grpo_dpo"}
    assert {names[s] for s in trained} <= set(tasks[names["evaluate"]]["dependentTasks"])


def test_a_stage_that_starts_from_base_reads_the_imported_base_model(tmp_path):
    spec = copy.deepcopy(MINI)
    spec["stages"][1:1] = [{"stage": "sft", "start_from": "base"}]
    _, pipeline, _ = compiled(parse_spec(spec), tmp_path)
    tasks = dag_tasks(pipeline)
    names = {t["taskInfo"]["name"]: n for n, t in tasks.items()}
    model = tasks[names["sft"]]["inputs"]["artifacts"]["model"]
    assert model["taskOutputArtifact"]["producerTask"] == names["base-model"]  # not psft's model
    evaluate = tasks[names["evaluate"]]["inputs"]
    assert json.loads(evaluate["parameters"]["lineage"]["runtimeValue"]["constant"]) == {"psft": "base", "sft": "base"}


def test_the_evaluation_is_given_the_runs_name(tmp_path):
    """The report's title: `<spec name> <KFP run id>`, joined in the step (KFP substitutes its run id only in a
    parameter that is the placeholder alone)."""
    _, pipeline, _ = compiled(parse_spec(copy.deepcopy(MINI)), tmp_path)
    params = dag_tasks(pipeline)["evaluate"]["inputs"]["parameters"]
    assert params["spec_name"]["runtimeValue"]["constant"] == "mini"
    assert params["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    source = executor(pipeline, "evaluate")["command"][-1]
    assert '"run_name": f"{spec_name} {kfp_run_id}"' in source
