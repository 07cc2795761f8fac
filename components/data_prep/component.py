"""The data_prep stage as a KFP component."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pipelines.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def data_prep(tokenizer: Input[Model], data_sources: str, settings: str, s3_endpoint: str,
              data: Output[Dataset], metrics: Output[Metrics]):
    """Normalizes every data source into the three row shapes, filters, splits and checks it.

    Reads JSONL, JSON, Parquet, CSV or `datasets` directories (local or s3://) and bundled tasks, maps the
    named fields onto sft, preference or prompts rows, renders them with the tokenizer's chat template,
    removes duplicates and rows over max_length, splits train/eval by a hash of the prompt and flags eval
    prompts that also occur in training data. Every rejected row is counted with its file, line and reason.
    Its inputs are the same from run to run unless the data change, so the step is cached.

    Args:
        tokenizer: The base model, whose tokenizer renders and counts the rows.
        data_sources: The sources (JSON list; see components/data_prep/README.md).
        settings: The spec's data settings (JSON): max_length, eval_fraction, contamination, ...
        s3_endpoint: S3 endpoint for s3:// sources.
        data: <shape>.<role>.jsonl (sft.train.jsonl, prompts.eval.jsonl, ...), stats.json and rejected.jsonl.
        metrics: Rows kept and dropped.
    """
    import json

    from components.step import Step

    step = Step("data_prep", settings, output_dir=data.path, s3_endpoint=s3_endpoint)
    summary = step.run("data_prep", sources=json.loads(data_sources), tokenizer=tokenizer.path)
    step.log_metrics(metrics, {"outputs": summary["outputs"], "totals": summary["totals"]})
