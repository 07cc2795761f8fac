"""Register stage: log the final model in MLflow, register it as a new version, alias it `challenger`.

    python -m components.register --config register.yaml      (or: posttrain stage register --config ...)

Needs MLFLOW_TRACKING_URI (an MLflow server with a model registry; MLflow 3 registers logged models,
not bare artifacts). The model directory (local or s3://, a Hugging Face directory whose weights are
safetensors) becomes the artifacts of an MLflow logged model of the stage's run, with an MLmodel file
that says so; that logged model is registered as a new version of `name`, tagged with the eval
metrics (`eval.<suite>/<metric>`), and given the alias `challenger`. With a `promotion` rule the gate
then runs (components/promotion.py): the new version becomes `champion` only if it beats the
current one, by compare-and-set. A conflict (another promotion moved the champion in between) is
reported in register.json, not raised: the version stays registered as challenger.

A model is registered only when every weight is finite and its evaluation is there (`eval`, with metrics),
whatever the evaluate settings: a diverged model must not become a version anyone could promote.

Outputs in `output_dir`: register.json {name, version, model_id, run_id, promoted, reason}.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from components import promotion as promote
from components import storage, tracking
from components.config import UserError, stage_main
from components.register.config import RegisterConfig

log = logging.getLogger("components.register")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_model_dir(path: Path) -> None:
    """A Hugging Face directory with safetensors weights and no pickled ones (nothing here goes through pickle)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors weights; save the model with safe_serialization=True")
    pickled = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"{path}: pickled files {', '.join(pickled)} are not registered; keep safetensors only")


def check_finite_weights(path: Path) -> None:
    """Every floating-point tensor of the safetensors weights is finite: a diverged model (NaN or infinite
    weights) is refused, naming the file and how many of its tensors are not finite. Read tensor by tensor."""
    import torch
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            names = list(weights.keys())
            bad = [name for name in names if (tensor := weights.get_tensor(name)).is_floating_point()
                   and not bool(torch.isfinite(tensor).all())]
        if bad:
            raise UserError(f"{file}: {len(bad)} of {len(names)} tensors are not finite (first: {bad[0]}); a diverged "
                            "model is not registered")


def check_evaluation(evaluation: dict | None, model: str) -> None:
    """The model's evaluation is there and has metrics."""
    if evaluation is None or not evaluation.get("metrics"):
        raise UserError(f"register: no evaluation of {tracking.redact(model)} (eval "
                        f"{'is not set' if evaluation is None else 'has no metrics'}); a model is registered only with "
                        "the evaluate stage's eval.json")


def log_and_register(client, model_dir: Path, name: str, run_id: str, tags: dict[str, str]) -> tuple[str, str]:
    """Log `model_dir` as a logged model of run `run_id`, register it under `name`; returns (version, model_id)."""
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id, model_type="huggingface",
                                        tags={"posttrain.format": "huggingface-safetensors"})
    try:
        client.log_model_artifacts(logged.model_id, str(model_dir))
        with tempfile.TemporaryDirectory() as tmp:
            # the MLmodel file makes the artifacts a model MLflow can register; no flavor: load with transformers
            Model(run_id=run_id, model_id=logged.model_id,
                  metadata={"format": "huggingface", "weights": "safetensors"}).save(Path(tmp) / "MLmodel")
            client.log_model_artifact(logged.model_id, str(Path(tmp) / "MLmodel"))
    except Exception:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    version = mlflow.register_model(f"models:/{logged.model_id}", name, tags=tags).version
    client.set_registered_model_alias(name, promote.CHALLENGER, version)
    return str(version), logged.model_id


def run(cfg: RegisterConfig) -> dict:
    if not tracking.enabled():
        raise RuntimeError("the register stage needs MLFLOW_TRACKING_URI: an MLflow server with a model registry")
    from mlflow import MlflowClient

    model_dir = storage.localize(cfg.model)
    check_model_dir(model_dir)
    evaluation = promote.read_eval(storage.localize(cfg.eval)) if cfg.eval else None
    check_evaluation(evaluation, cfg.model)
    check_finite_weights(model_dir)
    rule = promote.PromotionRule.from_mapping(cfg.promotion) if cfg.promotion else None
    client = MlflowClient()

    with tracking.stage_run("register", cfg, cfg.parent_run_id) as tracked:
        tags = {promote.eval_tag(k): repr(float(v)) for k, v in evaluation["metrics"].items()}
        version, model_id = log_and_register(client, model_dir, cfg.name, tracked.run_id,
                                             {**tags, "posttrain.source": tracking.redact(cfg.model)})
        log.info("registered %s v%s (logged model %s) as %s", cfg.name, version, model_id, promote.CHALLENGER)
        tracked.log_metrics(evaluation["metrics"], step=0)
        summary = {"name": cfg.name, "version": version, "model_id": model_id, "run_id": tracked.run_id,
                   "promoted": False, "reason": "no promotion rule"}
        if rule is not None:
            try:
                decision = promote.promote_if_better(cfg.name, version, rule, evaluation, client=client,
                                                     via=f"register stage, run {tracked.run_id}")
                summary.update(promoted=decision.promote, reason=decision.reason)
            except promote.PromotionConflict as e:
                log.warning("%s", e)
                summary.update(promoted=False, reason=f"conflict: {e}")
        tracked.set_tags({"posttrain.registered_model": cfg.name, "posttrain.registered_version": version,
                          "posttrain.promoted": str(summary["promoted"]).lower()})

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "register.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(stage_main(__name__, RegisterConfig, run, argv)))


if __name__ == "__main__":
    main()
