"""KFP components that open and close a pipeline run: preflight (first step) and close_run (the exit handler)."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output, PipelineTaskFinalStatus

from pipelines.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def preflight(base_model: Input[Model], base_model_uri: str, data_sources: str, tracking_uri: str,
              experiment: str, s3_endpoint: str, buckets: list, secrets: list, namespace: str, kfp_run_id: str,
              tags: dict, report: Output[Markdown]) -> str:
    """Checks, before any accelerator is requested, that the run can work, and opens its MLflow run.

    The base model loads (config, safetensors headers, tokenizer); every data source is there and its first
    rows are well-formed; MLflow and the S3 endpoint answer and the buckets exist; the named Secrets exist
    (through the Kubernetes API, in a cluster). A check that does not apply (a local run) is skipped and says
    why. Fails listing every failed check.

    Args:
        base_model: The base model (a Hugging Face directory).
        base_model_uri: Where the base model was read from.
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
        The MLflow parent run's id.
    """
    import json
    import logging

    from components.preflight.main import CONFIG, raise_for_failures, report_markdown, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = CONFIG(base_model=base_model.path, base_model_uri=base_model_uri, sources=json.loads(data_sources),
                 tracking_uri=tracking_uri, experiment=experiment, run_name=tags.get("posttrain.spec", ""),
                 s3_endpoint=s3_endpoint, buckets=buckets, secrets=secrets, namespace=namespace,
                 kfp_run_id=kfp_run_id, tags=tags)
    summary = run(cfg)
    with open(report.path, "w") as f:
        f.write(report_markdown(summary))
    raise_for_failures(summary)
    return summary["parent_run_id"]


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def close_run(status: PipelineTaskFinalStatus, tracking_uri: str, experiment: str, kfp_run_id: str):
    """Closes the pipeline's MLflow parent run as finished or failed, whatever happened to the steps.

    Runs as the exit handler. The parent run is found by its posttrain.kfp_run_id tag (preflight opened it);
    when there is none (preflight failed before MLflow answered) there is nothing to close.

    Args:
        status: The pipeline's final state.
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment.
        kfp_run_id: The KFP run whose MLflow run to close.
    """
    import logging

    from mlflow import MlflowClient

    from components.preflight.main import parent_run_filter

    logging.basicConfig(level=logging.INFO)
    log = logging.getLogger("components.preflight")
    state = "FINISHED" if status.state == "SUCCEEDED" else "FAILED"
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], parent_run_filter(kfp_run_id)) if exp else []
    for parent in runs:
        client.set_tag(parent.info.run_id, "posttrain.final_state", status.state)
        if status.error_message:
            client.set_tag(parent.info.run_id, "posttrain.error", status.error_message[:5000])
        client.set_terminated(parent.info.run_id, state)
        log.info("closed MLflow run %s as %s (pipeline %s)", parent.info.run_id, state, status.state)
    if not runs:
        log.info("no MLflow run of KFP run %s: nothing to close", kfp_run_id)
