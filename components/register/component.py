"""The register stage and the promotion gate's move as KFP components."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def register(model: Input[Model], eval_results: Input[Artifact], registered_model: str, promotion: str,
             settings: str, stage: str, tracking_uri: str, parent_run_id: str, s3_endpoint: str,
             registration: Output[Artifact], card: Output[Markdown], workspace: str = "") -> str:
    """Registers the model in MLflow as a new version (alias challenger, eval metrics as tags) and decides,
    by the spec's promotion rule, whether it beats the current champion.

    Returns the decision, which the promotion gate (a dsl.If) reads: on "promote" the next step moves the
    champion alias, compare-and-set.

    Args:
        model: The final model.
        eval_results: The evaluate stage's eval.json.
        registered_model: The registered model's name.
        promotion: The promotion rule (JSON).
        settings: The stage's settings from the spec (JSON).
        stage: The stage's name, for its MLflow run.
        tracking_uri: MLflow tracking URI (a server with a model registry).
        parent_run_id: The pipeline's MLflow run.
        s3_endpoint: S3 endpoint.
        registration: {name, version, model_id, run_id, decision, reason, champion}.
        card: The version, the decision and why.
        workspace: The run's workspace, where the final model lives (<workspace>/<its stage>/model): given, KFP
            mounts it in the step's pod.

    Returns:
        promote or keep.
    """
    import json
    import tempfile

    from mlflow import MlflowClient

    from components import promotion as gate
    from components.step import Step, model_dir

    step = Step(stage, settings, output_dir=tempfile.mkdtemp(), tracking_uri=tracking_uri,
                parent_run_id=parent_run_id, s3_endpoint=s3_endpoint)
    summary = step.run("register", model=model_dir(model), name=registered_model, eval=eval_results.path)
    rule = gate.PromotionRule.from_mapping(json.loads(promotion))
    evaluation = gate.read_eval(eval_results.path)
    client = MlflowClient()
    champion, decision = gate.compare(client, registered_model, rule, evaluation)  # no champion: the base model
    gate.record_decision(client, registered_model, summary["version"], decision, f"register stage, {stage}")
    result = {**summary, "champion": champion, "decision": "promote" if decision.promote else "keep",
              "reason": decision.reason}
    with open(registration.path, "w") as f:
        json.dump(result, f, indent=2)
    with open(card.path, "w") as f:
        f.write(f"# {registered_model} v{result['version']}\n\nRegistered as challenger (champion: "
                f"{'v' + champion if champion else 'none yet'}).\n\n**Decision: {result['decision']}** — "
                f"{decision.reason}\n")
    return result["decision"]


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def promote(registration: Input[Artifact], eval_results: Input[Artifact], promotion: str, tracking_uri: str,
            kfp_run_id: str, outcome: Output[Artifact], card: Output[Markdown]):
    """Moves the champion alias to the version just registered, compare-and-set: it re-reads the champion,
    re-applies the rule and refuses when another promotion moved the champion since. Every move is recorded in
    the registered model's audit tags.

    Args:
        registration: The register step's result.
        eval_results: The evaluate stage's eval.json.
        promotion: The promotion rule (JSON).
        tracking_uri: MLflow tracking URI.
        kfp_run_id: The KFP run, recorded in the audit trail.
        outcome: {name, version, promoted, reason}.
        card: What happened and why.
    """
    import json
    import logging
    import os

    from components import promotion as gate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    with open(registration.path) as f:
        reg = json.load(f)
    rule = gate.PromotionRule.from_mapping(json.loads(promotion))
    try:
        decision = gate.promote_if_better(reg["name"], reg["version"], rule, gate.read_eval(eval_results.path),
                                          via=f"pipeline run {kfp_run_id}")
        promoted, reason = decision.promote, decision.reason
    except gate.PromotionConflict as e:
        promoted, reason = False, f"conflict: {e}"
    with open(outcome.path, "w") as f:
        json.dump({"name": reg["name"], "version": reg["version"], "promoted": promoted, "reason": reason}, f)
    with open(card.path, "w") as f:
        f.write(f"# {reg['name']} v{reg['version']}: {'champion' if promoted else 'not promoted'}\n\n{reason}\n")
