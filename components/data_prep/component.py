"""The data_prep stage as a KFP component."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def data_prep(base_model: str, data_sources: str, sources_digest: str, settings: str, s3_endpoint: str,
              data: Output[Dataset], metrics: Output[Metrics]):
    """Normalizes every data source into the three row shapes, filters, splits and checks it.

    Reads JSONL, JSON, Parquet, CSV or `datasets` directories (local or s3://) and bundled tasks, maps the
    named fields onto sft, preference or prompts rows, renders them with the tokenizer's chat template,
    removes duplicates and rows over max_length, splits train/eval by a hash of the prompt and flags eval
    prompts that also occur in training data. Every rejected row is counted with its file, line and reason.
    The step is cached: its parameters are the same from run to run unless the sources, the settings or the
    data change, and preflight's `sources_digest` (the S3 ETags and sizes, or local sha256s, of every source file
    and of the tokenizer files) changes with the bytes under the same URIs.

    Args:
        base_model: The base model (local or s3://), whose tokenizer renders and counts the rows: only its config
            and tokenizer files are fetched, not its weights.
        data_sources: The sources (JSON list; see components/data_prep/README.md).
        sources_digest: preflight's fingerprint of the sources and the tokenizer: part of the cache key only.
        settings: The spec's data settings (JSON): max_length, eval_fraction, contamination, ...
        s3_endpoint: S3 endpoint for s3:// sources.
        data: <shape>.<role>.jsonl (sft.train.jsonl, prompts.eval.jsonl, ...), stats.json and rejected.jsonl.
        metrics: Rows kept and dropped.
    """
    import json
    import logging

    from components.models import model_files
    from components.step import Step
    from components.storage import bytes_downloaded

    step = Step("data_prep", settings, output_dir=data.path, s3_endpoint=s3_endpoint)
    logging.getLogger("components.data_prep").info("data digest %s", sources_digest)
    tokenizer = model_files(base_model)  # config and tokenizer files only
    summary = step.run("data_prep", sources=json.loads(data_sources), tokenizer=str(tokenizer))
    step.log_metrics(metrics, {"outputs": summary["outputs"], "totals": summary["totals"],
                               "bytes_downloaded": bytes_downloaded()})
