"""The integration tests' helpers: a pausable proxy in front of S3, a short SFT stage run under a parent run,
and the fake KFP API. The real servers on loopback (S3, MLflow) are the session fixtures of tests/conftest.py."""


from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
