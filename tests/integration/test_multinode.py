"""Training across nodes: two processes as two "nodes" (`torchrun --nnodes 2 --nproc-per-node 1` with a c10d
rendezvous on loopback, as Kubeflow Trainer's torch runtime starts one per pod) train SFT on the tiny model under
DeepSpeed ZeRO-2 (CPU, gloo), with their checkpoints in one directory both see (the run's shared workspace).

One node is killed with SIGKILL mid-run, after a checkpoint; both are started again (what a TrainJob's retry
does) and the run resumes and ends exactly as the uninterrupted run: metrics.jsonl equal line for line except the
timing fields. The checkpoint holds each rank's optimizer shard and own state, the model states of rank 0 and the
topology (2 nodes × 1 process); a resume on another node count is refused with a message saying what to do.

DeepSpeed's first start on a machine JIT-builds a comm op (~80 s, then cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.datasets import write_jsonl
from components.models import build_tiny_model
from components.tasks import get_task
from tests.torchrun import free_port, rank_env

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
CHECKPOINT_EVERY = 4
TIMING = {"tokens_per_s", "mfu", "step_time_s", "flops"}
"""Fields that measure the machine, not the training: left out of the comparison."""


def _config(root: Path, name: str, model: Path, data: Path) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model), "train_data": str(data), "output_dir": str(root / name),
        "objective": {"method": "sft"},
        "train": {"max_steps": STEPS, "batch_size": 64, "token_budget": 32, "lr": 1e-3, "precision": "fp32",
                  "seed": 0, "log_every": 1, "zero_stage": 2, "checkpoint_every": CHECKPOINT_EVERY}}))
    return path


def _start_nodes(config: Path, log_dir: Path, attempt: str, module: str = "components.sft") -> list[subprocess.Popen]:
    """Two torchrun agents, one per "node", meeting at a c10d rendezvous; each in its own process group, so a
    node (agent and worker) can be killed as a whole."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"posttrain-{attempt}",
               "--max-restarts", "0", "-m", module, "--config", str(config)]
        log = open(log_dir / f"{attempt}-node{node}.log", "w")
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return nodes


def _wait(nodes: list[subprocess.Popen], log_dir: Path, attempt: str, timeout: float = 900) -> list[int]:
    deadline = time.monotonic() + timeout
    for proc in nodes:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in nodes:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"{attempt} did not finish:\n" + _logs(log_dir, attempt))
    return [p.returncode for p in nodes]


def _logs(log_dir: Path, attempt: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(log_dir.glob(f"{attempt}-node*.log")))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    model = build_tiny_model(root / "tiny")
    data = root / "train.jsonl"
    write_jsonl(data, get_task("arithmetic").generate(1024, seed=0))
    logs = root / "logs"
    logs.mkdir()
    return root, model, data, logs


def test_two_nodes_resume_after_one_is_killed_and_end_as_the_uninterrupted_run(setup):
    root, model, data, logs = setup
    # the uninterrupted run
    reference = _config(root, "reference", model, data)
    assert _wait(_start_nodes(reference, logs, "reference"), logs, "reference") == [0, 0], _logs(logs, "reference")
    expected = _metrics(root / "reference")
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    # the interrupted run: one node killed with SIGKILL once the first checkpoint is complete
    config = _config(root, "interrupted", model, data)
    out = root / "interrupted"
    nodes = _start_nodes(config, logs, "first")
    checkpoint = out / "checkpoints" / f"step-{CHECKPOINT_EVERY:08d}"
    deadline = time.monotonic() + 900
    while not (checkpoint / "COMPLETE").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
            pytest.fail("no checkpoint before the run ended:\n" + _logs(logs, "first"))
        time.sleep(0.02)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    killed_at = len(_metrics(out))
    try:  # the surviving node fails on its next collective, or waits in it (gloo may not see the peer go); a
        nodes[0].wait(30)  # TrainJob's JobSet would restart it anyway
    except subprocess.TimeoutExpired:
        os.killpg(nodes[0].pid, signal.SIGKILL)
        nodes[0].wait(30)
    nodes[1].wait(30)
    assert killed_at < STEPS, "the run ended before the kill: nothing was interrupted"
    assert nodes[1].returncode == -signal.SIGKILL

    # what the checkpoint holds, written by the right ranks to the shared directory
    files = sorted(p.name for p in checkpoint.iterdir())
    assert {"client-rank00000.pt", "client-rank00001.pt", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "topology.json", "COMPLETE"} <= set(files), files
    assert not [f for f in files if f.startswith("mp_rank_01")]  # model states from global rank 0 only
    assert json.loads((checkpoint / "topology.json").read_text()) == {"nodes": 2, "nproc_per_node": 1, "world": 2}

    # both nodes started again: the run resumes from the last checkpoint and ends as the uninterrupted one
    assert _wait(_start_nodes(config, logs, "again"), logs, "again") == [0, 0], _logs(logs, "again")
    assert "resumed from" in _logs(logs, "again")
    got = _metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert _without_timing(got) == _without_timing(expected)

    # another node count is refused, naming the topology that wrote the checkpoint
    done = subprocess.run([sys.executable, "-m", "components.sft", "--config", str(config)], cwd=REPO, env=rank_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "was written by 2 node(s) × 1 process(es), and this run has 1 × 1: resume on the topology that wrote it" \
        in done.stdout + done.stderr, done.stderr[-3000:]


def test_ppo_runs_on_two_nodes_with_its_checkpoints_in_the_shared_directory(setup):
    """ppo declares multi_node in the registry (a TrainJob runs it under torchrun on every node): on two "nodes" it
    trains to the end, both nodes exit 0, and its checkpoint records the two-node topology."""
    root, model, _, logs = setup
    out = root / "ppo"
    config = root / "ppo.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "output_dir": str(out), "prompts": {"task": "arithmetic", "task_rows": 16},
        "sampling": {"max_new_tokens": 8, "temperature": 1.0}, "rewards": [{"name": "arithmetic"}],
        "critic_init": "policy", "ppo_epochs": 1, "num_minibatches": 1,
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "precision": "fp32", "seed": 0, "log_every": 1,
                  "zero_stage": 2, "checkpoint_every": 2}}))
    nodes = _start_nodes(config, logs, "ppo", module="components.ppo")
    assert _wait(nodes, logs, "ppo") == [0, 0], _logs(logs, "ppo")
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    checkpoint = out / "checkpoints" / "step-00000002"
    for part in (checkpoint, out / "checkpoints" / "critic-step-00000002"):  # the actor's and the critic's
        assert json.loads((part / "topology.json").read_text()) == {"nodes": 2, "nproc_per_node": 1, "world": 2}
    assert (out / "model" / "config.json").exists()
