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
"""

from __future__ import annotations

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
        if tracking_uri and parent_run_id:
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
                   "-m", f"components.{stage.module}", "--config", str(config)]
            log.info("running %s", " ".join(cmd))
            subprocess.run(cmd, check=True)
        summary = self.output_dir / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else {}

    def _run_trainjob(self, stage, values: dict) -> dict:
        """The stage as a TrainJob of self.nodes nodes × self.nproc processes (components.trainjob); its config
        goes to the workspace, which every node mounts."""
        from components import trainjob
        from components.training.distributed import latest_checkpoint, topology_problem

        latest = latest_checkpoint(self.output_dir / "checkpoints")  # refused now rather than on every node
        if latest is not None and (problem := topology_problem(latest, self.nodes, self.nproc)) is not None:
            raise ValueError(f"stage {self.stage}: {problem}")
        placement = trainjob.Placement.from_json(self.launch["trainjob"])
        config = self.output_dir / "step-config.yaml"
        config.write_text(yaml.safe_dump(values, sort_keys=False))
        client = trainjob.kube_client()
        workspace = str(self.output_dir.parent)
        pvc = placement.workspace_pvc or trainjob.workspace_claim(client, placement.namespace, workspace)
        run_id = self.kfp_run_id or "local"
        manifest = trainjob.trainjob_manifest(
            placement, name=trainjob.trainjob_name(run_id, self.stage), run_id=run_id, stage=self.stage,
            nodes=self.nodes, nproc=self.nproc, command=torchrun_command(stage.module, config),
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


def torchrun_command(module: str, config: Path) -> list[str]:
    """The command of every node of a TrainJob: torchrun takes the node count, the node's rank and the
    rendezvous from the PET_* variables Kubeflow Trainer's torch policy sets in each pod."""
    return ["python", "-m", "torch.distributed.run", "-m", f"components.{module}", "--config", str(config)]


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
    step.export("model", trained_model.path)
    step.log_metrics(metrics, summary)
    return summary
