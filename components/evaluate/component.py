"""The evaluate stage as a KFP component."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], base_model: Input[Model], settings: str, suites: str, rewards: str,
             candidate: str, lineage: str, stage: str, workspace: str, tracking_uri: str, parent_run_id: str,
             s3_endpoint: str, nproc: int, launch: str, spec_name: str, kfp_run_id: str, results: Output[Artifact],
             report: Output[HTML], metrics: Output[Metrics]):
    """Evaluates the candidate and its baselines (the base model and every earlier training stage) on the
    same prompts and seeds: accuracy with bootstrap intervals, pass@k, rewards, entropy, KL to the base model.

    Writes the eval JSON the promotion gate reads, KFP metrics, and a self-contained HTML report with the
    in-domain and out-of-domain accuracy of every stage and the training curves (entropy, reward). With nproc > 1
    it runs under torchrun, one rank per accelerator, each sampling a shard of the prompts (with the vllm engine,
    groups of rollout.tensor_parallel_size ranks share one engine); rank 0 writes the outputs.

    Args:
        model: The candidate: the last training stage's model.
        base_model: The base model: a baseline and the reference of kl_to_base.
        settings: The stage's settings from the spec (JSON; keys of components/evaluate/README.md).
        suites: The spec's eval suites (JSON list).
        rewards: The spec's reward functions (JSON list; empty: each suite task's verifier).
        candidate: The candidate's name: the stage that trained it.
        lineage: The training stages before, in order, each with the model it started from (a JSON object
            {name: parent}, parent base or an earlier name); each one's output is <workspace>/<name>.
        stage: The stage's name, for its MLflow run and workspace directory.
        workspace: The run's workspace (training stages keep their model and metrics.jsonl there).
        tracking_uri: MLflow tracking URI.
        parent_run_id: The pipeline's MLflow run.
        s3_endpoint: S3 endpoint for s3:// suites.
        nproc: Processes, one per accelerator.
        launch: The bounds of nproc (JSON, from the spec).
        spec_name: The spec's name: with kfp_run_id, the run's name the report is titled with.
        kfp_run_id: The KFP run's id.
        results: eval.json: {metrics, baselines, suites, ...}.
        report: The HTML report.
        metrics: The candidate's metrics, each baseline's (baselines/<name>/...) and the differences.
    """
    import json
    import os

    from components.step import Step, model_dir

    parents = json.loads(lineage)
    names = list(parents)
    baselines = {"base": model_dir(base_model), **{k: os.path.join(workspace, k, "model") for k in names}}
    baselines.pop(candidate, None)
    histories = {k: os.path.join(workspace, k, "metrics.jsonl") for k in names}
    step = Step(stage, settings, output_dir=os.path.join(workspace, stage), tracking_uri=tracking_uri,
                parent_run_id=parent_run_id, s3_endpoint=s3_endpoint, nproc=nproc, launch=launch)
    wiring = {"model": model_dir(model), "name": candidate, "baselines": baselines, "base_model": model_dir(base_model),
              "parents": parents, "run_name": f"{spec_name} {kfp_run_id}",
              "suites": json.loads(suites),
              "training_metrics": {k: p for k, p in histories.items() if os.path.exists(p)}}
    if json.loads(rewards):
        wiring["rewards"] = json.loads(rewards)
    step.run("evaluate", **wiring)
    step.export("eval.json", results.path)
    step.export("report.html", report.path)
    with open(step.path("metrics.json")) as f:
        step.log_metrics(metrics, json.load(f))
