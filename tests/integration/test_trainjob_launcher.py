"""A training step on several nodes, end to end against a Kubernetes API on loopback (tests/integration/k8s_api.py):
the step (components.step.Step with a TrainJob placement) creates the TrainJob, streams its pods' logs, waits,
fails with the TrainJob's own reason, deletes it however the step ends (SIGTERM included), and a retried
attempt reattaches to the TrainJob an attempt killed with SIGKILL left behind.

The fake server validates every TrainJob created against the CRD schema pinned in k8s/crds/ (422 otherwise), as
the API server does.
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
from k8s_api import Behaviour, KubernetesApi

from components.step import Step
from components.trainjob import API_ENV, Placement, TrainJobFailed, trainjob_name

REPO = Path(__file__).resolve().parents[2]
SECRETS = {"posttrain-minio": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
           "posttrain-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]}
# what a step for the sft stage is given (settings {} and the wiring below: nothing is read before the TrainJob)
STEP = """
import json, sys
from components.step import Step
step = Step("sft", "{}", output_dir=sys.argv[1], nproc=2, nodes=2, launch=sys.argv[2], kfp_run_id=sys.argv[3])
summary = step.run("sft", model="/models/base", train_data="/data/sft.train.jsonl", train={"lr": 1e-5, "max_steps": 3})
print("SUMMARY " + json.dumps(summary), flush=True)
"""


@pytest.fixture
def api(monkeypatch):
    with KubernetesApi() as server:
        monkeypatch.setenv(API_ENV, server.url)
        yield server


def _launch(**overrides) -> str:
    placement = Placement(namespace="posttrain", runtime="posttrain-trainer",
                          image="ghcr.io/posttrain/posttrain-trainer:0.1.0", spec_name="trainjob-test",
                          accelerator="nvidia.com/gpu", cpu="8", memory="64Gi",
                          shm_size="16Gi", node_selector={"posttrain/pool": "gpu-training"},
                          tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                          secrets=SECRETS, workspace_pvc="run-1-kfp-workspace", timeout=120, poll_seconds=0.1)
    for key, value in overrides.items():
        setattr(placement, key, value)
    return json.dumps({"max_nodes": 4, "max_nproc": 8, "trainjob": placement.to_json()})


def _step(tmp_path: Path, run_id: str, nodes: int = 2, **launch) -> Step:
    return Step("sft", "{}", output_dir=str(tmp_path / "sft"), nproc=2, nodes=nodes, launch=_launch(**launch),
                kfp_run_id=run_id)


def _run(step: Step) -> dict:
    return step.run("sft", model="/models/base", train_data="/data/sft.train.jsonl",
                    train={"lr": 1e-5, "max_steps": 3})


def _subprocess(tmp_path: Path, api: KubernetesApi, run_id: str) -> subprocess.Popen:
    env = {**os.environ, API_ENV: api.url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "AWS_SECRET_ACCESS_KEY": "posttrain-fake-secret-never-sent"}
    return subprocess.Popen([sys.executable, "-c", STEP, str(tmp_path / "sft"), _launch(), run_id], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _write_outputs(tmp_path: Path):
    """What the nodes leave in the shared workspace when the stage completes."""
    def write(job: dict) -> None:
        out = tmp_path / "sft"
        (out / "model").mkdir(parents=True, exist_ok=True)
        summary = {"final": {"nll": 1.25}, "nodes": job["spec"]["trainer"]["numNodes"]}
        (out / "summary.json").write_text(json.dumps(summary))
    return write


def test_create_stream_logs_and_complete(api, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "posttrain-fake-secret-never-sent")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.posttrain.svc:5000")
    api.behaviour = Behaviour(on_complete=_write_outputs(tmp_path))
    summary = _run(_step(tmp_path, "run-1"))
    name = trainjob_name("run-1", "sft")
    assert summary == {"final": {"nll": 1.25}, "nodes": 2}
    out = capsys.readouterr().out
    for node in (0, 1):
        for line in ("step 1 loss 2.0", "step 3 loss 1.2"):
            assert f"[node-{node}] rank {node}: {line}" in out
    assert out.count("[node-0] rank 0: step 2 loss 1.5") == 1  # each line once
    assert api.created == [name] and api.deleted == [name] and api.trainjobs == {}
    # what was created: the stage's module under torchrun, reading the config the step wrote to the workspace
    job = api.last_created
    trainer = job["spec"]["trainer"]
    config = tmp_path / "sft" / "step-config.yaml"
    assert trainer["command"] == ["python", "-m", "torch.distributed.run", "-m", "components.sft", "--config",
                                  str(config)]
    assert config.exists() and "max_steps: 3" in config.read_text()
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 2
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.posttrain.svc:5000"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
        "name": "posttrain-minio", "key": "AWS_SECRET_ACCESS_KEY", "optional": False}}}
    assert "posttrain-fake-secret-never-sent" not in json.dumps(job)
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"posttrain/pool": "gpu-training"}
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "run-1-kfp-workspace"}} in pod["volumes"]
    assert {"name": "workspace", "mountPath": str(tmp_path)} in pod["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert job["metadata"]["labels"] == {"posttrain/run-id": "run-1", "posttrain/stage": "sft",
                                         "posttrain/spec": "trainjob-test"}


def test_a_dropped_log_stream_reconnects_without_repeating_lines(api, tmp_path, capsys):
    api.behaviour = Behaviour(lines=[f"step {i}" for i in range(1, 9)], interval=0.1, drop_log_after=3,
                              on_complete=_write_outputs(tmp_path))
    _run(_step(tmp_path, "run-11"))
    out = capsys.readouterr().out
    for node in (0, 1):
        assert [line for line in out.splitlines() if line.startswith(f"[node-{node}]")] == [
            f"[node-{node}] rank {node}: step {i}" for i in range(1, 9)]
    assert all(count >= 2 for count in api.log_streams.values()), api.log_streams  # it did reconnect


def test_failure_names_the_trainjobs_reason(api, tmp_path, capsys):
    api.behaviour = Behaviour(outcome="Failed", reason="FailedJobs",
                              message="jobset posttrain/pt-sft: job node-0-1 failed: BackoffLimitExceeded")
    with pytest.raises(TrainJobFailed, match=r"TrainJob posttrain/pt-sft-\w+ failed: FailedJobs: jobset "
                                             r"posttrain/pt-sft: job node-0-1 failed: BackoffLimitExceeded"):
        _run(_step(tmp_path, "run-2"))
    assert "[node-1] Traceback (most recent call last): RuntimeError: NCCL timeout" in capsys.readouterr().out
    name = trainjob_name("run-2", "sft")
    assert api.created == [name] and api.deleted == [name]


def test_timeout_fails_and_deletes(api, tmp_path):
    api.behaviour = Behaviour(outcome=None)
    with pytest.raises(TrainJobFailed, match=r"did not finish within 1s \(resources.timeout\)"):
        _run(_step(tmp_path, "run-3", timeout=1))
    assert api.deleted == api.created == [trainjob_name("run-3", "sft")]


def test_a_retry_reattaches_to_the_trainjob_a_killed_attempt_left(api, tmp_path, capsys):
    """Attempt 1 is killed with SIGKILL (nothing of it runs after): its TrainJob keeps running. Attempt 2, the
    same run and stage, finds it by name and labels, streams its logs and waits for it: no second TrainJob."""
    api.behaviour = Behaviour(outcome=None, on_complete=_write_outputs(tmp_path))
    name = trainjob_name("run-4", "sft")
    first = _subprocess(tmp_path, api, "run-4")
    api.wait_for(lambda: api.log_lines(name) >= 6)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert name in api.trainjobs and api.deleted == []
    api.finish(name, "Complete")
    summary = _run(_step(tmp_path, "run-4"))
    assert summary["final"] == {"nll": 1.25}
    assert api.created == [name] and api.deleted == [name]
    assert "[node-1] rank 1: step 3 loss 1.2" in capsys.readouterr().out


def test_a_retry_restarts_a_trainjob_that_failed(api, tmp_path):
    """A killed attempt's TrainJob that then failed is deleted and created again (the stage resumes from its last
    checkpoint in the workspace)."""
    api.behaviour = Behaviour(outcome=None)
    name = trainjob_name("run-5", "sft")
    first = _subprocess(tmp_path, api, "run-5")
    api.wait_for(lambda: api.log_lines(name) >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    api.finish(name, "Failed", "FailedJobs", "node 1 lost")
    api.wait_for(lambda: "status" in api.trainjobs[name])
    api.behaviour = Behaviour(on_complete=_write_outputs(tmp_path))
    _run(_step(tmp_path, "run-5"))
    assert api.created == [name, name] and api.deleted == [name, name]


def test_sigterm_deletes_the_trainjob(api, tmp_path):
    """KFP stopping the run (or a drained node) sends the step SIGTERM: the TrainJob goes with it."""
    api.behaviour = Behaviour(outcome=None)
    name = trainjob_name("run-6", "sft")
    step = _subprocess(tmp_path, api, "run-6")
    api.wait_for(lambda: api.log_lines(name) >= 6)
    time.sleep(1.0)  # the step's poll sees the pods and streams their logs
    step.send_signal(signal.SIGTERM)
    output, _ = step.communicate(timeout=30)
    assert step.returncode != 0, output
    assert api.deleted == [name] and api.trainjobs == {}, output
    assert "[node-0] rank 0: step 1 loss 2.0" in output and f"deleted TrainJob posttrain/{name}" in output


def test_a_scale_outside_the_spec_creates_nothing(api, tmp_path):
    with pytest.raises(ValueError, match=r"stage sft: sft_nodes=5 is invalid: between 1 and 4"):
        Step("sft", "{}", output_dir=str(tmp_path / "sft"), nproc=2, nodes=5, launch=_launch(), kfp_run_id="run-7")
    assert api.requests == []


def test_a_trainjob_of_another_run_is_never_taken(api, tmp_path):
    api.behaviour = Behaviour(outcome=None)
    name = trainjob_name("run-8", "sft")
    first = _subprocess(tmp_path, api, "run-8")
    api.wait_for(lambda: name in api.trainjobs)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    api.trainjobs[name]["metadata"]["labels"]["posttrain/run-id"] = "someone-else"
    with pytest.raises(TrainJobFailed, match="belongs to another run or stage"):
        _run(_step(tmp_path, "run-8"))
    assert api.created == [name]


def test_the_workspace_pvc_is_the_one_the_steps_pod_mounts(api):
    from components.trainjob import kube_client, workspace_claim

    api.add_pod({"metadata": {"name": "step-pod", "namespace": "posttrain", "labels": {}},
                 "spec": {"containers": [{"name": "main", "image": "x", "volumeMounts": [
                     {"name": "kfp-workspace", "mountPath": "/kfp-workspace"}]}],
                          "volumes": [{"name": "kfp-workspace",
                                       "persistentVolumeClaim": {"claimName": "run-9-kfp-workspace"}}]},
                 "status": {"phase": "Running"}})
    assert workspace_claim(kube_client(), "posttrain", "/kfp-workspace", "step-pod") == "run-9-kfp-workspace"
    with pytest.raises(TrainJobFailed, match="mounts no PVC at the workspace /elsewhere"):
        workspace_claim(kube_client(), "posttrain", "/elsewhere", "step-pod")


def test_a_checkpoint_of_another_node_count_is_refused_before_launching(api, tmp_path):
    """The stage's last checkpoint (in the shared workspace) was written by 2 nodes × 2 processes: a retry or a
    new attempt with another <stage>_nodes fails before any TrainJob starts, saying how to go on."""
    checkpoint = tmp_path / "sft" / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "topology.json").write_text(json.dumps({"nodes": 2, "nproc_per_node": 2, "world": 4}))
    (checkpoint / "COMPLETE").touch()
    with pytest.raises(ValueError, match=r"stage sft: .*step-00000004 was written by 2 node\(s\) × 2 process\(es\), "
                                         r"and this run has 3 × 2: resume on the topology that wrote it \(the run "
                                         r"parameters <stage>_nodes=2 and <stage>_gpus_per_node=2\)"):
        _run(_step(tmp_path, "run-10", nodes=3))
    assert api.created == []
