"""Preflight: before any accelerator is requested, check that the run can work, and open its MLflow run.

Every check runs, and each ends ok, failed or skipped (saying why: a local run has no cluster to ask):

- model: the base model directory holds config.json, safetensors weights whose headers read and a tokenizer
  that loads; only those are fetched (the config and tokenizer files, and a ranged read of each weight file's
  header), never the weights;
- data: every data_prep source is there and a bundled task exists; the first rows of a local source must read as
  rows of its shape (a source none of whose first rows does, e.g. fields mapped wrong, fails, naming file, line
  and field; a few bad rows are left to data_prep's max_bad_fraction); an s3:// source must exist;
- mlflow: the tracking server answers, the experiment exists (created if not, tagged as model training), and the
  pipeline's parent run is opened, or found again when this step is retried; under KFP's MLflow plugin
  (KFP_MLFLOW_CONFIG) KFP's run for the pipeline is the parent, tagged with the lineage;
- s3: the endpoint answers and every bucket the run reads or writes exists;
- secrets: the named Secrets exist in the namespace, asked of the Kubernetes API with the pod's service
  account (metadata only: no secret value is ever read);
- data digest: a fingerprint of the data (`sources_digest`), passed to data_prep so that its cache key changes
  with the bytes of the sources, not only with their URIs.

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

    base_model_uri: str
    """The base model, as the spec or the run names it: a local directory or s3:// (only its config, tokenizer
    and weight headers are read)."""
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



@dataclass
class Check:
    name: str
    status: str  # ok | failed | skipped
    detail: str


def check_model(uri: str) -> str:
    """The model at `uri` (a local directory or s3://) has a config, safetensors weights whose headers read and a
    tokenizer that loads. Only what is checked is read: the config and tokenizer files, and each weight file's
    header (a ranged read); no weight is downloaded."""
    from transformers import AutoConfig

    from components.models import load_tokenizer, model_files

    files = model_files(uri)
    if not (files / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(files, trust_remote_code=False)
    names = _top_level_files(uri)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        pickled = [n for n in names if n.endswith((".bin", ".pt"))]
        extra = f" (found {', '.join(pickled)}; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{uri}: no *.safetensors weights{extra}; only safetensors are loaded")
    tensors = sum(len(safetensors_header(f"{str(uri).rstrip('/')}/{n}")) for n in weights)
    tok = load_tokenizer(files)
    return f"{config.model_type}, {tensors} tensors in safetensors, tokenizer with {len(tok)} tokens"


def _top_level_files(uri: str) -> list[str]:
    from components.storage import digest, is_s3

    if is_s3(uri):  # one listing: ETags and sizes, nothing downloaded
        return [path for path, _, _ in digest(uri) if "/" not in path]
    return sorted(f.name for f in Path(uri).iterdir() if f.is_file())


def safetensors_header(uri: str) -> dict:
    """The tensors of a safetensors file (name → dtype, shape, offsets), read from its header only: 8 bytes of
    header length, then the JSON header."""
    import json

    from components.storage import read_range

    head = read_range(uri, 0, 8)
    if len(head) < 8:
        raise ValueError(f"{uri}: not a safetensors file (shorter than its header)")
    size = int.from_bytes(head, "little")
    if size > 100 * 2**20:
        raise ValueError(f"{uri}: not a safetensors file (a header of {size} bytes)")
    header = json.loads(read_range(uri, 8, size))
    header.pop("__metadata__", None)
    return header


def sources_digest(sources: list[dict], base_model_uri: str, s3_endpoint: str = "") -> tuple[str, int]:
    """(digest, files): a sha256 over what data_prep's outputs depend on beyond its parameters: each file
    source's files (components.storage.digest: S3 ETags and sizes, local sha256s), each task source's generator
    (its settings and its module's code) and the base model's config and tokenizer files. data_prep takes it as
    a parameter, so its cache key changes when the bytes under the same URIs, or a task's problems, change, and
    stays the same when they do not."""
    import hashlib
    import inspect
    import json

    from components.storage import digest, not_weights
    from components.tasks import get_task

    def generator(name: str) -> str:
        task = get_task(name)
        code = Path(inspect.getfile(type(task))).read_bytes()
        return hashlib.sha256(repr(task).encode() + code).hexdigest()

    parts = [{"source": src, "files": digest(src["uri"], s3_endpoint or None)} if "uri" in src
             else {"source": src, "generator": generator(src["task"])} if "task" in src else {"source": src}
             for src in sources]
    parts.append({"tokenizer": digest(base_model_uri, s3_endpoint or None, include=not_weights)})
    files = sum(len(p.get("files", p.get("tokenizer", []))) for p in parts)
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), files


def check_source(src: dict, sample_rows: int, s3_endpoint: str = "") -> str:
    """A data_prep source exists and (local files) its first rows parse into its shape."""
    from components.datasets import RowError
    from components.sources.formats import ALPACA_TEMPLATE, RowReader
    from components.sources.readers import READERS, BrokenFile, source_files

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
    parse = RowReader(shape, src.get("schema", "auto"), fields, src.get("split"),
                      src.get("alpaca_template") or ALPACA_TEMPLATE)
    for path, fmt in files[:SAMPLE_FILES]:
        try:
            for n, (line, raw) in enumerate(READERS[fmt](path, str(path))):
                if n >= sample_rows:
                    break
                read += 1
                row = raw if isinstance(raw, RowError) else parse(raw, str(path), line)
                if isinstance(row, RowError):
                    errors.append(str(row))
        except BrokenFile as e:
            raise ValueError(f"{path}: {e}") from None
    if errors and len(errors) == read:
        raise ValueError(f"none of the first {read} rows is a {shape} row (check the source's shape and fields): "
                         + "; ".join(errors[:3]))
    bad = f"; {len(errors)} invalid (data_prep applies max_bad_fraction): {errors[0]}" if errors else ""
    return f"{uri}: {len(files)} file(s), the first {read} rows read as {shape}{bad}"


def check_mlflow(cfg: PreflightConfig) -> tuple[str, str]:
    """(detail, parent run id): the server answers, the experiment exists, the parent run is open. Under KFP's
    MLflow plugin the parent run is KFP's run for the pipeline: it gets the lineage tags, and no other is made."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    from components.tracking import ensure_experiment, experiment_url, lineage_tags, mark_model_training, use_kfp

    kfp = use_kfp()
    uri = os.environ["MLFLOW_TRACKING_URI"] if kfp else cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=15) as r:
            if r.status != 200:
                raise ConnectionError(f"{uri}/health answered {r.status}")
    client = MlflowClient(uri)
    if kfp:
        mark_model_training(client, kfp.experiment_id)
        tags = {**lineage_tags(), **cfg.tags, "posttrain.kfp_run_id": cfg.kfp_run_id,
                "posttrain.base_model": cfg.base_model_uri}
        client.log_batch(kfp.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return (f"{uri}: KFP's MLflow run {kfp.parent_run_id} ({experiment_url(kfp.experiment_id, uri)})",
                kfp.parent_run_id)
    exp_id = ensure_experiment(client, cfg.experiment)
    found = client.search_runs([exp_id], parent_run_filter(cfg.kfp_run_id), max_results=1) if cfg.kfp_run_id else []
    if found:
        return f"{cfg.tracking_uri}: experiment {cfg.experiment}, parent run found again", found[0].info.run_id
    tags = {**lineage_tags(), **cfg.tags, "posttrain.role": "pipeline", "posttrain.kfp_run_id": cfg.kfp_run_id,
            "posttrain.base_model": cfg.base_model_uri}
    run = client.create_run(exp_id, run_name=cfg.run_name or None, tags=tags)
    return (f"{cfg.tracking_uri}: experiment {cfg.experiment} ({experiment_url(exp_id, cfg.tracking_uri)}), "
            f"parent run {run.info.run_id}"), run.info.run_id


def parent_run_filter(kfp_run_id: str) -> str:
    """MLflow's search filter for the parent run of a KFP run (its stages' runs carry the same kfp run id)."""
    return f"tags.`posttrain.kfp_run_id` = '{kfp_run_id}' and tags.`posttrain.role` = 'pipeline'"


def close_pipeline_runs(client, experiment: str, kfp_run_id: str, final_state: str, error: str = "") -> list[str]:
    """Close the MLflow runs of a KFP run (the exit handler): every child run still RUNNING (an attempt killed with
    no retry left, which could not close its own run) as FAILED, then the parent run as FINISHED when the pipeline
    succeeded, else FAILED. Returns the ids of the parent runs closed."""
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], parent_run_filter(kfp_run_id)) if exp else []
    for parent in parents:
        pid = parent.info.run_id
        for child in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}' "
                                                             "and attributes.status = 'RUNNING'"):
            client.set_tag(child.info.run_id, "posttrain.final_state", "FAILED: still running when the pipeline ended")
            client.set_terminated(child.info.run_id, "FAILED")
            log.info("closed MLflow run %s (%s), left running, as FAILED", child.info.run_id, child.info.run_name)
        client.set_tag(pid, "posttrain.final_state", final_state)
        if error:
            client.set_tag(pid, "posttrain.error", error[:5000])
        client.set_terminated(pid, "FINISHED" if final_state == "SUCCEEDED" else "FAILED")
        log.info("closed MLflow run %s (pipeline %s)", pid, final_state)
    return [p.info.run_id for p in parents]


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


def _check_secrets(cfg: PreflightConfig, checks: list[Check], attempt) -> None:
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


def run(cfg: PreflightConfig) -> dict:
    from components.storage import bytes_downloaded

    checks: list[Check] = []
    parent_run_id = ""

    def attempt(name: str, fn) -> None:
        try:
            checks.append(Check(name, "ok", fn()))
        except Exception as e:  # every check runs; failures are listed together at the end
            checks.append(Check(name, "failed", f"{type(e).__name__}: {e}"))

    attempt("model", lambda: check_model(cfg.base_model_uri))
    for i, src in enumerate(cfg.sources):
        attempt(f"data: {src.get('name') or src.get('uri') or src.get('task', i)}",
                lambda src=src: check_source(src, cfg.sample_rows, cfg.s3_endpoint))
    if cfg.tracking_uri or os.environ.get("KFP_MLFLOW_CONFIG"):
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
    _check_secrets(cfg, checks, attempt)

    digest = ""
    if not any(c.status == "failed" and c.name.startswith(("data:", "model")) for c in checks):
        def digest_check() -> str:
            nonlocal digest
            digest, files = sources_digest(cfg.sources, cfg.base_model_uri, cfg.s3_endpoint)
            return f"{digest} over {files} file(s)"
        attempt("data digest", digest_check)
    checks.append(Check("downloaded", "ok", f"{bytes_downloaded()} bytes from S3"))
    for c in checks:
        log.info("%-8s %s: %s", c.status, c.name, c.detail)
    return {"checks": [c.__dict__ for c in checks], "parent_run_id": parent_run_id, "sources_digest": digest,
            "failed": [f"{c.name}: {c.detail}" for c in checks if c.status == "failed"]}


def raise_for_failures(summary: dict) -> None:
    if summary["failed"]:
        raise PreflightError("preflight failed:\n" + "\n".join(f"- {f}" for f in summary["failed"]))


def report_markdown(summary: dict) -> str:
    mark = {"ok": "✅", "failed": "❌", "skipped": "⏭️"}
    rows = [f"| {mark[c['status']]} {c['status']} | {c['name']} | {c['detail']} |" for c in summary["checks"]]
    return "\n".join(["# Preflight", "", "| status | check | detail |", "|---|---|---|", *rows, ""])
