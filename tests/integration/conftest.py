"""Real servers on loopback for the tracking, registry and storage tests, started once per session.

- S3: `moto_server` (pipelines.stack.start_s3), or an S3 that already runs (a MinIO) when
  POSTTRAIN_TEST_S3_ENDPOINT=http://host:port and POSTTRAIN_TEST_S3_CREDENTIALS=ACCESS_KEY:SECRET_KEY are set.
- MLflow: `mlflow server` with a sqlite backend and `--artifacts-destination s3://posttrain-mlflow`.
- A TCP proxy in front of S3 that a test can pause (every connection refused and cut) and slow down.

With moto the credentials are distinctive fake values, so a test can search everything a run produced
for them; the MLflow client gets fake basic-auth credentials too (the test server ignores them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines import stack

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "posttrain-integration"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def secrets() -> dict[str, str]:
    """The credentials of this session: what must never show up in a log, param, tag or artifact."""
    access, secret = "AKIAPOSTTRAINFAKE7Q3XZ", "posttrain-fake-secret-0f9e8d7c6b5a4321"
    if os.environ.get("POSTTRAIN_TEST_S3_ENDPOINT"):
        access, _, secret = os.environ["POSTTRAIN_TEST_S3_CREDENTIALS"].partition(":")
    return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
            "MLFLOW_TRACKING_USERNAME": "posttrain-fake-user-k2j4",
            "MLFLOW_TRACKING_PASSWORD": "posttrain-fake-pw-8h7g6f"}


@dataclass
class Stack:
    root: Path
    s3_endpoint: str
    tracking_uri: str
    mlflow_port: int
    server_env: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    """What a client process needs: tracking URI, S3 endpoint, credentials."""

    def kill_mlflow(self) -> None:
        stack.stop(self.root, "mlflow", sig=9)

    def start_mlflow(self) -> None:
        stack.start_mlflow(self.root, self.mlflow_port, self.s3_endpoint, env=self.server_env)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, secrets):
    """(stack dir, endpoint, the servers' credentials): moto on a free port, or the configured MinIO."""
    root = tmp_path_factory.mktemp("stack")
    creds = {k: secrets[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    endpoint = os.environ.get("POSTTRAIN_TEST_S3_ENDPOINT") or stack.start_s3(root, free_port(), env=creds)
    try:
        stack.create_buckets(endpoint, env=creds)
        yield root, endpoint, creds
    finally:
        stack.down(root)


@pytest.fixture(scope="session")
def servers(s3_server, secrets) -> Stack:
    root, s3, creds = s3_server
    port = free_port()
    uri = stack.start_mlflow(root, port, s3, env=creds)
    env = {**secrets, "MLFLOW_TRACKING_URI": uri, "MLFLOW_S3_ENDPOINT_URL": s3,
           "POSTTRAIN_EXPERIMENT": EXPERIMENT, "AWS_DEFAULT_REGION": "us-east-1",
           "OMP_NUM_THREADS": "1"}  # one torch thread per stage process: 2 shared cores, no oversubscription
    return Stack(root, s3, uri, port, creds, env)


@pytest.fixture
def s3_env(s3_server, secrets, monkeypatch):
    """This test's process talks to the session's S3 endpoint; returns the endpoint."""
    _, endpoint, _ = s3_server
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, secrets[k])
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return endpoint


@pytest.fixture
def tracking_env(servers, monkeypatch):
    """This test's process (and its subprocesses) talk to the session's servers."""
    for k, v in servers.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("POSTTRAIN_PARENT_RUN_ID", raising=False)
    return servers


class PausableProxy:
    """A TCP proxy on loopback: `pause()` refuses new connections and cuts open ones until `resume()`;
    `delay` seconds are added before every chunk sent upstream (to slow a transfer down)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.delay = target, 0.0
        self._paused = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._paused.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._cut(s)

    def _cut(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def pause(self) -> None:
        self._paused.set()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._cut(s)

    def resume(self) -> None:
        self._paused.clear()

    def close(self) -> None:
        self.pause()
        self._server.close()


@pytest.fixture
def s3_proxy(s3_server):
    host_port = s3_server[1].split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    proxy = PausableProxy((host, int(port)))
    yield proxy
    proxy.close()


# ----------------------------------------------------------------------------------------------------
# A short SFT stage run under a parent run, shared by the tracking, registry and secrets tests

def run_module(module: str, config: Path, env: dict[str, str], log: Path, timeout: float = 240) -> str:
    """`python -m <module> --config <config>` with `env` added; returns its output (also written to `log`)."""
    proc = subprocess.run([sys.executable, "-m", module, "--config", str(config)], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def write_sft_data(path: Path, n: int = 64) -> Path:
    from components.datasets import write_jsonl
    from components.tasks import get_task

    rows = get_task("arithmetic").generate(n, seed=1, split="id", part="train")
    write_jsonl(path, [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    return path


def sft_config(path: Path, model: Path, data: Path, out: Path, steps: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"model": str(model), "train_data": str(data), "output_dir": str(out),
                                    "max_length": 96, "train": {"max_steps": steps, "batch_size": 4,
                                                                "token_budget": 256, "lr": 3e-3, "log_every": 50}}))
    return path


@dataclass
class SFTRun:
    parent_run_id: str
    output_dir: Path
    model_dir: Path
    train_data: Path
    log: Path
    output: str


@pytest.fixture(scope="session")
def sft_run(servers, tiny_model_dir, tmp_path_factory) -> SFTRun:
    """The SFT stage entrypoint, 6 steps on the tiny model, as a child of a parent run made here."""
    from components import tracking

    tmp = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in servers.env.items():
            mp.setenv(k, v)
        mp.setenv("POSTTRAIN_KFP_RUN_ID", "kfp-run-0001")
        mp.setenv("POSTTRAIN_SPEC_HASH", "sha256:spec0001")
        mp.setenv("POSTTRAIN_BASE_MODEL", str(tiny_model_dir))
        parent = tracking.start_parent(run_name="pipeline-test")
        data = write_sft_data(tmp / "train.jsonl")
        config = sft_config(tmp / "sft.yaml", tiny_model_dir, data, tmp / "out", steps=6)
        output = run_module("components.sft", config, {"POSTTRAIN_PARENT_RUN_ID": parent,
                                                       "POSTTRAIN_SYSTEM_METRICS_INTERVAL": "0.5"}, tmp / "sft.log")
        tracking.end_parent(parent, "FINISHED")
    return SFTRun(parent, tmp / "out", tmp / "out" / "model", data, tmp / "sft.log", output)


@pytest.fixture(scope="session")
def helpers():
    """The functions above, for test modules (tests/ is not a package, so they cannot import this file)."""
    import types

    return types.SimpleNamespace(repo=REPO, run_module=run_module, write_sft_data=write_sft_data,
                                 sft_config=sft_config, free_port=free_port)


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A fake KFP API server on loopback (tests/integration/kfp_api.py), with kfp.Client's home and the compiled
    packages under tmp_path."""
    from kfp_api import KfpApi  # beside this file: pytest puts this directory on sys.path

    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    monkeypatch.chdir(tmp_path)  # compiled packages go to .posttrain/compiled
    with KfpApi() as server:
        yield server
