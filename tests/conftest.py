"""Shared fixtures: a tiny model, and real servers on loopback (started once per session) for the integration
and emulated-cluster tests.

- S3: `moto_server` (pipelines.stack.start_s3), or an S3 that already runs (a MinIO) when
  POSTTRAIN_TEST_S3_ENDPOINT=http://host:port and POSTTRAIN_TEST_S3_CREDENTIALS=ACCESS_KEY:SECRET_KEY are set.
- MLflow: `mlflow server` with a sqlite backend and `--artifacts-destination s3://posttrain-mlflow`.

With moto the credentials are distinctive fake values, so a test can search everything a run produced
for them; the MLflow client gets fake basic-auth credentials too (the test server ignores them).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pipelines import stack

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""The suite's processes: pytest-xdist workers (`make test` runs one per core, `--dist loadfile`: see SPREAD);
1 without xdist."""
THREADS = max(1, min(2, len(os.sched_getaffinity(0)) // WORKERS))
"""Torch threads per worker: at most 2, never more than the cores shared among the workers, whose intra-op threads
would otherwise wait on each other whenever one is descheduled."""
torch.set_num_threads(THREADS)
if WORKERS > 1:  # the stage processes the tests start inherit it (a value already in the environment wins)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# a training Session's thread count, here and in the processes the tests start: fixed whatever the load, since the
# count can change float results that resume tests compare exactly (components/threads.py)
os.environ.setdefault("POSTTRAIN_THREADS", str(THREADS))

SLOW = ("tests/cluster/test_e2e.py", "tests/integration/test_demo.py", "tests/e2e/test_local_run.py",
        "tests/integration/test_multinode.py")
"""Files of whole-DAG and multi-node acceptance runs, a minute or more each: marked `slow`, so that a subset can be
chosen by hand (`pytest -m "not slow" tests`); `make test` runs them all."""


SPREAD = ("tests/integration/test_vllm_ranks.py", "tests/cluster/test_e2e.py", "tests/integration/test_async_rl.py",
          "tests/e2e/test_local_run.py",
          "tests/integration/test_multinode.py", "tests/integration/test_demo.py",
          "tests/integration/test_reliability_runs.py", "tests/integration/test_vllm_lora.py",
          "tests/integration/test_sampling_parallel.py", "tests/integration/test_bench_ranks.py",
          "tests/e2e/test_stage_registry.py", "tests/cluster/test_zero3.py", "tests/integration/test_serve.py",
          "tests/integration/test_vllm_rollout.py")
"""Files of long tests that share nothing costly within the file (no module fixture that trains). Under
`--dist loadfile` (make test) each of their tests is a unit of work of its own, and they run first, roughly the
longest first, so that the workers end together instead of one running a whole file of minutes-long tests at the
end; every other file's tests run in one worker, one at a time, in the file's order."""


def pytest_collection_modifyitems(config, items):
    """The tests of SLOW are marked slow; those of SPREAD come first, in SPREAD's order."""
    root = Path(str(config.rootpath))
    files = {id(item): Path(str(item.path)).relative_to(root).as_posix() for item in items}
    for item in items:
        if files[id(item)] in SLOW:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: SPREAD.index(files[id(item)]) if files[id(item)] in SPREAD else len(SPREAD))


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, but each test of SPREAD a unit of its own, and the units handed out in the collection's
    order (SPREAD first) instead of xdist's most-tests-first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SpreadScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return nodeid if file in SPREAD else file

    config.option.loadscopereorder = False
    return SpreadScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from components.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def deepspeed_comm_op():
    """DeepSpeed's CPU comm op built on this machine, before an emulated pod needs it: the pods' own builds of it
    then find this one (tests/cluster/pods.py). The first build on a machine takes ~80 s of 2 cores, later ones
    only load it; torch's lock in the build directory lets one xdist worker build while the other waits."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   check=True, capture_output=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


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


