"""The reward_scoring stage as a KFP component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def reward_scoring(model: Input[Model], data: Input[Dataset], settings: str, rewards: str, stage: str,
                   tracking_uri: str, parent_run_id: str, s3_endpoint: str, nproc: int, launch: str,
                   scored: Output[Dataset], metrics: Output[Metrics], workspace: str = ""):
    """Samples k completions per prompt from the current policy, scores them with the reward functions and
    pairs each prompt's best completion with its worst, for DPO.

    Ties, empty completions and identical texts give no pair; each is counted. With nproc > 1 it runs under
    torchrun, one rank per accelerator, each sampling a shard of the prompts (with the vllm engine, groups of
    rollout.tensor_parallel_size ranks share one engine); rank 0 writes the outputs.

    Args:
        model: The policy to sample from (the previous training stage's model).
        data: data_prep's output; the stage samples on prompts.train.jsonl.
        settings: The stage's settings from the spec (JSON; keys of components/reward_scoring/README.md).
        rewards: The spec's reward functions (JSON list).
        stage: The stage's name, for its MLflow run.
        tracking_uri: MLflow tracking URI.
        parent_run_id: The pipeline's MLflow run.
        s3_endpoint: S3 endpoint for s3:// URIs.
        nproc: Processes, one per accelerator.
        launch: The bounds of nproc (JSON, from the spec).
        scored: scored.jsonl (every sample and its rewards), pairs.jsonl ({prompt, chosen, rejected}), stats.json.
        metrics: Reward mean and spread, pairs made and skipped.
        workspace: The run's workspace, where the policy lives (<workspace>/<its stage>/model): given, KFP mounts
            it in the step's pod.
    """
    import json
    import os

    from components.step import Step, model_dir

    step = Step(stage, settings, output_dir=scored.path, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                s3_endpoint=s3_endpoint, nproc=nproc, launch=launch)
    step.run("reward_scoring", model=model_dir(model), prompts={"path": os.path.join(data.path, "prompts.train.jsonl")},
             rewards=json.loads(rewards))
    with open(step.path("stats.json")) as f:  # rank 0's, under torchrun
        step.log_metrics(metrics, json.load(f))
