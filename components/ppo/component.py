"""The ppo stage as a KFP component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def ppo(model: Input[Model], data: Input[Dataset], settings: str, rewards: str, lr: float, max_steps: int,
        stage: str, workspace: str, tracking_uri: str, parent_run_id: str, s3_endpoint: str, nproc: int, nodes: int,
        launch: str, kfp_run_id: str, trained_model: Output[Model], metrics: Output[Metrics],
        reward_model: Input[Model] = None):
    """PPO with a critic: sample one completion per prompt, reward it (reward model, verifiers) with a per-token
    KL penalty to the reference, estimate advantages with GAE and train the actor (clipped surrogate) and the
    critic (clipped value loss) for ppo_epochs × num_minibatches steps per rollout.

    Checkpoints go to the run's workspace (between rounds), so a retried step resumes from the last one.
    With nproc > 1 it runs under torchrun, one rank per accelerator, and with nodes > 1 as a Kubeflow Trainer
    TrainJob of nodes × nproc processes.

    Args:
        model: The policy to start from (the previous training stage's model).
        data: data_prep's output; the stage samples on prompts.train.jsonl.
        settings: The stage's settings from the spec (JSON; keys of components/ppo/README.md).
        rewards: The spec's reward functions (JSON list), used unless the settings give the stage its own.
        lr: Peak learning rate of the actor.
        max_steps: Optimizer steps.
        stage: The stage's name, for its MLflow run and workspace directory.
        workspace: The run's workspace; checkpoints go to <workspace>/<stage>.
        tracking_uri: MLflow tracking URI.
        parent_run_id: The pipeline's MLflow run.
        s3_endpoint: S3 endpoint for s3:// URIs.
        nproc: Processes per node, one per accelerator.
        nodes: Nodes; more than 1 runs the stage as a Kubeflow Trainer TrainJob.
        launch: The bounds of nodes and nproc and the TrainJob's placement (JSON, from the spec).
        kfp_run_id: The KFP run's id: names the stage's TrainJob, so a retry reattaches to it.
        trained_model: The trained actor: a pointer to it in the run's workspace, <workspace>/<stage>/model
            (a Hugging Face directory), where later steps read it.
        metrics: The final step's metrics: objective/scores, objective/kl, policy/clipfrac_avg, val/error, ...
        reward_model: The reward model a stage before trained, if any (named by a reward's stage:reward_model).
    """
    import json
    import os

    from components.rewards import resolve_stage_models
    from components.step import model_dir, train_step

    own = json.loads(settings).get("rewards") if settings else None
    chosen = resolve_stage_models(own if own is not None else json.loads(rewards),
                                  {"reward_model": model_dir(reward_model) if reward_model is not None else None})
    train_step("ppo", stage=stage, settings=settings, lr=lr, max_steps=max_steps, workspace=workspace,
               tracking_uri=tracking_uri, parent_run_id=parent_run_id, s3_endpoint=s3_endpoint, nproc=nproc,
               nodes=nodes, launch=launch, kfp_run_id=kfp_run_id,
               trained_model=trained_model, metrics=metrics, model=model_dir(model),
               prompts={"path": os.path.join(data.path, "prompts.train.jsonl")}, rewards=chosen)
