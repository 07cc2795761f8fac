"""Runs that meet other runs, an MLflow that is away, and a stop signal.

- One writer per directory: a second stage into the same output_dir, or a second `posttrain run` on the same state
  directory, is refused at once in one line naming the holder; `posttrain run` summarizes the run it started.
- MLflow unreachable from the start fails a stage in one line within the connect budget, and `posttrain run` in
  seconds, not minutes; writes that could not be delivered end in a warning and reach MLflow at the next start
  (also those of a process killed while MLflow was away).
- SIGTERM to `posttrain run` stops the step it started and closes its MLflow runs KILLED, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
QUIET = {"POSTTRAIN_SYSTEM_METRICS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"{what}: the process ended ({proc.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def dead_uri() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed


# ----------------------------------------------------------------------------------------------------------------
# One writer per directory

STEPS = 100
"""The first stage's steps: more than it can run between its step 1 and the SIGSTOP below (a 0.1 s poll)."""


def test_a_second_stage_into_the_same_output_dir_is_refused_at_once(tiny_model_dir, tmp_path, helpers):
    data = helpers.write_sft_data(tmp_path / "train.jsonl", n=32)
    out = tmp_path / "out"
    config = helpers.sft_config(tmp_path / "sft.yaml", tiny_model_dir, data, out, steps=STEPS)
    env = {**os.environ, **QUIET}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen([sys.executable, "-m", "components.sft", "--config", str(config)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 120, "the first stage's step 1",
                 first)
        # the first stage is held mid-run (SIGSTOP: alive, its lock held) while the second starts, so it cannot
        # end before the second is refused however slow the machine; a stage that was not refused would write
        # its own steps into the same metrics.jsonl
        os.kill(first.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            second = subprocess.run([sys.executable, "-m", "pipelines.cli", "stage", "sft", "--config", str(config)],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            took = time.monotonic() - t0
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert first.poll() is None, "the first stage ended before the second was refused: nothing was tested"
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    (line,) = [ln for ln in second.stderr.splitlines() if "in use by" in ln]
    assert f"output_dir {out} is in use by pid {first.pid} on " in line and "components.sft" in line, line
    assert "INFO components." not in second.stderr  # refused before it loaded anything
    assert took < 60, took
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one writer: no step twice


def minimal_spec(tmp_path: Path, name: str, sources: list[dict], max_steps: int = 2) -> Path:
    spec = {"name": name, "base_model": "bundled:tiny",
            "data": {"max_length": 48, "eval_fraction": 0.0, "sources": sources},
            "stages": [{"stage": "psft", "settings": {"max_length": 48, "train": {
                "max_steps": max_steps, "batch_size": 4, "token_budget": 256, "log_every": 1,
                "checkpoint_every": 100000}}}],
            "resources": {"retries": 1}, "runtime_resources": {"retries": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stop_tree(proc: subprocess.Popen) -> None:
    """Kill a process and everything it started (whatever the code under test left running)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.wait(timeout=30)


def test_a_second_posttrain_run_on_the_same_state_directory_is_refused(tmp_path, helpers):
    data = helpers.write_sft_data(tmp_path / "train.jsonl", n=16)
    long = minimal_spec(tmp_path, "first", [{"uri": str(data), "shape": "sft"}], max_steps=100000)
    other = minimal_spec(tmp_path, "second", [{"uri": str(tmp_path / "none.jsonl"), "shape": "sft"}])
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **QUIET}
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(long), "--out", str(tmp_path / "o1")],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / ".posttrain" / "runs").is_dir(), 120, "the first run's steps", first)
        second = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(other), "--out",
                                 str(tmp_path / "o2")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env=env)
    finally:
        stop_tree(first)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("posttrain run:")]
    assert f"state directory {tmp_path / '.posttrain'} is in use by pid {first.pid} on " in line, line
    assert "pipelines.cli run" in line and "first.yaml" in line, line
    assert not list((tmp_path / ".posttrain" / "runs").glob("second-*"))  # nothing of it started


def test_posttrain_run_summarizes_the_run_it_started_not_the_newest(tmp_path):
    """A run directory of the same spec appears (and keeps being touched) while the run runs: the summary is still
    of this run's directory."""
    from pipelines.local import run_local
    from pipelines.spec import load_spec

    spec = load_spec(minimal_spec(tmp_path, "mine", [{"uri": str(tmp_path / "none.jsonl"), "shape": "sft"}]))
    runs, stop = tmp_path / "state" / "runs", threading.Event()

    def decoy():
        while not stop.wait(0.2):
            if runs.is_dir():
                (runs / "mine-9999-decoy").mkdir(exist_ok=True)
                os.utime(runs / "mine-9999-decoy")
    t = threading.Thread(target=decoy, daemon=True)
    t.start()
    try:
        summary = run_local(spec, tmp_path / "out", state=tmp_path / "state")
    finally:
        stop.set()
        t.join()
    assert (runs / "mine-9999-decoy").is_dir()
    run_dir = Path(summary["run_dir"])
    assert run_dir.name != "mine-9999-decoy" and (run_dir / "preflight" / "report").is_file(), summary["run_dir"]
    assert summary["status"] == "failed" and "none.jsonl" in summary["error"]


# ----------------------------------------------------------------------------------------------------------------
# MLflow away

def test_a_stage_fails_in_one_line_when_mlflow_is_unreachable(tiny_model_dir, tmp_path, helpers):
    data = helpers.write_sft_data(tmp_path / "train.jsonl", n=16)
    config = helpers.sft_config(tmp_path / "sft.yaml", tiny_model_dir, data, tmp_path / "out", steps=2)
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": dead_uri(), "POSTTRAIN_TRACKING_CONNECT_TIMEOUT": "3"}
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "stage", "sft", "--config", str(config)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("python -m components.sft:")]
    assert f"MLflow at {env['MLFLOW_TRACKING_URI']} is unreachable" in line
    assert "POSTTRAIN_TRACKING_CONNECT_TIMEOUT" in line
    assert took < 60, took
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no step trained


def test_posttrain_run_with_mlflow_unreachable_ends_in_seconds(tmp_path, helpers):
    """Preflight finds MLflow away; the closing step, which talks to MLflow too, gives up within the connect budget
    instead of the MLflow client's four minutes."""
    data = helpers.write_sft_data(tmp_path / "train.jsonl", n=16)
    spec = minimal_spec(tmp_path, "away", [{"uri": str(data), "shape": "sft"}])
    uri = dead_uri()
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(spec), "--out", str(tmp_path / "o"),
                             "--param", f"tracking_uri={uri}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, **QUIET, "POSTTRAIN_TRACKING_CONNECT_TIMEOUT": "3"})
    took = time.monotonic() - t0
    assert result.returncode == 1, result.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "preflight failed" in summary["error"] and uri in summary["error"]
    assert took < 90, took  # the MLflow client's own retries alone take about four minutes


WRITER = """
import sys, time
from mlflow import MlflowClient
from components import tracking
with tracking.stage_run("sft", {"lr": 0.1}) as run:
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 10.0 - step})
    while len(MlflowClient().get_metric_history(run.run_id, "loss")) < 3:
        time.sleep(0.1)
    print("RUN", run.run_id, flush=True)
    sys.stdin.readline()  # MLflow is made unreachable meanwhile
    for step in range(4, 9):
        run.log_metrics({"step": step, "loss": 10.0 - step})
    if sys.argv[1] == "killed":
        print("LOGGED", flush=True)
        time.sleep(600)
"""

NEXT_START = """
from components import tracking
with tracking.stage_run("next", {}) as run:
    pass
"""


@pytest.fixture
def mlflow_proxy(tracking_env, s3_proxy):
    """The session's MLflow server behind a proxy that can refuse every connection (conftest's PausableProxy, the
    class of the s3_proxy fixture): an outage without stopping the server other tests use."""
    proxy = type(s3_proxy)(("127.0.0.1", tracking_env.mlflow_port))
    yield proxy
    proxy.close()


@pytest.mark.parametrize("ending", ["ended", "killed"])
def test_writes_not_delivered_warn_and_reach_mlflow_at_the_next_start(tracking_env, mlflow_proxy, tmp_path, ending):
    """MLflow goes away after step 3 of 8, for good as far as the process knows: it ends with a warning (or is
    killed), not a silent success; the next stage started with the same spool directory sends the rest, and the
    run ends closed as it ended (FINISHED), or with its 8 steps (killed: it never closed)."""
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": mlflow_proxy.endpoint,
           "POSTTRAIN_TRACKING_SPOOL": str(tmp_path), "POSTTRAIN_TRACKING_FLUSH_TIMEOUT": "2"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, ending], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().split()
        assert first[:1] == ["RUN"], proc.stderr.read()[-3000:]
        run_id = first[1]
        mlflow_proxy.pause()
        proc.stdin.write("\n")
        proc.stdin.flush()
        if ending == "killed":
            assert proc.stdout.readline().strip() == "LOGGED"
            proc.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    client = MlflowClient(tracking_env.tracking_uri)  # the server itself, past the proxy
    assert len(client.get_metric_history(run_id, "loss")) == 3 and client.get_run(run_id).info.status == "RUNNING"
    if ending == "ended":
        assert proc.returncode == 0, err[-3000:]
        (line,) = [ln for ln in err.splitlines() if ln.startswith("WARNING: MLflow writes not delivered")]
        assert f"to run {run_id}" in line and str(tmp_path) in line, line
    assert list(tmp_path.glob(f"posttrain-{run_id}-*.jsonl"))  # the journal is kept

    mlflow_proxy.resume()
    nxt = subprocess.run([sys.executable, "-c", NEXT_START], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 9))
    assert client.get_run(run_id).info.status == ("FINISHED" if ending == "ended" else "RUNNING")
    assert not list(tmp_path.glob(f"posttrain-{run_id}-*"))  # sent whole: removed


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM

def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone, or a zombie
        return False


def test_sigterm_stops_the_step_and_closes_the_mlflow_runs_killed(tmp_path, helpers):
    data = helpers.write_sft_data(tmp_path / "train.jsonl", n=32)
    spec = minimal_spec(tmp_path, "stopme", [{"uri": str(data), "shape": "sft"}], max_steps=100000)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cli = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(spec), "--out", str(tmp_path / "o")],
                           cwd=tmp_path, env={**env, **QUIET}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    descendants = []
    try:
        workspace = tmp_path / ".posttrain" / "workspace"
        wait_for(lambda: any(p.stat().st_size for p in workspace.glob("*/*/metrics.jsonl")), 240, "psft training",
                 cli)
        descendants = psutil.Process(cli.pid).children(recursive=True)
        assert descendants
        cli.send_signal(signal.SIGTERM)
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
        alive = [p.pid for p in descendants if running(p)]
        for p in descendants:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not alive, alive  # the step is stopped, with everything it started
    assert cli.returncode == 128 + signal.SIGTERM, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("posttrain run:")]
    assert "stopped by SIGTERM" in line and "stopped step(s) psft" in line and "KILLED" in line, line
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert summary["status"] == "stopped"
    client = MlflowClient(f"sqlite:///{tmp_path / '.posttrain' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stopme").experiment_id
    (parent,) = client.search_runs([exp], "tags.`posttrain.role` = 'pipeline'")
    (step,) = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED" and parent.data.tags["posttrain.final_state"] == "KILLED"
    assert step.info.status == "KILLED" and step.data.tags["posttrain.task"] == "psft"  # closed by the step itself
    assert f"psft run {step.info.run_id} (closed by the step)" in line and parent.info.run_id in line
