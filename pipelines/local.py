"""The embedded default: a spec's whole DAG on this machine, with kfp.local, MLflow in a sqlite file and every
artifact under ./.posttrain/.

    posttrain run demo [--out DIR]               (or a path to a spec)

The same pipeline that `posttrain compile` writes for a cluster runs here step by step, each step a subprocess
of this Python (kfp.local's SubprocessRunner, no containers; its executor run by pipelines.local_step, which skips
the interpreter's teardown once the step's outputs are written), in the order and with the conditions of the DAG
(the exit handler and the promotion gate included). What changes is only where things are:

- the base model: bundled:tiny is built into .posttrain/models/tiny; an s3:// model is downloaded first
  (components.storage, credentials from the environment);
- tracking: MLflow with a sqlite store, .posttrain/mlflow.db (artifacts in .posttrain/mlartifacts), so the
  registry and the promotion gate work as on a server: `mlflow ui --backend-store-uri sqlite:///.posttrain/mlflow.db`;
- artifacts: .posttrain/runs/<pipeline>-<time>/<step>/...; the data step is cached in .posttrain/kfp-cache;
- S3: only when MLFLOW_S3_ENDPOINT_URL is set (preflight says it skipped the S3 and Secret checks otherwise).

While it runs it prints a line when a step starts and ends (`--verbose`: every step's output, which always
goes to <out>/run.log). At the end it prints a table (per stage: its training headline and its held-out
in-domain and OOD accuracy and entropy), each stage's effect on accuracy against the stage before it and
against the base model (a paired bootstrap interval and a verdict: better, worse or within noise), and writes
run_summary.json in the output directory: each stage's metrics and eval, the effects, the registered model
version, and the promotion decision with its reason. The evaluation report is copied there too (report.html).

One run at a time per state directory and per output directory (components.locks): a second `posttrain run` is
refused at once, naming the first. The summary is of the run this call started (its kfp.local run directory, by
name), never of whichever is newest.

Each step runs in its own process group. SIGTERM or SIGINT (Ctrl-C) to `posttrain run` is passed to every running
step's group (a stage closes its MLflow run KILLED), no further step starts, a step still there after
STOP_GRACE seconds is killed, and the pipeline's MLflow parent run and any step run left RUNNING are closed KILLED;
the run ends with one line saying so (RunStopped; exit status 128 + the signal's number).
The steps' MLflow client retries within POSTTRAIN_TRACKING_CONNECT_TIMEOUT (components.tracking.bounded_retry_env),
and a failed step is not retried here (the spec's `retries` are for a cluster), so an unreachable tracking server
fails the run in seconds, not minutes per step.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from components.stages import STAGES
from components.stages import Stage as StageKind
from components.stages import get as get_stage
from components.tracking import UNDELIVERED
from pipelines import step_server
from pipelines.spec import Spec, load_spec

log = logging.getLogger("pipelines.local")
EXECUTOR, LOCAL_EXECUTOR = "-m kfp.dsl.executor_main ", "-m pipelines.local_step "

STATE = Path(".posttrain")
STOP_GRACE = 30.0
"""Seconds a stopped step gets to close its MLflow run before its process group is killed."""


class RunStopped(KeyboardInterrupt):
    """`posttrain run` was stopped by a signal; its steps were stopped and its MLflow runs closed KILLED."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def local_base_model(uri: str, state: Path) -> str:
    """A local directory for the spec's base model: built (bundled:tiny), downloaded (s3://) or as given."""
    if uri == "bundled:tiny":
        from components.models import build_tiny_model

        path = state / "models" / "tiny"
        if not (path / "config.json").exists():
            build_tiny_model(path, seed=0)
        return str(path.resolve())
    if uri.startswith("s3://"):
        from components.storage import localize

        return str(localize(uri))
    return str(Path(uri).resolve())


def local_tracking(spec: Spec, state: Path) -> str:
    """The sqlite tracking URI, with the spec's experiment created so its artifacts stay under `state`."""
    from mlflow import MlflowClient

    state.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(state / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    if client.get_experiment_by_name(spec.tracking.experiment) is None:
        client.create_experiment(spec.tracking.experiment,
                                 artifact_location=(state / "mlartifacts").resolve().as_uri())
    return uri


def display_names(pipeline_spec) -> dict[str, str]:
    """Display name (the spec's name of the stage) → task name (its directory in the run, named after its
    component), over nested DAGs."""
    names = {}
    dags = [pipeline_spec.root.dag] + [c.dag for c in pipeline_spec.components.values() if c.HasField("dag")]
    for dag in dags:
        for task_name, task in dag.tasks.items():
            names[task.task_info.name] = task_name
    return names


def without_retries(pipeline_spec) -> None:
    """Drop the steps' retry policies (the spec's `retries`, for a cluster's lost pods): kfp.local would run a failed
    step again after a minute's backoff, and a step that fails here (a bad input, MLflow away) fails the same way."""
    dags = [pipeline_spec.root.dag] + [c.dag for c in pipeline_spec.components.values() if c.HasField("dag")]
    for dag in dags:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")


class Progress(io.TextIOBase):
    """Where kfp.local's output goes during a run: all of it to the run's log file; to the console a line when a
    step starts and when it ends, and the end of a failed step's log (everything with `verbose`)."""

    STARTED = re.compile(r"Executing task '([^']+)'")
    ENDED = re.compile(r"Task '([^']+)' finished with status (\w+)")
    RAISED = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Changed)): (.+)$")
    """The last line of a Python traceback: the exception's class and message."""

    def __init__(self, log_path: Path, console, names: dict[str, str], verbose: bool):
        self.log, self.console, self.verbose = log_path.open("w"), console, verbose
        self.names = {task: display for display, task in names.items()}
        self.t0, self.started, self.pending, self.lines = time.monotonic(), {}, "", []
        self.failures: dict[str, str] = {}  # step → the reason it failed (its exception's message)
        self.undelivered: list[str] = []  # the steps' warnings of MLflow writes they could not deliver

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.console.write(text)
        self.pending += text
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            self._line(re.sub(r"\x1b\[[0-9;]*m", "", line))
        return len(text)

    def _line(self, line: str) -> None:
        now = time.monotonic()
        if line.startswith(f"WARNING: {UNDELIVERED}"):
            self.undelivered.append(line.removeprefix("WARNING: "))
            if not self.verbose:
                self.console.write(f"{line}\n")
        if m := self.STARTED.search(line):
            self.started[m[1]], self.lines = now, []
            self._say(f"{self.names.get(m[1], m[1])} ...")
        elif m := self.ENDED.search(line):
            took = now - self.started.get(m[1], now)
            self._say(f"{self.names.get(m[1], m[1])} {m[2].lower()} ({took:.0f} s)")
            if m[2] != "SUCCESS":
                self.failures[self.names.get(m[1], m[1])] = self.reason(self.lines) or m[2]
                if not self.verbose:
                    self.console.write("".join(f"    {ln}\n" for ln in self.lines[-40:]))
        else:
            self.lines.append(line)

    @classmethod
    def reason(cls, lines: list[str]) -> str | None:
        """The exception that ended a step's log, on one line: its class, its message and the message's
        continuation lines (e.g. preflight's list of failed checks)."""
        at = max((i for i, line in enumerate(lines) if cls.RAISED.match(line)), default=None)
        if at is None:
            return None
        found = cls.RAISED.match(lines[at])
        rest = []
        for line in lines[at + 1:]:
            if not line.strip() or line.lstrip().startswith("[") or cls.STARTED.search(line):
                break
            rest.append(line.strip())
        return " ".join([f"{found[1]}: {found[2]}", *rest])

    def _say(self, text: str) -> None:
        if not self.verbose:
            self.console.write(f"[{time.monotonic() - self.t0:5.0f} s] {text}\n")
            self.console.flush()

    def flush(self) -> None:
        self.log.flush()

    def close(self) -> None:
        super().close()  # flushes
        self.log.close()


class Steps:
    """The step subprocesses of one run. kfp.local starts each in this process's group (a SIGTERM to this process
    reaches none of them; one to the group would reach whoever started us too); `launch`, in place of
    kfp.local.subprocess_task_handler.run_local_subprocess, starts each in a group of its own, so `stop` can signal a
    step with everything it started (torchrun's ranks) and nothing else."""

    def __init__(self, root: Path, names: dict[str, str], server: step_server.Server | None = None):
        self.root, self.names = root, {task: display for display, task in names.items()}
        self.server = server  # forks the steps (pipelines.step_server), when running
        self.running: dict[int, str] = {}  # pid (= its process group) → the step's name
        self.signum: int | None = None
        self.stopped: list[str] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def launch(self, full_command: list[str], env_vars: dict | None = None) -> int:
        """Run one step, its output line by line to stdout (as kfp.local does); RunStopped once the run stops, so
        kfp.local neither retries the step nor starts the next."""
        with self._lock:
            if self.signum is not None:
                raise RunStopped(self.signum)
            extra = {**(env_vars or {}), **(self.server.env() if self.server else {})}
            proc = subprocess.Popen(step_command(full_command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1, process_group=0,
                                    env={**os.environ, **extra} if extra else None)
            task = _task_of(full_command, self.root)
            self.running[proc.pid] = self.names.get(task, task)
        try:
            for line in iter(proc.stdout.readline, ""):
                print(line, end="")
            print("\n")
            code = proc.wait()
        finally:
            if self.signum is not None:  # stopping: its last lines (the stage closing its run) still go to the log
                with contextlib.suppress(Exception):
                    for line in proc.stdout:
                        print(line, end="")
                with contextlib.suppress(Exception):
                    proc.wait(STOP_GRACE + 5)
            proc.stdout.close()
            with self._lock:
                self.running.pop(proc.pid, None)
        if self.signum is not None:
            raise RunStopped(self.signum)
        return code

    def stop(self, signum: int) -> None:
        """Pass `signum` to every running step's process group; no step starts after this; SIGKILL to the groups
        still there after STOP_GRACE seconds."""
        with self._lock:
            self.signum = signum
            running = dict(self.running)
        for pid, task in running.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)
                self.stopped.append(task)
        self._timer = threading.Timer(STOP_GRACE, self.kill)
        self._timer.daemon = True
        self._timer.start()

    def kill(self) -> None:
        with self._lock:
            pids = list(self.running)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def wait(self, timeout: float) -> bool:
        """True when no step runs any more (within `timeout` s)."""
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self.running


def step_command(command: list[str]) -> list[str]:
    """kfp.local's command for a step, its executor run by pipelines.local_step (the same executor, without the
    interpreter's teardown once the outputs are written)."""
    return [part.replace(EXECUTOR, LOCAL_EXECUTOR) if i < 3 else part for i, part in enumerate(command)]


def _task_of(command: list[str], root: Path) -> str:
    """The task a kfp.local step command runs: it writes <pipeline root>/<run>/<task>/executor_output.json."""
    m = re.search(re.escape(str(root)) + r"/[^/\"]+/([^/\"]+)/executor_output\.json", " ".join(command))
    return m[1] if m else "a step"


@contextlib.contextmanager
def _kfp_local_hooks(steps: Steps, names: list[str]):
    """kfp.local with its steps started by `steps`, and the name of each pipeline run it starts recorded in `names`
    (the run's directory under the pipeline root: the summary reads this run's, not the newest)."""
    from kfp.local import executor_input_utils, subprocess_task_handler

    name_fn = executor_input_utils.get_local_pipeline_resource_name
    launch_fn = subprocess_task_handler.run_local_subprocess

    def resource_name(pipeline_name: str) -> str:
        names.append(name_fn(pipeline_name))
        return names[-1]
    executor_input_utils.get_local_pipeline_resource_name = resource_name
    subprocess_task_handler.run_local_subprocess = steps.launch
    try:
        yield
    finally:
        executor_input_utils.get_local_pipeline_resource_name = name_fn
        subprocess_task_handler.run_local_subprocess = launch_fn


@contextlib.contextmanager
def _serving(server: step_server.Server | None):
    """The step server runs while the body does (started with this process's environment, which the steps get)."""
    if server is None:
        yield
        return
    server.start(dict(os.environ))
    try:
        yield
    finally:
        server.close()
        shutil.rmtree(Path(server.path).parent, ignore_errors=True)


@contextlib.contextmanager
def _stopped_by_signals(steps: Steps):
    """While the body runs, SIGTERM and SIGINT stop the steps and raise RunStopped here (a second one kills the
    steps at once). Only in the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if steps.signum is not None:
            steps.kill()
            return
        steps.stop(signum)
        raise RunStopped(signum)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def close_stopped_runs(tracking_uri: str, spec: Spec, run_dir: Path | None, tasks: dict[str, str],
                       since_ms: int) -> list[str]:
    """Close a stopped run's MLflow runs KILLED: the pipeline's parent run (preflight's output, else the spec's
    RUNNING parent run started since `since_ms`) and its step runs still RUNNING. Returns what was closed, in words.
    """
    from mlflow import MlflowClient

    from components import tracking

    closed = []
    with tracking.scoped_env(tracking.bounded_retry_env()):
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(spec.tracking.experiment)
        if exp is None:
            return closed
        out = _read_json(run_dir / tasks.get("preflight", "preflight") / "executor_output.json") if run_dir else None
        parent = ((out or {}).get("parameterValues") or {}).get("parent_run_id")
        parents = [client.get_run(parent)] if parent else client.search_runs(
            [exp.experiment_id], f"tags.`posttrain.role` = 'pipeline' and tags.`posttrain.spec` = '{spec.name}' "
                                 f"and attributes.status = 'RUNNING' and attributes.start_time >= {since_ms}")
        for p in parents:
            pid = p.info.run_id
            children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")
            for child in children:
                name = child.data.tags.get("posttrain.task", child.info.run_name)
                if child.info.status == "RUNNING":
                    client.set_terminated(child.info.run_id, "KILLED")
                    closed.append(f"{name} run {child.info.run_id} (closed here)")
                elif child.info.status == "KILLED":
                    closed.append(f"{name} run {child.info.run_id} (closed by the step)")
            if p.info.status == "RUNNING":
                client.set_tag(pid, "posttrain.final_state", "KILLED")
                client.set_terminated(pid, "KILLED")
                closed.insert(0, f"the pipeline's parent run {pid}")
    return closed


def run_local(spec_or_path: Spec | str | Path, out: str | Path | None = None, state: str | Path = STATE,
              arguments: dict | None = None, verbose: bool = False) -> dict:
    """Run the spec's pipeline here; returns (and writes to <out>/run_summary.json) the run's summary.

    `arguments` override pipeline parameters (e.g. {"psft_max_steps": 20}); `verbose` prints every step's
    output (it always goes to <out>/run.log).
    """
    from pipelines.posttrain import pipeline_parameters

    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    state = Path(state).resolve()
    out = Path(out or state / spec.name)
    known = {name for name, *_ in pipeline_parameters(spec)}
    unknown = sorted(set(arguments or {}) - known)
    if unknown:
        raise ValueError(f"unknown pipeline parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    from components.locks import writer_lock
    from components.tracking import bounded_retry_env, scoped_env

    # one run per state directory (its MLflow database, models, cache) and per output directory; the steps' MLflow
    # client retries within the connect budget, not for minutes
    with writer_lock(state, "the state directory"), writer_lock(out, "the output directory (--out)"), \
            scoped_env(bounded_retry_env()):
        return _run_local(spec, out, state, arguments, verbose)


def _run_local(spec: Spec, out: Path, state: Path, arguments: dict | None, verbose: bool) -> dict:
    from kfp import local

    from pipelines.posttrain import build_pipeline

    args = {"base_model": local_base_model((arguments or {}).get("base_model", spec.base_model), state),
            "tracking_uri": local_tracking(spec, state),
            "s3_endpoint": os.environ.get("MLFLOW_S3_ENDPOINT_URL", "")}
    args.update({k: v for k, v in (arguments or {}).items() if k != "base_model"})

    runs = state / "runs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs),
               workspace_root=str(state / "workspace" / f"{spec.name}-{time.time_ns()}"), raise_on_error=True,
               enable_caching=True, cache_root=str(state / "kfp-cache"))
    pipeline = build_pipeline(spec)
    without_retries(pipeline.pipeline_spec)
    tasks = display_names(pipeline.pipeline_spec)
    before = set(runs.glob(f"{spec.name}-*")) if runs.exists() else set()
    t0, since_ms = time.perf_counter(), int(time.time() * 1000)
    server = step_server.Server(Path(tempfile.mkdtemp(prefix="posttrain-steps-"))) if step_server.enabled() else None
    error, stopped, steps, names = None, None, Steps(runs, tasks, server), []
    progress = Progress(out / "run.log", sys.stdout, tasks, verbose)
    with progress, warnings.catch_warnings(), contextlib.redirect_stdout(progress), \
            _kfp_local_hooks(steps, names), _stopped_by_signals(steps), _serving(server):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # our images run locally as this Python
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")  # resources
        try:
            pipeline(**args)
        except RuntimeError as e:  # a step failed; the exit handler has run; the summary says which and why
            error = "; ".join(f"{step} failed: {reason}" for step, reason in progress.failures.items()) \
                or re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        except RunStopped as e:  # no exit handler ran: the steps are stopped and their MLflow runs closed here
            stopped = e
            if not steps.wait(STOP_GRACE):
                steps.kill()
                steps.wait(5)
    if names:  # this call's run, by the name kfp.local gave it
        run_dir = runs / names[0]
    else:  # kfp.local no longer names runs where _kfp_local_hooks looks: the newest new run directory
        run_dir = max(set(runs.glob(f"{spec.name}-*")) - before, key=lambda p: p.stat().st_mtime, default=None)
    if stopped is not None:
        closed = []
        with contextlib.suppress(Exception):  # MLflow unreachable: nothing more to close from here
            closed = close_stopped_runs(args["tracking_uri"], spec, run_dir, tasks, since_ms)
        message = (f"{stopped}: " + (f"stopped step(s) {', '.join(steps.stopped)}" if steps.stopped else
                                     "no step was running")
                   + "; MLflow runs closed KILLED: " + ("; ".join(closed) or "none found"))
        error = message
    summary = collect(spec, run_dir, tasks) if run_dir and run_dir.is_dir() else \
        {"spec": spec.name, "stages": {}, "effects": [], "registered": None, "promotion": None}
    warned = progress.undelivered
    summary.update(status="stopped" if stopped else "failed" if error else "succeeded", error=error,
                   seconds=round(time.perf_counter() - t0, 1), tracking_uri=args["tracking_uri"],
                   experiment=spec.tracking.experiment, run_dir=str(run_dir), warnings=warned)
    if stopped is not None:
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
        raise RunStopped(stopped.signum, message)
    report = report_path(spec, run_dir, tasks)
    if report.is_file():
        shutil.copyfile(report, out / "report.html")
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    for w in warned:
        print(f"WARNING: {w}")
    print(f"\nrun_summary.json: {out / 'run_summary.json'}\nlog: {out / 'run.log'}\nartifacts: {run_dir}")
    if report.is_file():
        print(f"report: {out / 'report.html'}")
    print(f"MLflow: mlflow ui --backend-store-uri {args['tracking_uri']}  (experiment {spec.tracking.experiment})")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# What the run produced

def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics(task_dir: Path) -> dict:
    """The Metrics artifact a step logged (kfp.local keeps its values in the step's executor_output.json)."""
    doc = _read_json(task_dir / "executor_output.json") or {}
    return (doc.get("artifacts", {}).get("metrics", {}).get("artifacts") or [{}])[0].get("metadata", {})


def provider(spec: Spec, feed: str) -> tuple[str, str, StageKind] | None:
    """(the step's name, its output's name, its registry entry) of the last of the spec's stages whose output provides
    `feed` (components.stages.FEEDS: eval, registration, ...), or None."""
    found = None
    for stage in spec.stages:
        kind = get_stage(stage.stage)
        for name, out in kind.outputs.items():
            if feed in out.provides:
                found = (stage.name, name, kind)
    return found


def _output(run_dir: Path, tasks: dict[str, str], spec: Spec, feed: str) -> Path:
    """Where the output that provides `feed` is in the run's directory (a path that does not exist if none)."""
    found = provider(spec, feed)
    return run_dir / tasks.get(found[0], "-") / found[1] if found else run_dir / "-"


def report_path(spec: Spec, run_dir: Path, tasks: dict[str, str]) -> Path:
    """The HTML report of the step that provides the evaluation (its component's HTML output)."""
    found = provider(spec, "eval")
    if found is None:
        return run_dir / "-"
    outputs = found[2].component_fn().component_spec.outputs or {}
    html = next((name for name, out in outputs.items() if out.type.startswith("system.HTML")), "-")
    return run_dir / tasks.get(found[0], "-") / html


def collect(spec: Spec, run_dir: Path, tasks: dict[str, str]) -> dict:
    """Per stage: its metrics, and its held-out eval from the step that provides the evaluation; the registration
    and what its gate did."""
    from pipelines.spec.checks import Checker

    evaluation_cfg = Checker(spec, spec.name).suites()  # the eval suites, in full form, by the evaluating config
    suites = evaluation_cfg.suites if evaluation_cfg is not None else []
    evaluation = _read_json(_output(run_dir, tasks, spec, "eval")) or {}

    def held_out(metrics: dict | None) -> dict:
        return {s["name"]: {"split": s.get("split"), **{m: metrics.get(f"{s['name']}/{m}") for m in
                            ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "entropy")}}
                for s in suites} if metrics else {}

    evals = {evaluation.get("candidate"): evaluation.get("metrics"), **evaluation.get("baselines", {})}
    stages = {"base": {"metrics": {}, "eval": held_out(evals.get("base"))}} if evaluation else {}
    for stage in spec.stages:
        kind = get_stage(stage.stage)
        if not (kind.makes_model or kind.headline) or not (run_dir / tasks.get(stage.name, "-")).is_dir():
            continue  # the evaluation and the registration are summarized below; a stage that did not run: nothing
        entry = {"kind": stage.stage, "metrics": _metrics(run_dir / tasks[stage.name])}
        if kind.makes_model:
            entry["eval"] = held_out(evals.get(stage.name))
        stages[stage.name] = entry
    registration = _read_json(_output(run_dir, tasks, spec, "registration"))
    registering = provider(spec, "registration")
    gate = registering[2].gate if registering else None
    outcome = _read_json(run_dir / tasks.get(gate, "-") / "outcome") if gate else None
    promotion = None
    if registration:
        promotion = {"decision": registration["decision"], "reason": registration["reason"],
                     "promoted": bool(outcome and outcome["promoted"]),
                     "outcome": outcome["reason"] if outcome else "the gate did not run"}
    registered = {"name": registration["name"], "version": registration["version"]} if registration else None
    return {"spec": spec.name, "stages": stages, "effects": evaluation.get("effects", []), "registered": registered,
            "promotion": promotion}


def format_change(effect: dict) -> str:
    """`+3.5 [+0.5, +6.5] better`: a change in accuracy in points, its 95% interval and the verdict."""
    def pts(v: float) -> str:
        return f"{100 * v:+.1f}"
    return f"{pts(effect['diff'])} [{pts(effect['ci_low'])}, {pts(effect['ci_high'])}] {effect['verdict']}"


def format_effects(effects: list[dict]) -> list[str]:
    """A row per stage and suite: its change in accuracy against the model it started from and against the base."""
    if not effects:
        return []
    by = {(e["stage"], e["suite"], e["against"]): e for e in effects}
    lines = ["", "effect of each stage on accuracy, in points (95% paired bootstrap interval over the same prompts):",
             f"{'stage':<15}{'suite':<18}{'vs the model it started from':<34}vs base"]
    for stage, suite in dict.fromkeys((e["stage"], e["suite"]) for e in effects):
        prev, base = by.get((stage, suite, "previous")), by.get((stage, suite, "base"))
        lines.append(f"{stage:<15}{suite:<18}{format_change(prev) if prev else '-':<34}"
                     f"{format_change(base) if base else '-'}")
    return lines


def format_summary(summary: dict) -> str:
    """The run as a table: a row per stage (and the base model) with its training headline (the last step's
    NLL, DPO's preference accuracy, GRPO's reward, the pairs scored) and its held-out accuracy and entropy,
    then the registration and the promotion."""
    first = next((s for s in summary["stages"].values() if s.get("eval")), {}).get("eval", {})
    id_suite = next((n for n, s in first.items() if s["split"] == "id"), None)
    ood_suite = next((n for n, s in first.items() if s["split"] == "ood"), None)

    def held_out(entry: dict, suite: str | None, key: str, fmt: str) -> str:
        value = (entry.get("eval") or {}).get(suite, {}).get(key) if suite else None
        return "-" if value is None else format(value, fmt)

    def headline(kind: str | None, metrics: dict) -> str:
        label, key = (STAGES[kind].headline if kind in STAGES else None) or ("", "")
        return f"{label} {metrics[key]:.3g}" if key in metrics else "-"

    def row(*cells) -> str:
        return f"{cells[0]:<15}" + "".join(f"{c:>{w}}" for c, w in zip(cells[1:], (7, 17, 9, 9, 12, 13)))

    lines = [f"{summary['spec']}: {summary['status']} in {summary['seconds']:.0f} s"
             + (f" ({summary['error']})" if summary.get("error") else ""), "",
             row("stage", "steps", "training", "id acc", "ood acc", "id entropy", "ood entropy")]
    for name, entry in summary["stages"].items():
        m = entry["metrics"]
        lines.append(row(name, str(int(m["steps"])) if "steps" in m else "-", headline(entry.get("kind"), m),
                         held_out(entry, id_suite, "accuracy", ".1%"), held_out(entry, ood_suite, "accuracy", ".1%"),
                         held_out(entry, id_suite, "entropy", ".3f"), held_out(entry, ood_suite, "entropy", ".3f")))
    lines += format_effects(summary.get("effects", []))
    if summary.get("registered"):
        reg, promo = summary["registered"], summary["promotion"]
        lines += ["", f"registered: {reg['name']} v{reg['version']} (challenger)",
                  f"promotion: {'champion' if promo['promoted'] else 'not promoted'} — {promo['reason']}"]
    return "\n".join(lines)
