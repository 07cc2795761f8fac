"""The reward_model stage as a KFP component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def reward_model(model: Input[Model], pairs: Input[Dataset], pairs_file: str, settings: str, lr: float,
                 max_steps: int, stage: str, workspace: str, tracking_uri: str, parent_run_id: str, s3_endpoint: str,
                 nproc: int, nodes: int, launch: str, kfp_run_id: str, trained_model: Output[Model],
                 metrics: Output[Metrics]):
    """A reward model: a scalar head on the policy, trained on {prompt, chosen, rejected} pairs (Bradley–Terry).

    A share of the pairs (by a hash of the prompt) is held out for eval/accuracy, eval/margin and the reward
    mean/std. The output is a Hugging Face directory the `reward_model` reward loads. Checkpoints go to the run's
    workspace, so a retried step resumes from the last one. With nproc > 1 it runs under torchrun.

    Args:
        model: The model to start from (the previous training stage's model).
        pairs: The preference pairs: reward_scoring's output, or data_prep's.
        pairs_file: The pairs' file inside it: pairs.jsonl or preference.train.jsonl.
        settings: The stage's settings from the spec (JSON; keys of components/reward_model/README.md).
        lr: Peak learning rate.
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
        trained_model: The reward model: a pointer to it in the run's workspace, <workspace>/<stage>/model
            (a Hugging Face directory), where later steps read it.
        metrics: The final metrics: eval/accuracy, eval/margin, eval/mean_reward, eval/std_reward, ...
    """
    import os

    from components.step import model_dir, train_step

    train_step("reward_model", stage=stage, settings=settings, lr=lr, max_steps=max_steps, workspace=workspace,
               tracking_uri=tracking_uri, parent_run_id=parent_run_id, s3_endpoint=s3_endpoint, nproc=nproc,
               nodes=nodes, launch=launch, kfp_run_id=kfp_run_id,
               trained_model=trained_model, metrics=metrics, model=model_dir(model),
               train_data=os.path.join(pairs.path, pairs_file))
