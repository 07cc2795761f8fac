"""KFP components that open and close a pipeline run: preflight (first step) and close_run (the exit handler)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output, PipelineTaskFinalStatus

from components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def preflight(base_model_uri: str, data_sources: str, tracking_uri: str, experiment: str, s3_endpoint: str,
              buckets: list, secrets: list, namespace: str, kfp_run_id: str, tags: dict,
              report: Output[Markdown]) -> NamedTuple("Outputs", [("parent_run_id", str), ("sources_digest", str)]):
    """Checks, before any accelerator is requested, that the run can work, and opens its MLflow run.

    The base model loads (config, safetensors headers, tokenizer: only those are fetched, never the weights);
    every data source is there and its first rows are well-formed; MLflow and the S3 endpoint answer and the
    buckets exist; the named Secrets exist (through the Kubernetes API, in a cluster). A check that does not
    apply (a local run) is skipped and says why. Fails listing every failed check. Then fingerprints the data
    (S3 ETags and sizes, local sha256s) and the tokenizer files, for data_prep's cache key.

    Args:
        base_model_uri: The base model (a Hugging Face directory, local or s3://).
        data_sources: data_prep's sources (JSON list).
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment.
        s3_endpoint: S3 endpoint ('' for a local run).
        buckets: Buckets the run writes.
        secrets: Kubernetes Secrets holding the credentials.
        namespace: Their namespace.
        kfp_run_id: The KFP run, tagged on the MLflow parent run.
        tags: Lineage tags of the MLflow parent run.
        report: Every check and its outcome.

    Returns:
        parent_run_id: The MLflow parent run's id.
        sources_digest: The data's fingerprint (components.preflight.main.sources_digest).
    """
    import json
    import logging
    import os
    from collections import namedtuple

    from components.preflight.main import PreflightConfig, raise_for_failures, report_markdown, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s3_endpoint:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    cfg = PreflightConfig(base_model_uri=base_model_uri, sources=json.loads(data_sources), tracking_uri=tracking_uri,
                          experiment=experiment, run_name=tags.get("posttrain.spec", ""), s3_endpoint=s3_endpoint,
                          buckets=buckets, secrets=secrets, namespace=namespace, kfp_run_id=kfp_run_id, tags=tags)
    summary = run(cfg)
    with open(report.path, "w") as f:
        f.write(report_markdown(summary))
    raise_for_failures(summary)
    return namedtuple("Outputs", ["parent_run_id", "sources_digest"])(summary["parent_run_id"],
                                                                      summary["sources_digest"])


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def close_run(status: PipelineTaskFinalStatus, tracking_uri: str, experiment: str, kfp_run_id: str):
    """Closes the pipeline's MLflow runs, whatever happened to the steps: a stage's run still RUNNING (its last
    attempt was killed) as failed, then the parent run as finished or failed.

    Runs as the exit handler (under KFP's MLflow plugin KFP closes its runs itself). The parent run is found by its
    posttrain.kfp_run_id tag (preflight opened it), the stages' runs by their parent; when there is none (preflight
    failed before MLflow answered) there is nothing to close.

    Args:
        status: The pipeline's final state.
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment.
        kfp_run_id: The KFP run whose MLflow runs to close.
    """
    import logging

    from mlflow import MlflowClient

    from components.preflight.main import close_pipeline_runs
    from components.tracking import kfp_config

    logging.basicConfig(level=logging.INFO)
    if kfp_config():
        logging.getLogger("components.preflight").info("KFP's MLflow plugin closes the MLflow runs of KFP run %s",
                                                       kfp_run_id)
        return
    closed = close_pipeline_runs(MlflowClient(tracking_uri), experiment, kfp_run_id, status.state,
                                 status.error_message or "")
    if not closed:
        logging.getLogger("components.preflight").info("no MLflow run of KFP run %s: nothing to close", kfp_run_id)
