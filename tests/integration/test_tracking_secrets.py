"""With S3 and MLflow credentials in the environment, none of them appears anywhere a run leaves a trace:
stage logs, server logs, MLflow params, tags and metric names, registry tags, every artifact object in S3,
the MLflow database file, the stages' output directories."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def _hits(secrets: dict[str, str], blobs: dict[str, bytes]) -> list[str]:
    return [f"{name} in {where}" for where, data in blobs.items() for name, value in secrets.items()
            if value.encode() in data]


def _files(root: Path, label: str) -> dict[str, bytes]:
    return {f"{label}/{p.relative_to(root)}": p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_no_credential_reaches_logs_mlflow_or_artifacts(sft_run, tracking_env, secrets, tmp_path, helpers):
    import os

    from mlflow import MlflowClient

    from components import storage, tracking

    assert all(os.environ[k] == v for k, v in secrets.items())  # the runs below have them all
    # the register stage in its own process, reading the model from S3 with the credentials
    model_uri = f"s3://posttrain-data/secrets-test/{sft_run.parent_run_id}/model"
    storage.upload(sft_run.model_dir, model_uri)
    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps({"metrics": {"arithmetic-id/accuracy": 0.2, "arithmetic-ood/accuracy": 0.1}}))
    cfg = {"model": model_uri, "name": "secrets-model", "output_dir": str(tmp_path / "register"),
           "eval": str(eval_path), "promotion": {"metric": "arithmetic-id/accuracy"},
           "parent_run_id": sft_run.parent_run_id}
    (tmp_path / "register.yaml").write_text(yaml.safe_dump(cfg))
    register_log = helpers.run_module("components.register", tmp_path / "register.yaml",
                                      {"POSTTRAIN_CACHE": str(tmp_path / "cache")}, tmp_path / "register.log")
    # a config that carries a credential by mistake, and a URL with one in it: both are redacted
    with tracking.stage_run("careless", {"option": f"token={secrets['AWS_SECRET_ACCESS_KEY']}",
                                         "endpoint": f"http://{secrets['MLFLOW_TRACKING_USERNAME']}:"
                                                     f"{secrets['MLFLOW_TRACKING_PASSWORD']}@example.org"},
                            parent_run_id=sft_run.parent_run_id) as careless:
        careless.set_tags({"note": f"key {secrets['AWS_ACCESS_KEY_ID']}"})
        (tmp_path / "report.txt").write_text("a report with no secrets\n")
        careless.log_artifact(tmp_path / "report.txt", "reports")

    blobs = {"sft stage log": sft_run.output.encode(), "register stage log": register_log.encode(),
             **_files(tracking_env.root, "stack"),  # mlflow.db, the MLflow and S3 server logs
             **_files(sft_run.output_dir, "sft output"), **_files(tmp_path / "register", "register output"),
             **_files(tmp_path / "cache", "stage cache")}
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(os.environ["POSTTRAIN_EXPERIMENT"]).experiment_id])
    assert {"sft", "register", "careless"} <= {r.info.run_name for r in runs}
    for r in runs:
        blobs[f"run {r.info.run_name} {r.info.run_id}"] = json.dumps(
            [r.data.params, r.data.tags, sorted(r.data.metrics)]).encode()
    careless_params = client.get_run(careless.run_id).data.params
    assert careless_params["option"] == "token=***" and careless_params["endpoint"] == "http://***@example.org"
    assert [a.path for a in client.list_artifacts(careless.run_id, "reports")] == ["reports/report.txt"]
    for m in client.search_registered_models():
        blobs[f"registered model {m.name}"] = json.dumps([m.tags, m.description]).encode()
        for v in client.search_model_versions(f"name='{m.name}'"):
            blobs[f"model version {m.name} v{v.version}"] = json.dumps([v.tags, v.description, v.source]).encode()
    s3 = storage.client()
    objects = list(s3.list_objects("posttrain-mlflow", recursive=True))
    assert any(o.object_name.endswith("model.safetensors") for o in objects)  # the registered model is there
    for o in objects:
        blobs[f"s3://posttrain-mlflow/{o.object_name}"] = s3.get_object("posttrain-mlflow", o.object_name).read()

    assert len(blobs) > 20 and "stack/mlflow.db" in blobs
    assert _hits(secrets, {"planted": b"x" + secrets["AWS_SECRET_ACCESS_KEY"].encode()})  # the search can find one
    # The S3 server's own request log (MinIO's, in production) shows the access key *id* of presigned URLs,
    # as every S3 access log does; it is an identifier, not a secret. Everything else may show no credential.
    s3_log = {"stack/s3.log": blobs.pop("stack/s3.log", b"")}
    assert _hits({k: v for k, v in secrets.items() if k != "AWS_ACCESS_KEY_ID"}, s3_log) == []
    assert _hits(secrets, blobs) == []
