"""MLflow tracking: one parent run per pipeline run, one child run per step, metrics streamed by step.

    parent = start_parent("my-spec", tags={...})          # the pipeline's first step; pass the id on
    with stage_run("sft", cfg, parent_run_id=parent) as run:   # or env POSTTRAIN_PARENT_RUN_ID
        train(..., on_metrics=run.log_metrics)
    end_parent(parent, "FINISHED")

Tracking is on when MLFLOW_TRACKING_URI is set; without it every call is a no-op and stages run as
usual. Only rank 0 (env RANK) logs. Steps of one pipeline run in different processes and pods, so
the parent run id travels between them as an argument or as POSTTRAIN_PARENT_RUN_ID; a child run
goes into its parent's experiment and carries `mlflow.parentRunId`. A retried step (a killed pod, a failed
attempt) reopens the child run of its earlier attempt, found by its tags (KFP run id, parent, `posttrain.task`),
so a step has one run whose metrics continue; `posttrain.attempt` counts the attempts. The pipeline's exit
handler marks a child run still RUNNING (an attempt killed with no retry left) as FAILED.

A stage run records its config as params (flattened, secrets redacted) and lineage as tags: KFP run
id, spec hash, base model URI, code version and image (POSTTRAIN_KFP_RUN_ID, POSTTRAIN_SPEC_HASH,
POSTTRAIN_BASE_MODEL, POSTTRAIN_CODE_VERSION or the git commit, POSTTRAIN_IMAGE), and for every
config field that names an input (an s3:// URI or an existing local path) the URI and, for a local
file, its sha256 digest.

An MLflow outage never stops training and loses no metric. Creating the run is synchronous (a wrong
tracking URI fails the stage before any compute is spent); after that every write (metrics, params,
tags, artifacts) is appended to a journal file and sent by a background thread in order, in batches,
retried with backoff until it succeeds. Memory stays bounded however long the outage (the journal is
on disk, the thread holds one batch); a resent batch is harmless (MLflow drops duplicate metric
points, which carry their original timestamps). At the end of the stage the journal is flushed
(waiting up to POSTTRAIN_TRACKING_FLUSH_TIMEOUT seconds, default 600) before the run is closed; what
could not be sent stays in the journal file, whose path is printed in a warning, with the run's closing status: the
next stage that starts with the same tracking URI and spool directory sends an orphaned journal (one whose process
is gone, killed or ended while MLflow was away) before its own writes, so the run reaches MLflow whole and closed.

MLflow unreachable from the start fails a stage in one line (TrackingUnreachableError, a UserError: exit 2) after
POSTTRAIN_TRACKING_CONNECT_TIMEOUT seconds of retries (default 30), instead of the MLflow client's own minutes of
retries; `bounded_retry_env` gives other processes (a pipeline's steps) the same bound. SIGTERM during a stage run
(a scheduler, a timeout, `posttrain run` stopping its steps) ends it like Ctrl-C: the run is closed KILLED.

Under Kubeflow Pipelines' MLflow plugin (KFP 2.17, KEP-12862) the pipeline already has MLflow runs: the API server
opens one per pipeline run and the driver one nested run per task, and the launcher closes them. The step's container
then carries KFP_MLFLOW_CONFIG (a JSON object: endpoint, parentRunId, experimentId, authType, workspace, timeout,
insecureSkipVerify; kubeflow/pipelines backend/src/common/plugins/mlflow/config.go, MLflowRuntimeConfig) and, when
the admin sets injectUserEnvVars, MLFLOW_RUN_ID (the task's nested run), MLFLOW_EXPERIMENT_ID, MLFLOW_TRACKING_URI,
MLFLOW_WORKSPACE and MLFLOW_TRACKING_AUTH (backend/src/v2/common/plugins/mlflow/handler.go,
RetrieveUserContainerEnvVars). Then `use_kfp` points the client at KFP's server, workspace and auth; no posttrain
parent run is made (`start_parent` returns KFP's pipeline run, `end_parent` leaves it to KFP), and a stage logs into
the task's own run, MLFLOW_RUN_ID (the plugin's design: user code's metrics and the launcher's go to the same nested
run), reopened by every attempt of the task; without MLFLOW_RUN_ID the stage run nests under KFP's pipeline run.

Experiments posttrain creates or uses are tagged mlflow.experimentKind = custom_model_development (MLflow's
"model training" kind); `experiment_url` links the experiment's runs table.

System metrics (CPU, memory, and
per-GPU memory and utilization when there are GPUs) are sampled every
POSTTRAIN_SYSTEM_METRICS_INTERVAL seconds (default 15, 0: off) into the same stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from components.config import UserError
from components.storage import sha256_file

log = logging.getLogger(__name__)

PARENT_ENV = "POSTTRAIN_PARENT_RUN_ID"
TASK_ENV = "POSTTRAIN_TASK"
"""The pipeline step's name (the spec's stage name, e.g. psft for a stage of kind sft), set by components.step."""
EXPERIMENT_ENV = "POSTTRAIN_EXPERIMENT"
DEFAULT_EXPERIMENT = "posttrain"
LINEAGE_ENV = {
    "posttrain.kfp_run_id": "POSTTRAIN_KFP_RUN_ID",
    "posttrain.spec_hash": "POSTTRAIN_SPEC_HASH",
    "posttrain.base_model": "POSTTRAIN_BASE_MODEL",
    "posttrain.image": "POSTTRAIN_IMAGE",
}
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""Environment variables whose values never reach MLflow: they are replaced by *** in params and tags."""
MAX_PARAM_LENGTH = 6000
LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
"""MLflow's log_batch limits per request, by kind; all kinds together at most BATCH_LIMIT."""
BATCH_LIMIT = 1000
CONNECT_TIMEOUT_ENV = "POSTTRAIN_TRACKING_CONNECT_TIMEOUT"
"""Seconds a stage keeps trying to reach MLflow when it opens its run before it fails (default 30)."""
UNDELIVERED = "MLflow writes not delivered"
"""The start of the warning a stage prints when its journal could not be sent (`posttrain run` collects it)."""
KFP_CONFIG_ENV = "KFP_MLFLOW_CONFIG"
"""Set by Kubeflow Pipelines' MLflow plugin on the step's container: the run's resolved MLflow configuration."""
KFP_TASK_RUN_ENV = "MLFLOW_RUN_ID"
"""The task's nested run, made by KFP's driver (set with injectUserEnvVars)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
"""MLflow's experiment kinds (its UI's ExperimentKind): genai_development, custom_model_development, ..."""


class TrackingUnreachableError(UserError):
    """MLflow did not answer within the connect budget: the message names the URI, the error and the setting."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the stage runs, so it ends like Ctrl-C: its run closed KILLED, `finally` blocks run."""


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get(KFP_CONFIG_ENV))


@dataclasses.dataclass(frozen=True)
class KfpMlflow:
    """KFP_MLFLOW_CONFIG, the fields posttrain uses."""

    endpoint: str
    parent_run_id: str
    """KFP's run for the whole pipeline run."""
    experiment_id: str
    auth_type: str = "kubernetes"
    """kubernetes (the pod's service-account token), bearer (MLFLOW_TRACKING_TOKEN), basic-auth
    (MLFLOW_TRACKING_USERNAME and _PASSWORD: both from the Secret kfp-mlflow-credentials) or none."""
    workspace: str = ""
    insecure_skip_verify: bool = False


def kfp_config() -> KfpMlflow | None:
    """The KFP plugin's configuration from the environment, or None when the step does not run under it."""
    raw = os.environ.get(KFP_CONFIG_ENV)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        cfg = KfpMlflow(endpoint=data["endpoint"], parent_run_id=data["parentRunId"],
                        experiment_id=data["experimentId"], auth_type=data.get("authType") or "kubernetes",
                        workspace=data.get("workspace") or "",
                        insecure_skip_verify=bool(data.get("insecureSkipVerify")))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{KFP_CONFIG_ENV}: not KFP's MLflow configuration ({type(e).__name__}: {e})") from None
    if cfg.auth_type not in ("kubernetes", "bearer", "basic-auth", "none"):
        raise UserError(f"{KFP_CONFIG_ENV}: authType {cfg.auth_type!r} is not kubernetes, bearer, basic-auth or none")
    return cfg


def use_kfp() -> KfpMlflow | None:
    """Under KFP's MLflow plugin, set the environment the MLflow client reads to KFP's configuration: its
    server, workspace and auth (as KFP's driver sets them for user code); returns the configuration, or None."""
    cfg = kfp_config()
    if cfg is None:
        return None
    os.environ["MLFLOW_TRACKING_URI"] = cfg.endpoint
    if cfg.workspace:
        os.environ["MLFLOW_WORKSPACE"] = cfg.workspace
    if cfg.auth_type == "kubernetes":  # the token is read from the pod on every request (it rotates)
        os.environ.setdefault("MLFLOW_TRACKING_AUTH", "kubernetes-namespaced" if cfg.workspace else "kubernetes")
    need = {"bearer": ("MLFLOW_TRACKING_TOKEN",),
            "basic-auth": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}.get(cfg.auth_type, ())
    missing = [k for k in need if not os.environ.get(k)]
    if missing:
        raise UserError(f"{KFP_CONFIG_ENV}: authType {cfg.auth_type} but {', '.join(missing)} is not set "
                        "(KFP sets it from the Secret kfp-mlflow-credentials)")
    if cfg.insecure_skip_verify:
        os.environ["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
    return cfg


def experiment_url(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's page in MLflow's UI, opened on its runs table: MLflow 3.17's UI picks the view from the
    workflowType in the link (else the browser's last choice, GenAI by default), not from the experiment's tag."""
    base = (uri or os.environ.get("MLFLOW_TRACKING_URI", "")).rstrip("/")
    query = "workflowType=machine_learning"
    if os.environ.get("MLFLOW_WORKSPACE"):
        query += f"&workspace={os.environ['MLFLOW_WORKSPACE']}"
    return f"{_USERINFO.sub('', base)}/#/experiments/{experiment_id}?{query}"


def mark_model_training(client, experiment_id: str) -> None:
    """Tag the experiment as MLflow's model-training kind, unless someone chose a kind for it already."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def connect_timeout() -> float:
    return float(os.environ.get(CONNECT_TIMEOUT_ENV, "30"))


def bounded_retry_env(budget: float | None = None) -> dict[str, str]:
    """The MLflow client's retry settings that keep one call's retries within `budget` seconds (default: the
    connect timeout), for those the user has not set. The client's defaults retry a refused connection for about
    four minutes (7 retries, backoff factor 2); with factor 1 urllib3 sleeps 0, 2, 4, 8, ... s before the 1st, 2nd,
    3rd, 4th ... retry, plus up to 1 s of jitter each."""
    budget = connect_timeout() if budget is None else budget
    retries, slept = 0, 0.0
    while retries < 7 and slept + (2 ** retries if retries else 0) + 1 <= budget:
        slept += (2 ** retries if retries else 0) + 1
        retries += 1
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    return {k: v for k, v in wanted.items() if k not in os.environ}


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ while the body runs (the MLflow client reads its retry settings per request)."""
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)


def _unreachable(uri: str, budget: float, e: BaseException) -> TrackingUnreachableError:
    return TrackingUnreachableError(
        f"MLflow at {redact(uri)} is unreachable ({type(e).__name__}: {redact(str(e))[:300]}) after {budget:g} s of "
        f"retries; start it, fix MLFLOW_TRACKING_URI, or set {CONNECT_TIMEOUT_ENV} to wait longer")


def _within_budget(fn: Callable[[], Any], uri: str, budget: float) -> Any:
    """fn() retried with backoff (connection errors, 5xx) until `budget` s have passed, then one line of error; an
    answer that will not change (4xx) is raised as it is."""
    deadline, wait = time.monotonic() + budget, 0.5
    while True:
        try:
            return fn()
        except Exception as e:
            if _permanent(e):
                raise
            if time.monotonic() + wait > deadline:
                raise _unreachable(uri, budget, e) from e
            log.warning("tracking: MLflow at %s not answering (%s); retrying", redact(uri), str(e)[:200])
            time.sleep(wait)
            wait = min(wait * 2, 10.0)


def _reach(uri: str, budget: float) -> None:
    """An HTTP tracking server's /health answers within `budget` s (a quick probe: the MLflow calls that follow
    then run with the client's retries off)."""
    if not uri.startswith(("http://", "https://")):
        return

    def probe() -> None:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=max(1.0, min(budget, 10.0))):
                return
        except urllib.error.HTTPError as e:  # it answers: whatever /health says, the calls will tell
            if e.code < 500:
                return
            raise ConnectionError(f"/health answered {e.code}") from None
        except (OSError, ValueError) as e:
            raise ConnectionError(str(getattr(e, "reason", e))) from None
    _within_budget(probe, uri, budget)


# ----------------------------------------------------------------------------------------------------
# What a run records: params, lineage, no secrets

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` without the values of SECRET_ENV and without user:password@ in URLs."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub("***@", text)


def flatten_params(cfg: Any) -> dict[str, str]:
    """A config (dataclass or mapping) as MLflow params: nested keys joined with '.', values as strings."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[prefix] = redact(text)[:MAX_PARAM_LENGTH]
    walk("", data)
    return out


def code_version() -> str:
    """POSTTRAIN_CODE_VERSION (set in images), else the git commit of this checkout, else the package version."""
    if os.environ.get("POSTTRAIN_CODE_VERSION"):
        return os.environ["POSTTRAIN_CODE_VERSION"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"posttrain=={version('posttrain')}"
        except PackageNotFoundError:
            return "unknown"


def lineage_tags(cfg: Any = None) -> dict[str, str]:
    """Where a run comes from: pipeline facts from the environment, and the inputs named in `cfg`."""
    tags = {tag: os.environ[env] for tag, env in LINEAGE_ENV.items() if os.environ.get(env)}
    tags["posttrain.code_version"] = code_version()
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    for field, value in data.items():
        if field == "output_dir" or not isinstance(value, str) or not value:
            continue
        if value.startswith("s3://") or Path(value).exists():
            tags[f"posttrain.input.{field}"] = value
            if Path(value).is_file():
                tags[f"posttrain.input.{field}.sha256"] = sha256_file(value)
    return {k: redact(v) for k, v in tags.items()}


# ----------------------------------------------------------------------------------------------------
# Parent runs

def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created if missing; tagged as model training either way."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:  # created by a concurrent step in the meantime
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def start_parent(experiment: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None) -> str | None:
    """Create the pipeline run's parent run; returns its id (None when tracking is off). Under KFP's MLflow plugin
    the parent is KFP's run for the pipeline: it is returned, and none is created."""
    if not enabled():
        return None
    kfp = use_kfp()
    if kfp:
        return kfp.parent_run_id
    client = _client()
    exp = ensure_experiment(client, experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT)
    all_tags = {**lineage_tags(), **{k: redact(str(v)) for k, v in (tags or {}).items()}}
    run = client.create_run(exp, run_name=run_name, tags=all_tags)
    log.info("tracking: parent run %s in experiment %s", run.info.run_id, exp)
    return run.info.run_id


def end_parent(run_id: str | None, status: str = "FINISHED") -> None:
    """Close the parent run with FINISHED, FAILED or KILLED (under KFP's MLflow plugin KFP closes its own)."""
    if run_id and enabled() and not kfp_config():
        _client().set_terminated(run_id, status)


# ----------------------------------------------------------------------------------------------------
# The journal: every write after run creation, sent in order by a background thread

JOURNAL_PREFIX = "posttrain-"


def _uri_key(uri: str) -> str:
    """Which tracking server a journal is for, without writing its URI (and any credentials in it) to disk."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def _read_batch(f) -> list[dict]:
    """The next ops of journal `f` that fit one request (an artifact or the run's end goes alone); the read
    position ends after them."""
    ops, counts = [], dict.fromkeys(LIMITS, 0)
    while True:
        pos = f.tell()
        line = f.readline()
        if not line.endswith(b"\n"):  # the end of the journal, or a line still being written
            f.seek(pos)
            return ops
        op = json.loads(line)
        kind = op["op"]
        if kind == "header":
            continue
        alone = kind in ("artifact", "end")
        n = 1 if alone else len(op["v"])
        fits = not alone and counts[kind] + n <= LIMITS[kind] and sum(counts.values()) + n <= BATCH_LIMIT
        if ops and not fits:  # it opens the next batch
            f.seek(pos)
            return ops
        ops.append(op)
        if alone:
            return ops
        counts[kind] += n


def _send(client, run_id: str, ops: list[dict]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    if ops[0]["op"] == "artifact":
        client.log_artifact(run_id, ops[0]["v"]["path"], ops[0]["v"]["artifact_path"])
        return
    if ops[0]["op"] == "end":
        client.set_terminated(run_id, ops[0]["v"]["status"])
        return
    metrics, params, tags = [], [], []
    for op in ops:
        if op["op"] == "metrics":
            metrics += [Metric(k, v, op["t"], op["s"]) for k, v in op["v"].items()]
        elif op["op"] == "params":
            params += [Param(k, v) for k, v in op["v"].items()]
        else:
            tags += [RunTag(k, v) for k, v in op["v"].items()]
    client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)


class RunWriter:
    """Sends metrics, params, tags, artifacts and the run's end to one run from a thread that retries until MLflow
    answers.

    Writes are appended to a journal file (one JSON line each) and read back by the thread, so memory holds one
    batch however long MLflow is away, and nothing is lost while the process lives. The journal is flock'ed while
    its writer lives and `<journal>.sent` holds the offset sent so far: when the process ends with writes unsent
    (killed, or MLflow still away at its end), `replay_orphans` in a later process sends the rest.
    """

    def __init__(self, client, run_id: str, spool_dir: str | None = None, uri: str = ""):
        self.client, self.run_id = client, run_id
        fd, name = tempfile.mkstemp(prefix=f"{JOURNAL_PREFIX}{run_id}-", suffix=".jsonl", dir=spool_dir)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else holds it
        self.path = Path(name)
        self._out = os.fdopen(fd, "ab")
        self._out.write((json.dumps({"op": "header", "run_id": run_id, "uri": _uri_key(uri)}) + "\n").encode())
        self._out.flush()
        self._in = open(self.path, "rb")
        self._sent_fd = os.open(self.path.with_suffix(".sent"), os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self.written = self.sent = 0
        self._thread = threading.Thread(target=self._run, name=f"mlflow-writer-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, op: str, payload: Any, step: int = 0) -> None:
        line = json.dumps({"op": op, "v": payload, "s": step, "t": int(time.time() * 1000)}) + "\n"
        with self._lock:
            self._out.write(line.encode())
            self._out.flush()
            self.written += 1
        self._wake.set()

    def _run(self) -> None:
        wait, failing_since = 0.5, None
        while True:
            # read before the batch: once close() has begun, every write (the run's end included) is in the journal,
            # so an empty batch then means all is sent; read after, an empty batch may predate the last writes
            closing = self._closing
            start = self._in.tell()
            ops = _read_batch(self._in)
            if not ops:
                if closing:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                _send(self.client, self.run_id, ops)
            except Exception as e:
                if not _permanent(e):
                    self._in.seek(start)
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("tracking: MLflow unreachable (%s: %s); buffering in %s and retrying",
                                    type(e).__name__, str(e)[:300], self.path)
                    time.sleep(wait * random.uniform(0.8, 1.2))
                    wait = min(wait * 2, 10.0)
                    continue
                log.error("tracking: MLflow rejected %d writes to run %s, dropped: %s", len(ops), self.run_id, e)
            if failing_since is not None:
                log.info("tracking: MLflow reachable again after %.0fs; sending the buffered writes",
                         time.monotonic() - failing_since)
                failing_since = None
            wait = 0.5
            self.sent += len(ops)
            os.pwrite(self._sent_fd, f"{self._in.tell():020d}".encode(), 0)

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` s until everything is sent; True when it was (the journal is then removed). When it
        was not, a warning on stderr says so and where the rest is kept."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:  # a write put after the thread's last read (a late sampler) is kept for replay_orphans
            done = not self._thread.is_alive() and self.sent == self.written
        if done:
            self._in.close()
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".sent").unlink(missing_ok=True)
        else:
            message = (f"{UNDELIVERED}: {self.written - self.sent} of {self.written} writes to run {self.run_id} "
                       f"(its closing status included) not sent after {timeout:.0f} s; kept in {self.path}, sent by "
                       "the next stage started with this tracking URI and spool directory")
            log.error("tracking: %s", message)
            print(f"WARNING: {message}", file=sys.stderr, flush=True)
        self._out.close()  # releases the journal's lock: from now on it is an orphan for replay_orphans
        os.close(self._sent_fd)
        return done


def replay_orphans(client, uri: str, spool_dir: str | None = None) -> int:
    """Send what earlier processes' journals for this tracking server left unsent (their writer is gone: the
    journal's lock is free), in order, from the offset each had sent; a journal sent whole is removed. Stops at
    the first batch MLflow does not take (the journal is kept for the next start). Returns the writes sent."""
    total = 0
    for path in sorted(Path(spool_dir or tempfile.gettempdir()).glob(f"{JOURNAL_PREFIX}*.jsonl")):
        try:
            f = open(path, "rb")
        except OSError:
            continue
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive (or another process replays it)
            try:
                if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
                    continue  # replayed and removed meanwhile
                header = json.loads(f.readline() or "{}")
            except (OSError, ValueError):
                continue
            if header.get("op") != "header" or header.get("uri") != _uri_key(uri):
                continue  # another server's journal
            total += _replay(client, header["run_id"], path, f)
    return total


def _replay(client, run_id: str, path: Path, f) -> int:
    sent_path = path.with_suffix(".sent")
    with contextlib.suppress(OSError, ValueError):
        f.seek(max(f.tell(), int(sent_path.read_bytes() or b"0")))
    sent = 0
    while ops := _read_batch(f):
        try:
            _send(client, run_id, ops)
        except Exception as e:
            if not _permanent(e):
                log.warning("tracking: %s still not sent (%s); kept for the next start", path, str(e)[:200])
                return sent  # the .sent offset is that of the batches before this one
            log.error("tracking: MLflow rejected %d writes of %s to run %s, dropped: %s", len(ops), path, run_id, e)
        sent += len(ops)
        sent_path.write_bytes(f"{f.tell():020d}".encode())
    log.info("tracking: sent %d writes to run %s that an earlier process left in %s", sent, run_id, path)
    path.unlink(missing_ok=True)
    sent_path.unlink(missing_ok=True)
    return sent


def _permanent(e: Exception) -> bool:
    """A 4xx answer (other than 429) will not change on retry; connection errors and 5xx may."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return isinstance(e, (ValueError, TypeError, FileNotFoundError))
    status = e.get_http_status_code()
    return 400 <= status < 500 and status != 429


# ----------------------------------------------------------------------------------------------------
# System metrics

def sample_system_metrics() -> dict[str, float]:
    """CPU and memory (psutil), and the GPUs (`_gpu_metrics`), under MLflow's system metric names."""
    out: dict[str, float] = {}
    with contextlib.suppress(ImportError):
        import psutil

        out["system/cpu_utilization_percentage"] = psutil.cpu_percent()
        out["system/system_memory_usage_megabytes"] = psutil.virtual_memory().used / 2**20
    return out | _gpu_metrics()


def _gpu_metrics() -> dict[str, float]:
    """Every GPU's memory, utilization and power through NVML (which opens no CUDA context on another rank's
    device); without NVML, the memory this process holds on its own device, if it uses one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out[f"system/gpu_{i}_memory_usage_megabytes"] = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
            out[f"system/gpu_{i}_utilization_percentage"] = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            out[f"system/gpu_{i}_power_usage_watts"] = pynvml.nvmlDeviceGetPowerUsage(h) / 1000
        return out
    except Exception:  # no NVML library or no driver
        torch = sys.modules.get("torch")  # only a stage that already uses torch
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        i = int(os.environ.get("LOCAL_RANK", "0"))
        return {f"system/gpu_{i}_memory_usage_megabytes": torch.cuda.memory_reserved(i) / 2**20}


# ----------------------------------------------------------------------------------------------------
# Stage runs

class StageRun:
    """What a stage logs through. With tracking off (or on a rank other than 0) every method does nothing."""

    def __init__(self, writer: RunWriter | None = None):
        self._writer = writer
        self.run_id = writer.run_id if writer else None
        self.last_step = 0

    def log_metrics(self, rec: dict, step: int | None = None) -> None:
        """The numbers in `rec` at `step` (default rec["step"]); other values (None, strings) are skipped."""
        step = int(rec.get("step", self.last_step) if step is None else step)
        self.last_step = step
        values = {k: float(v) for k, v in rec.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._put("metrics", values, step)

    def log_params(self, params: Any) -> None:
        """A config (dataclass or mapping), flattened; secrets redacted."""
        self._put("params", flatten_params(params))

    def set_tags(self, tags: dict) -> None:
        self._put("tags", {k: redact(str(v)) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._writer:
            self._writer.put("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def _put(self, kind: str, values: dict, step: int = 0) -> None:
        if self._writer and values:
            keys = list(values)
            for i in range(0, len(keys), LIMITS[kind]):
                self._writer.put(kind, {k: values[k] for k in keys[i:i + LIMITS[kind]]}, step)


def _sample_loop(run: StageRun, writer: RunWriter, stop: threading.Event, interval: float) -> None:
    """A sample every `interval` s and a last one when the stage ends (so even a short stage has one)."""
    with contextlib.suppress(Exception):
        sample_system_metrics()  # the first CPU reading only starts the measurement
    while True:
        stopped = stop.wait(interval)
        with contextlib.suppress(Exception):  # a failed sample is skipped, never fatal
            writer.put("metrics", sample_system_metrics(), run.last_step)
        if stopped:
            return


def _open_stage_run(client, stage: str, cfg: Any, parent: str | None):
    """(run, the params it already has): the child run of this step, created, or reopened when an earlier
    attempt of the same step (the same KFP run, parent and task) made one: a retried step keeps one run. Under
    KFP's MLflow plugin with MLFLOW_RUN_ID, the task's run that KFP made, which every attempt of the task is given."""
    task = os.environ.get(TASK_ENV) or stage
    kfp_task_run = os.environ.get(KFP_TASK_RUN_ENV) if kfp_config() else None
    if kfp_task_run:
        return _adopt_kfp_run(client, kfp_task_run, stage, task, cfg)
    if parent:
        exp = client.get_run(parent).info.experiment_id
        mark_model_training(client, exp)
    else:
        exp = ensure_experiment(client, os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT)
    kfp_run_id = os.environ.get(LINEAGE_ENV["posttrain.kfp_run_id"])
    if parent and kfp_run_id:
        found = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`posttrain.kfp_run_id` = "
                                          f"'{kfp_run_id}' and tags.`posttrain.task` = '{task}'", max_results=1)
        if found:
            run = found[0]
            attempt = int(run.data.tags.get("posttrain.attempt", "1")) + 1
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, "posttrain.attempt", str(attempt))
            log.info("tracking: %s run %s reopened (attempt %d of KFP run %s)", task, run.info.run_id, attempt,
                     kfp_run_id)
            return run, set(run.data.params)
    tags = {**lineage_tags(cfg), "posttrain.stage": stage, "posttrain.task": task, "posttrain.attempt": "1"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if re.fullmatch(r"[0-9a-f]{40}", tags["posttrain.code_version"]):
        tags["mlflow.source.git.commit"] = tags["posttrain.code_version"]
    run = client.create_run(exp, run_name=task, tags=tags)
    log.info("tracking: %s run %s (parent %s)", task, run.info.run_id, parent)
    return run, set()


def _adopt_kfp_run(client, run_id: str, stage: str, task: str, cfg: Any):
    """(run, the params it already has): KFP's run for this task, RUNNING again (KFP's launcher closed it when an
    earlier attempt ended) and tagged as this stage's, its attempt counted."""
    from mlflow.entities import RunTag

    run = client.get_run(run_id)
    attempt = int(run.data.tags.get("posttrain.attempt", "0")) + 1
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    tags = {**lineage_tags(cfg), "posttrain.stage": stage, "posttrain.task": task, "posttrain.attempt": str(attempt)}
    if re.fullmatch(r"[0-9a-f]{40}", tags["posttrain.code_version"]):
        tags["mlflow.source.git.commit"] = tags["posttrain.code_version"]
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    mark_model_training(client, run.info.experiment_id)
    log.info("tracking: %s logs into KFP's run %s for the task (attempt %d)", task, run_id, attempt)
    return run, set(run.data.params)


@contextlib.contextmanager
def stage_run(stage: str, cfg: Any = None, parent_run_id: str | None = None) -> Iterator[StageRun]:
    """The child run of this step under `parent_run_id` (default env POSTTRAIN_PARENT_RUN_ID): one per pipeline
    step, keyed by the KFP run id, the parent and the task (the step's name, env POSTTRAIN_TASK, else `stage`);
    a retried step reopens its earlier attempt's run and goes on logging into it. Under KFP's MLflow plugin: KFP's
    run for the task (MLFLOW_RUN_ID), else a child of KFP's pipeline run.

    MLflow not answering within POSTTRAIN_TRACKING_CONNECT_TIMEOUT raises TrackingUnreachableError before the body
    runs. Earlier processes' unsent journals for this server are sent first. Ends FINISHED, FAILED when the body
    raises, KILLED on KeyboardInterrupt or SIGTERM (Terminated); the body's exception propagates.
    """
    if not (enabled() and is_rank0()):
        yield StageRun()
        return
    kfp = use_kfp()
    uri, budget = os.environ["MLFLOW_TRACKING_URI"], connect_timeout()
    spool = os.environ.get("POSTTRAIN_TRACKING_SPOOL")
    client = _client()
    parent = parent_run_id or os.environ.get(PARENT_ENV) or (kfp.parent_run_id if kfp else None)
    with _on_sigterm():
        # the opening with the client's own retries off: the budget bounds it (the journal's thread retries the rest)
        with scoped_env({k: "0" for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",) if k not in os.environ}):
            _reach(uri, budget)
            run, logged = _within_budget(lambda: _open_stage_run(client, stage, cfg, parent), uri, budget)
            replay_orphans(client, uri, spool)
        writer = RunWriter(client, run.info.run_id, spool, uri)
        srun = StageRun(writer)
        if cfg is not None:  # a reopened run keeps the params it has (MLflow refuses to change one)
            srun._put("params", {k: v for k, v in flatten_params(cfg).items() if k not in logged})
        stop = threading.Event()
        interval = float(os.environ.get("POSTTRAIN_SYSTEM_METRICS_INTERVAL", "15"))
        sampler = threading.Thread(target=_sample_loop, args=(srun, writer, stop, interval), daemon=True)
        if interval > 0:
            sampler.start()
        status = "FAILED"
        try:
            yield srun
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
            status = "KILLED"
            raise
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join(timeout=10)
            timeout = float(os.environ.get("POSTTRAIN_TRACKING_FLUSH_TIMEOUT", "600"))
            if status == "KILLED":  # a stopped process has seconds before SIGKILL; the rest waits in the journal
                timeout = min(timeout, 10.0)
            writer.put("end", {"status": status})  # sent in order, after every write of the run
            writer.close(timeout)


@contextlib.contextmanager
def _on_sigterm() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the body runs, so the stage ends like Ctrl-C (its run
    closed KILLED) instead of vanishing with its run left RUNNING. Only where SIGTERM has its default action."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise Terminated("stopped by SIGTERM")
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
