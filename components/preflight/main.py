"""Preflight: before any accelerator is requested, check that the run can work, and open its MLflow run.

Every check runs, and each ends ok, failed or skipped (saying why: a local run has no cluster to ask):

- model: the base model directory holds config.json, safetensors weights whose headers read (no tensor is
  loaded) and a tokenizer that loads;
- data: every data_prep source is there and a bundled task exists; the first rows of a local source must read as
  rows of its shape (a source none of whose first rows does, e.g. fields mapped wrong, fails, naming file, line
  and field; a few bad rows are left to data_prep's max_bad_fraction); an s3:// source must exist;
- mlflow: the tracking server answers, the experiment exists (created if not), and the pipeline's parent run
  is opened, or found again when this step is retried;
- s3: the endpoint answers and every bucket the run reads or writes exists;
- secrets: the named Secrets exist in the namespace, asked of the Kubernetes API with the pod's service
  account (metadata only: no secret value is ever read).

`run` returns every check; `raise_for_failures` then fails the step listing every failure, after the step has
written the report (a Markdown artifact).
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("components.preflight")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SAMPLE_FILES = 3
"""Files of a local source whose first rows preflight reads (data_prep reads them all)."""


class PreflightError(RuntimeError):
    """One or more preflight checks failed; the message lists them."""


@dataclass(kw_only=True)
class PreflightConfig:
    """What a run is about to use."""

    base_model: str
    """The base model directory (the pipeline's download of base_model_uri)."""
    base_model_uri: str
    """Where the base model came from, as the spec or the run names it."""
    sources: list[dict] = field(default_factory=list)
    """data_prep's sources."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty: no tracking."""
    experiment: str = "posttrain"
    """MLflow experiment of the run."""
    run_name: str = ""
    """Name of the parent run."""
    s3_endpoint: str = ""
    """S3 endpoint; empty: no S3 (a local run)."""
    buckets: list[str] = field(default_factory=list)
    """Buckets the run writes (the pipeline root); those of s3:// inputs are added."""
    secrets: list[str] = field(default_factory=list)
    """Kubernetes Secrets the steps read credentials from."""
    namespace: str = "posttrain"
    """Their namespace."""
    kfp_run_id: str = ""
    """The KFP run: the parent run is tagged with it, so a retried preflight finds it and the closing step can
    close it."""
    tags: dict[str, str] = field(default_factory=dict)
    """Lineage tags of the parent run (spec name and hash, base model, images)."""
    sample_rows: int = 100
    """Rows read from each of the first files of a local source."""


CONFIG = PreflightConfig


@dataclass
class Check:
    name: str
    status: str  # ok | failed | skipped
    detail: str


def check_model(path: str) -> str:
    from safetensors import safe_open
    from transformers import AutoConfig

    from components.models import check_model_dir, load_tokenizer

    p = check_model_dir(path)
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    tensors = 0
    for f in sorted(p.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:  # reads the header only
            tensors += len(list(st.keys()))
    tok = load_tokenizer(p)
    return f"{config.model_type}, {tensors} tensors in safetensors, tokenizer with {len(tok)} tokens"


def check_source(src: dict, sample_rows: int, s3_endpoint: str = "") -> str:
    """A data_prep source exists and (local files) its first rows parse into its shape."""
    from components.data_prep.main import READERS, source_files
    from components.datasets import ROW_FIELDS, ROW_PARSERS, RowError

    if "task" in src:
        from components.tasks import get_task

        get_task(src["task"])
        return f"bundled task {src['task']}"
    uri, shape, fields = src["uri"], src["shape"], src.get("fields", {})
    if uri.startswith("s3://"):
        from components.storage import client, split_s3

        bucket, key = split_s3(uri)
        c = client(s3_endpoint or None)
        first = next(iter(c.list_objects(bucket, prefix=key, recursive=True)), None)
        if first is None:
            raise FileNotFoundError(f"{uri}: no such object or prefix")
        return f"{uri} exists (rows are validated by data_prep)"
    files, _ = source_files(Path(uri), src.get("format", "auto"))
    if not files:
        raise FileNotFoundError(f"{uri}: no data files (jsonl, json, parquet, csv, datasets)")
    errors, read = [], 0
    for path, fmt in files[:SAMPLE_FILES]:
        for n, (line, raw) in enumerate(READERS[fmt](path, str(path))):
            if n >= sample_rows:
                break
            read += 1
            row = raw if isinstance(raw, RowError) else ROW_PARSERS[shape](
                {f: raw[fields.get(f, f)] for f in ROW_FIELDS[shape] if fields.get(f, f) in raw}, str(path), line)
            if isinstance(row, RowError):
                errors.append(str(row))
    if errors and len(errors) == read:
        raise ValueError(f"none of the first {read} rows is a {shape} row (check the source's shape and fields): "
                         + "; ".join(errors[:3]))
    bad = f"; {len(errors)} invalid (data_prep applies max_bad_fraction): {errors[0]}" if errors else ""
    return f"{uri}: {len(files)} file(s), the first {read} rows read as {shape}{bad}"


def check_mlflow(cfg: PreflightConfig) -> tuple[str, str]:
    """(detail, parent run id): the server answers, the experiment exists, the parent run is open."""
    from mlflow import MlflowClient

    from components.tracking import lineage_tags

    if cfg.tracking_uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(cfg.tracking_uri.rstrip("/") + "/health", timeout=15) as r:
            if r.status != 200:
                raise ConnectionError(f"{cfg.tracking_uri}/health answered {r.status}")
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    found = client.search_runs([exp_id], parent_run_filter(cfg.kfp_run_id), max_results=1) if cfg.kfp_run_id else []
    if found:
        return f"{cfg.tracking_uri}: experiment {cfg.experiment}, parent run found again", found[0].info.run_id
    tags = {**lineage_tags(), **cfg.tags, "posttrain.role": "pipeline", "posttrain.kfp_run_id": cfg.kfp_run_id,
            "posttrain.base_model": cfg.base_model_uri}
    run = client.create_run(exp_id, run_name=cfg.run_name or None, tags=tags)
    return f"{cfg.tracking_uri}: experiment {cfg.experiment}, parent run {run.info.run_id}", run.info.run_id


def parent_run_filter(kfp_run_id: str) -> str:
    """MLflow's search filter for the parent run of a KFP run (its stages' runs carry the same kfp run id)."""
    return f"tags.`posttrain.kfp_run_id` = '{kfp_run_id}' and tags.`posttrain.role` = 'pipeline'"


def check_buckets(cfg: PreflightConfig) -> str:
    from components.storage import client, split_s3

    uris = [cfg.base_model_uri, *(s.get("uri", "") for s in cfg.sources)]
    buckets = sorted(set(cfg.buckets) | {split_s3(u)[0] for u in uris if u.startswith("s3://")})
    c = client(cfg.s3_endpoint)
    missing = [b for b in buckets if not c.bucket_exists(b)]
    if missing:
        raise FileNotFoundError(f"bucket(s) {', '.join(missing)} do not exist at {cfg.s3_endpoint}")
    return f"{cfg.s3_endpoint}: bucket(s) {', '.join(buckets) or '(none)'} exist"


def secret_exists(name: str, namespace: str) -> bool:
    """Ask the Kubernetes API for a Secret's metadata only (PartialObjectMetadata: no data in the answer)."""
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    req = urllib.request.Request(
        f"https://{host}:{port}/api/v1/namespaces/{namespace}/secrets/{name}",
        headers={"Authorization": f"Bearer {(SERVICE_ACCOUNT / 'token').read_text().strip()}",
                 "Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"})
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise PermissionError(f"the Kubernetes API answered {e.code} for Secret {namespace}/{name} "
                              "(the pipeline's service account needs get on it)") from None


def run(cfg: PreflightConfig) -> dict:
    checks: list[Check] = []
    parent_run_id = ""

    def attempt(name: str, fn) -> None:
        try:
            checks.append(Check(name, "ok", fn()))
        except Exception as e:  # every check runs; failures are listed together at the end
            checks.append(Check(name, "failed", f"{type(e).__name__}: {e}"))

    attempt("model", lambda: check_model(cfg.base_model))
    for i, src in enumerate(cfg.sources):
        attempt(f"data: {src.get('name') or src.get('uri') or src.get('task', i)}",
                lambda src=src: check_source(src, cfg.sample_rows, cfg.s3_endpoint))
    if cfg.tracking_uri:
        def mlflow_check() -> str:
            nonlocal parent_run_id
            detail, parent_run_id = check_mlflow(cfg)
            return detail
        attempt("mlflow", mlflow_check)
    else:
        checks.append(Check("mlflow", "skipped", "no tracking URI"))
    if cfg.s3_endpoint:
        attempt("s3", lambda: check_buckets(cfg))
    else:
        checks.append(Check("s3", "skipped", "no S3 endpoint: a local run keeps artifacts on this machine"))
    in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ and (SERVICE_ACCOUNT / "token").exists()
    for name in cfg.secrets:
        if not in_cluster:
            checks.append(Check(f"secret {name}", "skipped", "not in a Kubernetes pod: no cluster to ask"))
            continue

        def secret_check(name=name) -> str:
            if not secret_exists(name, cfg.namespace):
                raise LookupError(f"Secret {cfg.namespace}/{name} does not exist (see k8s/secrets/)")
            return f"{cfg.namespace}/{name} exists"
        attempt(f"secret {name}", secret_check)

    for c in checks:
        log.info("%-8s %s: %s", c.status, c.name, c.detail)
    return {"checks": [c.__dict__ for c in checks], "parent_run_id": parent_run_id,
            "failed": [f"{c.name}: {c.detail}" for c in checks if c.status == "failed"]}


def raise_for_failures(summary: dict) -> None:
    if summary["failed"]:
        raise PreflightError("preflight failed:\n" + "\n".join(f"- {f}" for f in summary["failed"]))


def report_markdown(summary: dict) -> str:
    mark = {"ok": "✅", "failed": "❌", "skipped": "⏭️"}
    rows = [f"| {mark[c['status']]} {c['status']} | {c['name']} | {c['detail']} |" for c in summary["checks"]]
    return "\n".join(["# Preflight", "", "| status | check | detail |", "|---|---|---|", *rows, ""])
