"""What runs inside a pipeline step: a stage's config from the step's inputs, the stage, and its outputs.

A KFP component (components/<stage>/component.py) is a typed signature and a few lines; its body calls
`Step(...).run(...)`, which

- sets the environment the stage and its libraries read: MLFLOW_TRACKING_URI and POSTTRAIN_PARENT_RUN_ID
  (the stage opens its own child run through components.tracking), the pipeline's lineage tags read from the
  parent run (POSTTRAIN_KFP_RUN_ID, POSTTRAIN_SPEC_HASH, ...), and MLFLOW_S3_ENDPOINT_URL; credentials are
  already in the environment, from Kubernetes Secrets, and never pass through here;
- builds the stage's config class (components.stages) from the spec's settings (JSON), the runtime parameters
  and the input and output paths with components.config.from_mapping, so a bad value fails naming its key;
- runs the stage in this process, or under torchrun with one rank per accelerator when nproc > 1 (a training
  stage's ranks train together, a sampling stage's each sample a shard of the prompts), or, when the spec lets
  the stage span nodes (`launch` has a TrainJob placement), as a Kubeflow Trainer TrainJob of `nodes`
  nodes × `nproc` processes that this step creates, watches and deletes (components.trainjob).

`nodes` and `nproc` are run parameters (<stage>_nodes, <stage>_gpus_per_node): check_scale refuses values outside
the bounds the spec declared (resources.max_nodes, resources.gpus) before anything starts.

A training step gives its stage an output_dir in the run's workspace (<workspace>/<stage>), which outlives a
failed attempt: a retried step resumes from the stage's last checkpoint instead of starting over.

Models stay in the workspace. KFP's launcher downloads every input artifact into the step pod's own scratch volume
(`/s3/<bucket>/<key>`, an emptyDir: kubeflow/pipelines backend/src/v2/component/launcher_v2.go, downloadArtifacts)
and uploads every output from there, so a model passed as an artifact would cross each small pod twice. Instead:

- the base model is imported into the workspace once (dsl.importer(download_to_workspace=True)): its artifact's path
  is already in the workspace and the launcher does not download it;
- a training stage's model output (`export_model`) is a pointer to <workspace>/<stage>/model, where the stage wrote
  it; a step resolves an input model with `model_dir`, which follows the pointer;
- a stage that runs as a TrainJob reads only the workspace (its nodes mount nothing else): the step copies what its
  config names outside the workspace (the data files the launcher downloaded) into <workspace>/<stage>/inputs first.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from components.config import from_mapping, merge

log = logging.getLogger("components.step")


def numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) summary with '/'-joined keys: what a KFP Metrics artifact holds."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


class Step:
    """One stage run inside one pipeline step."""

    def __init__(self, stage: str, settings: str, *, output_dir: str, tracking_uri: str = "",
                 parent_run_id: str = "", s3_endpoint: str = "", nproc: int = 1, nodes: int = 1, launch: str = "",
                 kfp_run_id: str = ""):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.stage = stage
        self.settings = json.loads(settings) if settings else {}
        self.output_dir = Path(output_dir)
        self.nproc, self.nodes = nproc, nodes
        self.launch = json.loads(launch) if launch else {}
        self.kfp_run_id = kfp_run_id
        check_scale(stage, nodes, nproc, self.launch)
        if s3_endpoint:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        from components.tracking import use_kfp

        if (use_kfp() or tracking_uri) and parent_run_id:  # KFP's MLflow plugin, when present, sets the server
            self._inherit_lineage(parent_run_id)

    @staticmethod
    def _inherit_lineage(parent_run_id: str) -> None:
        """The parent run's lineage tags (preflight set them) as the environment components.tracking reads."""
        from mlflow import MlflowClient

        from components.tracking import LINEAGE_ENV, PARENT_ENV

        os.environ[PARENT_ENV] = parent_run_id
        tags = MlflowClient().get_run(parent_run_id).data.tags
        for tag, env in LINEAGE_ENV.items():
            if tags.get(tag):
                os.environ[env] = tags[tag]

    def run(self, kind: str, /, **wiring) -> dict:
        """Run the stage of kind `kind` (components.stages) with the settings, then `wiring` (paths and runtime
        parameters, part by part) on top. While it runs, POSTTRAIN_TASK names the step: components.tracking keys
        the step's MLflow run by it (with the KFP run id), so a retried step reopens the same run."""
        from components.tracking import TASK_ENV

        os.environ[TASK_ENV] = self.stage
        try:
            return self._run(kind, wiring)
        finally:
            os.environ.pop(TASK_ENV, None)

    def _run(self, kind: str, wiring: dict) -> dict:
        from components.stages import get

        stage = get(kind)
        values = merge(merge(self.settings, stage.fixed), {**wiring, "output_dir": str(self.output_dir)})
        cfg = from_mapping(stage.config_class(), values, f"stage {self.stage}")
        rollout = getattr(cfg, "rollout", None)
        if rollout is not None:  # refused here, before torchrun starts a process per accelerator
            from components.training.parallel import check_tensor_parallel

            check_tensor_parallel(rollout.tensor_parallel_size, self.nproc * self.nodes,
                                  f"stage {self.stage}: rollout.tensor_parallel_size")
        stage_module = importlib.import_module(stage.main)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.launch.get("trainjob"):
            return self._run_trainjob(stage, values)
        if self.nproc <= 1:
            from components.storage import bytes_downloaded

            summary = stage_module.run(cfg) or {}
            log.info("stage %s: %d bytes downloaded from S3 by this step", self.stage, bytes_downloaded())
            return summary
        with tempfile.TemporaryDirectory(prefix="posttrain-step-") as tmp:  # not in output_dir: it may be an artifact
            config = Path(tmp) / "step-config.yaml"
            config.write_text(yaml.safe_dump(values, sort_keys=False))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                   "-m", stage.python_package, "--config", str(config)]
            log.info("running %s", " ".join(cmd))
            subprocess.run(cmd, check=True)
        summary = self.output_dir / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else {}

    def _run_trainjob(self, stage, values: dict) -> dict:
        """The stage as a TrainJob of self.nodes nodes × self.nproc processes (components.trainjob); its config,
        and every input it names outside the workspace (stage_inputs), go to the workspace, which every node mounts."""
        from components import trainjob
        from components.training.distributed import latest_checkpoint, topology_problem

        latest = latest_checkpoint(self.output_dir / "checkpoints")  # refused now rather than on every node
        if latest is not None and (problem := topology_problem(latest, self.nodes, self.nproc)) is not None:
            raise ValueError(f"stage {self.stage}: {problem}")
        placement = trainjob.Placement.from_json(self.launch["trainjob"])
        workspace = str(self.output_dir.parent)
        values = stage_inputs(values, workspace, self.output_dir / "inputs")
        config = self.output_dir / "step-config.yaml"
        config.write_text(yaml.safe_dump(values, sort_keys=False))
        client = trainjob.kube_client()
        pvc = placement.workspace_pvc or trainjob.workspace_claim(client, placement.namespace, workspace)
        run_id = self.kfp_run_id or "local"
        manifest = trainjob.trainjob_manifest(
            placement, name=trainjob.trainjob_name(run_id, self.stage), run_id=run_id, stage=self.stage,
            nodes=self.nodes, nproc=self.nproc, command=torchrun_command(stage.python_package, config),
            env=trainjob.forwarded_env(), workspace=workspace, workspace_pvc=pvc)
        trainjob.TrainJobLauncher(client, placement.namespace, poll_seconds=placement.poll_seconds).run(
            manifest, timeout=placement.timeout)
        summary = self.output_dir / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else {}

    def path(self, *parts: str) -> str:
        """A path under the stage's output_dir."""
        return str(self.output_dir.joinpath(*parts))

    def export(self, name: str, dest: str) -> None:
        """Copy output_dir/<name> (a file or a directory) to a step output's path."""
        src = self.output_dir / name
        if not src.exists():
            raise FileNotFoundError(f"stage {self.stage}: expected output {src} is missing")
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)

    @staticmethod
    def log_metrics(metrics, summary: dict) -> None:
        """The summary's numbers as a KFP Metrics artifact (shown in the KFP UI), also written as JSON at the
        artifact's path: kfp.local's cache reuses a step only when every output exists as a file."""
        values = dict(sorted(numbers(summary).items()))
        for key, value in values.items():
            metrics.log_metric(key, value)
        Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics.path).write_text(json.dumps(values, indent=2))


def torchrun_command(package: str, config: Path) -> list[str]:
    """The command of every node of a TrainJob (`package`: the stage's, e.g. components.sft): torchrun takes the node
    count, the node's rank and the rendezvous from the PET_* variables Kubeflow Trainer's torch policy sets in each
    pod."""
    return ["python", "-m", "torch.distributed.run", "-m", package, "--config", str(config)]


def check_scale(stage: str, nodes: int, nproc: int, launch: dict) -> None:
    """Refuse a run's node or process count outside the bounds of the spec (`launch`: max_nodes, max_nproc),
    before anything starts."""
    max_nodes, max_nproc = launch.get("max_nodes", 1), launch.get("max_nproc", max(nproc, 1))
    if not 1 <= nodes <= max_nodes:
        where = ("the spec's resources.max_nodes" if max_nodes > 1 else
                 "the spec runs this stage on one node; set resources.nodes or max_nodes to allow more")
        raise ValueError(f"stage {stage}: {stage}_nodes={nodes} is invalid: between 1 and {max_nodes} ({where})")
    if not 1 <= nproc <= max_nproc:
        raise ValueError(f"stage {stage}: {stage}_gpus_per_node={nproc} is invalid: between 1 and {max_nproc} "
                         "(the spec's resources.gpus, the accelerators of one node)")


def train_step(kind: str, /, *, stage: str, settings: str, lr: float, max_steps: int, workspace: str,
               tracking_uri: str, parent_run_id: str, s3_endpoint: str, nproc: int, trained_model, metrics,
               nodes: int = 1, launch: str = "", kfp_run_id: str = "", **wiring) -> dict:
    """The body of a training stage's component: run the stage of kind `kind` in <workspace>/<stage> (where its
    checkpoints outlive a failed attempt) with the run's lr and max_steps, on `nodes` nodes × `nproc` processes,
    export its model and log its summary."""
    step = Step(stage, settings, output_dir=os.path.join(workspace, stage), tracking_uri=tracking_uri,
                parent_run_id=parent_run_id, s3_endpoint=s3_endpoint, nproc=nproc, nodes=nodes, launch=launch,
                kfp_run_id=kfp_run_id)
    summary = step.run(kind, train={"lr": lr, "max_steps": max_steps}, **wiring)
    export_model(step.path("model"), trained_model, stage)
    step.log_metrics(metrics, summary)
    return summary


MODEL_POINTER = "posttrain-model.json"
"""The file of a model artifact that points at the model in the run's workspace (export_model)."""


def export_model(model_dir: str, artifact, stage: str) -> None:
    """A stage's model (in the run's workspace) as the step's output artifact: a pointer to it, not a copy, so the
    weights do not go through the step pod's scratch volume and the object store (they stay where the next steps
    read them; the register step logs the final model to MLflow)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"stage {stage}: expected output {model_dir} (a Hugging Face directory) is missing")
    Path(artifact.path).mkdir(parents=True, exist_ok=True)
    pointer = {"workspace_path": str(model_dir), "stage": stage}
    (Path(artifact.path) / MODEL_POINTER).write_text(json.dumps(pointer, indent=2))
    shutil.copyfile(config, Path(artifact.path) / "config.json")  # what the model is, for whoever opens the artifact
    artifact.metadata.update(pointer)


def model_dir(artifact) -> str:
    """The directory of an input model: where its pointer says in the run's workspace, else the artifact itself (the
    base model, imported into the workspace, or a model a stage exported whole)."""
    path = artifact if isinstance(artifact, str) else artifact.path
    pointer = Path(path) / MODEL_POINTER
    if not pointer.is_file():
        return path
    target = json.loads(pointer.read_text())["workspace_path"]
    if not (Path(target) / "config.json").is_file():
        raise FileNotFoundError(f"the model {path} points at {target} in the run's workspace, which is missing here: "
                                "a step that reads a model needs the workspace (a `workspace` parameter)")
    return target


def stage_inputs(values: dict, workspace: str, dest: Path) -> dict:
    """`values` with every local path outside the workspace that exists here (a file or directory the launcher
    downloaded to this pod's scratch volume) copied under `dest` in the workspace and replaced by the copy: a
    TrainJob's nodes mount the workspace and nothing else of this pod."""
    root = Path(workspace).resolve()
    copies: dict[str, str] = {}

    def visit(value):
        if isinstance(value, dict):
            return {k: visit(v) for k, v in value.items()}
        if isinstance(value, list):
            return [visit(v) for v in value]
        if not (isinstance(value, str) and value.startswith("/") and os.path.exists(value)):
            return value
        source = Path(value).resolve()
        if source == root or root in source.parents or source in root.parents:  # inside it, or holding it
            return value
        if value not in copies:
            # named by the source path: an earlier attempt's complete copy is reused (a reattached TrainJob may be
            # reading it), a partial one (never renamed into place) is not
            target = dest / hashlib.sha256(value.encode()).hexdigest()[:12] / source.name
            if not target.exists():
                partial = target.with_name(f".{target.name}.partial")
                if partial.exists():
                    shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
                partial.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, partial)
                else:
                    shutil.copyfile(source, partial)
                partial.rename(target)
                log.info("copied %s into the workspace (%s): the TrainJob's nodes read it there", value, target)
            copies[value] = str(target)
        return copies[value]

    return visit(values)
