"""The embedded default: a spec's whole DAG on this machine, with kfp.local, MLflow in a sqlite file and every
artifact under ./.posttrain/.

    posttrain run demo [--out DIR]               (or a path to a spec)

The same pipeline that `posttrain compile` writes for a cluster runs here step by step, each step a subprocess
of this Python (kfp.local's SubprocessRunner, no containers), in the order and with the conditions of the DAG
(the exit handler and the promotion gate included). What changes is only where things are:

- the base model: bundled:tiny is built into .posttrain/models/tiny; an s3:// model is downloaded first
  (components.storage, credentials from the environment);
- tracking: MLflow with a sqlite store, .posttrain/mlflow.db (artifacts in .posttrain/mlartifacts), so the
  registry and the promotion gate work as on a server: `mlflow ui --backend-store-uri sqlite:///.posttrain/mlflow.db`;
- artifacts: .posttrain/runs/<pipeline>-<time>/<step>/...; data_prep is cached in .posttrain/kfp-cache;
- S3: only when MLFLOW_S3_ENDPOINT_URL is set (preflight says it skipped the S3 and Secret checks otherwise).

While it runs it prints a line when a step starts and ends (`--verbose`: every step's output, which always
goes to <out>/run.log). At the end it prints a table (per stage: its training headline and its held-out
in-domain and OOD accuracy and entropy), each stage's effect on accuracy against the stage before it and
against the base model (a paired bootstrap interval and a verdict: better, worse or within noise), and writes
run_summary.json in the output directory: each stage's metrics and eval, the effects, the registered model
version, and the promotion decision with its reason. The evaluation report is copied there too (report.html).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

from components.stages import STAGES
from components.stages import get as get_stage
from pipelines.spec import Spec, load_spec

log = logging.getLogger("pipelines.local")

STATE = Path(".posttrain")


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
    """Display name (the stage, e.g. psft) → task name (its directory in the run, e.g. sft), over nested DAGs."""
    names = {}
    dags = [pipeline_spec.root.dag] + [c.dag for c in pipeline_spec.components.values() if c.HasField("dag")]
    for dag in dags:
        for task_name, task in dag.tasks.items():
            names[task.task_info.name] = task_name
    return names


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


def run_local(spec_or_path: Spec | str | Path, out: str | Path | None = None, state: str | Path = STATE,
              arguments: dict | None = None, verbose: bool = False) -> dict:
    """Run the spec's pipeline here; returns (and writes to <out>/run_summary.json) the run's summary.

    `arguments` override pipeline parameters (e.g. {"psft_max_steps": 20}); `verbose` prints every step's
    output (it always goes to <out>/run.log).
    """
    from kfp import local

    from pipelines.posttrain import build_pipeline, pipeline_parameters

    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    state = Path(state).resolve()
    out = Path(out or state / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    known = {name for name, *_ in pipeline_parameters(spec)}
    unknown = sorted(set(arguments or {}) - known)
    if unknown:
        raise ValueError(f"unknown pipeline parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    args = {"base_model": local_base_model((arguments or {}).get("base_model", spec.base_model), state),
            "tracking_uri": local_tracking(spec, state),
            "s3_endpoint": os.environ.get("MLFLOW_S3_ENDPOINT_URL", "")}
    args.update({k: v for k, v in (arguments or {}).items() if k != "base_model"})

    runs = state / "runs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs),
               workspace_root=str(state / "workspace" / f"{spec.name}-{time.time_ns()}"), raise_on_error=True,
               enable_caching=True, cache_root=str(state / "kfp-cache"))
    pipeline = build_pipeline(spec)
    before = set(runs.glob(f"{spec.name}-*")) if runs.exists() else set()
    t0 = time.perf_counter()
    error = None
    progress = Progress(out / "run.log", sys.stdout, display_names(pipeline.pipeline_spec), verbose)
    with progress, warnings.catch_warnings(), contextlib.redirect_stdout(progress):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # our images run locally as this Python
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")  # resources
        try:
            pipeline(**args)
        except RuntimeError as e:  # a step failed; the exit handler has run; the summary says which and why
            error = "; ".join(f"{step} failed: {reason}" for step, reason in progress.failures.items()) \
                or re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    run_dir = max(set(runs.glob(f"{spec.name}-*")) - before, key=lambda p: p.stat().st_mtime)
    summary = collect(spec, run_dir, display_names(pipeline.pipeline_spec))
    summary.update(status="failed" if error else "succeeded", error=error, seconds=round(time.perf_counter() - t0, 1),
                   tracking_uri=args["tracking_uri"], experiment=spec.tracking.experiment, run_dir=str(run_dir))
    report = run_dir / display_names(pipeline.pipeline_spec).get("evaluate", "-") / "report"
    if report.is_file():
        shutil.copyfile(report, out / "report.html")
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
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


def collect(spec: Spec, run_dir: Path, tasks: dict[str, str]) -> dict:
    """Per stage: its metrics, and its held-out eval from the evaluate step; the registration and the promotion."""
    from components.evaluate.main import normalize_suite

    suites = [normalize_suite(s, f"eval_suites[{i}]", 0) for i, s in enumerate(spec.eval_suites)]
    evaluation = _read_json(run_dir / tasks.get("evaluate", "-") / "results") or {}

    def held_out(metrics: dict | None) -> dict:
        return {s["name"]: {"split": s.get("split"), **{m: metrics.get(f"{s['name']}/{m}") for m in
                            ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "entropy")}}
                for s in suites} if metrics else {}

    evals = {evaluation.get("candidate"): evaluation.get("metrics"), **evaluation.get("baselines", {})}
    stages = {"base": {"metrics": {}, "eval": held_out(evals.get("base"))}} if evaluation else {}
    for stage in spec.stages:
        kind = get_stage(stage.stage)
        if not (kind.makes_model or kind.headline) or not (run_dir / tasks.get(stage.name, "-")).is_dir():
            continue  # evaluate and register are summarized below; a stage that did not run has nothing
        entry = {"kind": stage.stage, "metrics": _metrics(run_dir / tasks[stage.name])}
        if kind.makes_model:
            entry["eval"] = held_out(evals.get(stage.name))
        stages[stage.name] = entry
    registration = _read_json(run_dir / tasks.get("register", "-") / "registration")
    outcome = _read_json(run_dir / tasks.get("promote", "-") / "outcome")
    promotion = None
    if registration:
        promotion = {"decision": registration["decision"], "reason": registration["reason"],
                     "promoted": bool(outcome and outcome["promoted"]),
                     "outcome": outcome["reason"] if outcome else "the gate did not promote"}
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
