"""A training step on several nodes against the emulated cluster's Kubernetes API (tests/cluster/kube.py): the step
(components.step.Step with a TrainJob placement) creates the TrainJob as the pipeline runner's service account
(RBAC of the rendered k8s/overlays/trainer), Trainer's controller makes one JobSet replicated job of numNodes
pods labelled as Trainer v2.3 and JobSet v0.12 label them, the step streams their logs by node rank, waits, fails
with the TrainJob's own reason, deletes it however the step ends, reattaches to the TrainJob a killed attempt left,
waits for one being deleted, and makes the run's Argo Workflow its owner so that deleting the run collects it.

The nodes here are small scripted processes (this file is about the API and the launcher, not the trainer): each
prints its lines prefixed with the PET_NODE_RANK the cluster resolved for its pod, and rank 0 writes the stage's
summary next to the step's config, as the trainer does.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cluster.kube import KubeApi
from components.step import Step
from components.trainjob import API_ENV, Placement, TrainJobFailed, trainjob_name

REPO = Path(__file__).resolve().parents[2]
NS, RUNNER = "posttrain", "posttrain-pipeline-runner"
SECRETS = {"posttrain-minio": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
           "posttrain-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]}
WORKSPACE_PVC = "run-1-kfp-workspace"
# what a step for the sft stage is given (settings {} and the wiring below: nothing is read before the TrainJob)
STEP = """
import json, sys
from components.step import Step
step = Step("sft", "{}", output_dir=sys.argv[1], nproc=2, nodes=2, launch=sys.argv[2], kfp_run_id=sys.argv[3])
summary = step.run("sft", model="/models/base", train_data="/data/sft.train.jsonl", train={"lr": 1e-5, "max_steps": 3})
print("SUMMARY " + json.dumps(summary), flush=True)
"""
# KFP's Go launcher between Argo's emissary and the component: it runs the step as a child and, as a Go program
# without a SIGTERM handler does, exits at once on SIGTERM
GO_LAUNCHER = """
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *a: os._exit(143))
sys.exit(child.wait())
"""
NODE = """
import json, os, pathlib, signal, sys, time
cfg = json.loads(sys.argv[1])
rank, nodes = int(os.environ["PET_NODE_RANK"]), int(os.environ["PET_NNODES"])
if cfg["term_delay"]:  # a node that takes its time to stop (a checkpoint being written)
    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(cfg["term_delay"]), sys.exit(143)))
for line in cfg["lines"]:
    time.sleep(cfg["interval"])
    print(f"rank {rank}: {line}", flush=True)
release, outcome = pathlib.Path(cfg["release"]), cfg["outcome"]
while outcome is None:
    if release.exists():
        outcome = release.read_text()
    time.sleep(0.05)
if outcome == "Failed":
    if rank == nodes - 1:
        print("Traceback (most recent call last): RuntimeError: NCCL timeout", flush=True)
        sys.exit(1)
elif rank == 0:
    out = pathlib.Path(cfg["command"][cfg["command"].index("--config") + 1]).parent
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"final": {"nll": 1.25}, "nodes": nodes}))
"""


@dataclass
class Nodes:
    """How the next TrainJob's node processes behave (the cluster's on_pod hook)."""

    tmp: Path
    lines: list[str] = field(default_factory=lambda: ["step 1 loss 2.0", "step 2 loss 1.5", "step 3 loss 1.2"])
    interval: float = 0.05
    outcome: str | None = "Complete"
    """Complete, Failed (the last rank fails), or None: runs until finish()."""
    term_delay: float = 0.0
    started: list[dict] = field(default_factory=list)

    def __call__(self, pod: dict, log: Path, api: KubeApi) -> subprocess.Popen:
        self.started.append(pod)
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
        job = pod["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"]
        cfg = {"lines": self.lines, "interval": self.interval, "outcome": self.outcome, "term_delay": self.term_delay,
               "release": str(self.tmp / f"{job}.release"), "command": container["command"]}
        env = {"PATH": os.environ["PATH"], **api.pod_environment(pod)}
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-c", NODE, json.dumps(cfg)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)

    def finish(self, name: str, outcome: str = "Complete") -> None:
        (self.tmp / f"{name}.release").write_text(outcome)


def trainer_install(namespace: str = NS) -> list[dict]:
    """The objects of a plain install with the trainer overlay: `kubectl apply -k k8s/overlays/trainer -n
    <namespace>` (objects the overlay leaves without a namespace go where kubectl's namespace says), the Secrets
    of k8s/secrets/ and the run's workspace PVC (created by KFP's driver)."""
    objects = copy.deepcopy(_rendered_trainer())
    for obj in objects:
        obj["metadata"].setdefault("namespace", namespace)
    objects += [s for s in yaml.safe_load_all((REPO / "k8s" / "secrets" / "secrets.example.yaml").read_text()) if s]
    objects.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": WORKSPACE_PVC, "namespace": namespace}, "spec": {}})
    return objects


@functools.cache
def _rendered_trainer() -> list[dict]:
    spec = importlib.util.spec_from_file_location("k8s_validate", REPO / "k8s" / "validate.py")
    validate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate)
    return validate.render(REPO / "k8s" / "overlays" / "trainer")


@pytest.fixture
def nodes(tmp_path):
    return Nodes(tmp_path / "nodes")


@pytest.fixture
def api(monkeypatch, nodes, tmp_path):
    nodes.tmp.mkdir()
    server = KubeApi(trainer_install(), {NS: {}}, on_pod=lambda pod, log: nodes(pod, log, server),
                     grace=1.0, restart_delay=0.1, workdir=tmp_path / "cluster")
    with server:
        monkeypatch.setenv(API_ENV, server.proxy(NS, RUNNER))  # the step as the pipeline runner
        yield server


def _launch(**overrides) -> str:
    placement = Placement(namespace=NS, runtime="posttrain-trainer",
                          image="ghcr.io/posttrain/posttrain-trainer:0.1.0", spec_name="trainjob-test",
                          accelerator="nvidia.com/gpu", cpu="8", memory="64Gi",
                          shm_size="16Gi", node_selector={"posttrain/pool": "gpu-training"},
                          tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                          secrets=SECRETS, workspace_pvc=WORKSPACE_PVC, timeout=120, poll_seconds=0.1)
    for key, value in overrides.items():
        setattr(placement, key, value)
    return json.dumps({"max_nodes": 4, "max_nproc": 8, "trainjob": placement.to_json()})


def _step(tmp_path: Path, run_id: str, nodes: int = 2, **launch) -> Step:
    return Step("sft", "{}", output_dir=str(tmp_path / "sft"), nproc=2, nodes=nodes, launch=_launch(**launch),
                kfp_run_id=run_id)


def _run(step: Step) -> dict:
    return step.run("sft", model="/models/base", train_data="/data/sft.train.jsonl",
                    train={"lr": 1e-5, "max_steps": 3})


def _subprocess(tmp_path: Path, api: KubeApi, run_id: str, *, pod: str | None = None,
                group: bool = False) -> subprocess.Popen:
    """The step as a process of its own; `pod`: the step's pod (HOSTNAME); `group`: in a process group of its own
    under KFP's Go launcher, as Argo's emissary starts it."""
    env = {**os.environ, API_ENV: os.environ[API_ENV], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "AWS_SECRET_ACCESS_KEY": "posttrain-fake-secret-never-sent"}
    if pod:
        env["HOSTNAME"] = pod
    cmd = [sys.executable, "-c", STEP, str(tmp_path / "sft"), _launch(), run_id]
    if group:
        cmd = [sys.executable, "-c", GO_LAUNCHER, *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=group)


def _gone(api: KubeApi, name: str) -> bool:
    return api.trainjob(NS, name) is None and not api.trainjob_pods(NS, name)


def _lines(api: KubeApi, name: str) -> int:
    return sum(len(api.container_log(NS, p["metadata"]["name"])) for p in api.trainjob_pods(NS, name))


def test_create_stream_logs_by_node_rank_and_complete(api, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "posttrain-fake-secret-never-sent")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.posttrain.svc:5000")
    summary = _run(_step(tmp_path, "run-1"))
    name = trainjob_name("run-1", "sft")
    assert summary == {"final": {"nll": 1.25}, "nodes": 2}
    out = capsys.readouterr().out
    for node in (0, 1):  # the prefix is the pod's completion index, the rank torchrun got (PET_NODE_RANK)
        for line in ("step 1 loss 2.0", "step 3 loss 1.2"):
            assert f"[node-{node}] rank {node}: {line}" in out
    assert out.count("[node-0] rank 0: step 2 loss 1.5") == 1  # each line once
    api.wait_for(lambda: _gone(api, name))
    assert api.created == [name] and api.deleted == [name]
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
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": WORKSPACE_PVC}} in pod["volumes"]
    assert {"name": "workspace", "mountPath": str(tmp_path)} in pod["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert job["metadata"]["labels"] == {"posttrain/run-id": "run-1", "posttrain/stage": "sft",
                                         "posttrain/spec": "trainjob-test"}


def test_the_pods_are_labelled_as_trainer_and_jobset_label_them(api, nodes, tmp_path):
    """One replicated job `node` with parallelism = completions = numNodes: job-index 0 on every pod, the node rank
    in the completion index, torchrun's PET_* from the torch plugin, the runtime template's pod labels."""
    nodes.outcome = None
    step = _subprocess(tmp_path, api, "run-12")
    name = trainjob_name("run-12", "sft")
    try:
        api.wait_for(lambda: len(nodes.started) == 2)
        pods = sorted(nodes.started, key=lambda p: p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])
        jobset = api.get("jobsets", NS, name, "jobset.x-k8s.io")
        (rjob,) = jobset["spec"]["replicatedJobs"]
        assert rjob["name"] == "node" and rjob["replicas"] == 1
        assert rjob["template"]["spec"]["parallelism"] == rjob["template"]["spec"]["completions"] == 2
        assert rjob["template"]["spec"]["completionMode"] == "Indexed"
        for rank, pod in enumerate(pods):
            labels = pod["metadata"]["labels"]
            assert labels["jobset.sigs.k8s.io/jobset-name"] == name
            assert labels["jobset.sigs.k8s.io/replicatedjob-name"] == "node"
            assert labels["jobset.sigs.k8s.io/job-index"] == "0"
            assert labels["batch.kubernetes.io/job-completion-index"] == str(rank)
            assert labels["sidecar.istio.io/inject"] == "false"  # the runtime template's pod labels
            assert pod["metadata"]["name"].startswith(f"{name}-node-0-{rank}-")
            assert pod["spec"]["hostname"] == f"{name}-node-0-{rank}" and pod["spec"]["subdomain"] == name
            env = api.pod_environment(pod, "node")
            assert env["PET_NODE_RANK"] == str(rank) and env["PET_NNODES"] == "2"
            assert env["PET_NPROC_PER_NODE"] == "2"
            assert env["PET_MASTER_ADDR"] == f"{name}-node-0-0.{name}" and env["PET_MASTER_PORT"] == "29500"
            assert env["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME_AT_LEAST_8_CHARACTERS"  # from the Secret
    finally:
        step.send_signal(signal.SIGTERM)
        step.communicate(timeout=30)


def test_a_dropped_log_stream_reconnects_without_repeating_lines(api, nodes, tmp_path, capsys):
    nodes.lines, nodes.interval = [f"step {i}" for i in range(1, 9)], 0.1
    api.drop_log_after = 3
    _run(_step(tmp_path, "run-11"))
    out = capsys.readouterr().out
    for node in (0, 1):
        assert [line for line in out.splitlines() if line.startswith(f"[node-{node}]")] == [
            f"[node-{node}] rank {node}: step {i}" for i in range(1, 9)]
    assert all(count >= 2 for count in api.log_streams.values()), api.log_streams  # it did reconnect


def test_failure_names_the_trainjobs_reason(api, nodes, tmp_path, capsys):
    """The last node fails on every restart (restartPolicy OnFailure, backoffLimit 6): the Job fails, the JobSet
    fails (FailedJobs) and Trainer copies its condition to the TrainJob."""
    nodes.outcome = "Failed"
    with pytest.raises(TrainJobFailed, match=r"TrainJob posttrain/pt-sft-\w+ failed: FailedJobs: jobset failed due "
                                             r"to one or more job failures"):
        _run(_step(tmp_path, "run-2"))
    assert "[node-1] Traceback (most recent call last): RuntimeError: NCCL timeout" in capsys.readouterr().out
    assert len(nodes.started) == 1 + 7  # node 0 once, node 1 once and 6 restarts
    name = trainjob_name("run-2", "sft")
    assert api.created == [name] and api.deleted == [name]


def test_timeout_fails_and_deletes(api, nodes, tmp_path):
    nodes.outcome = None
    with pytest.raises(TrainJobFailed, match=r"did not finish within 1s \(resources.timeout\)"):
        _run(_step(tmp_path, "run-3", timeout=1))
    assert api.deleted == api.created == [trainjob_name("run-3", "sft")]
    api.wait_for(lambda: _gone(api, trainjob_name("run-3", "sft")))


def test_a_retry_reattaches_to_the_trainjob_a_killed_attempt_left(api, nodes, tmp_path, capsys):
    """Attempt 1 is killed with SIGKILL (nothing of it runs after): its TrainJob keeps running. Attempt 2, the
    same run and stage, finds it by name and labels, streams its logs and waits for it: no second TrainJob."""
    nodes.outcome = None
    name = trainjob_name("run-4", "sft")
    first = _subprocess(tmp_path, api, "run-4")
    api.wait_for(lambda: _lines(api, name) >= 6)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert api.trainjob(NS, name) is not None and api.deleted == []
    nodes.finish(name, "Complete")
    summary = _run(_step(tmp_path, "run-4"))
    assert summary["final"] == {"nll": 1.25}
    assert api.created == [name] and api.deleted == [name]
    assert "[node-1] rank 1: step 3 loss 1.2" in capsys.readouterr().out


def test_a_retry_restarts_a_trainjob_that_failed(api, nodes, tmp_path):
    """A killed attempt's TrainJob that then failed is deleted and created again (the stage resumes from its last
    checkpoint in the workspace)."""
    nodes.outcome = None
    name = trainjob_name("run-5", "sft")
    first = _subprocess(tmp_path, api, "run-5")
    api.wait_for(lambda: _lines(api, name) >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    nodes.finish(name, "Failed")
    api.wait_for(lambda: "conditions" in (api.trainjob(NS, name).get("status") or {}), 60)
    (nodes.tmp / f"{name}.release").unlink()
    nodes.outcome = "Complete"
    _run(_step(tmp_path, "run-5"))
    assert api.created == [name, name] and api.deleted == [name, name]


def test_a_retry_waits_for_a_trainjob_being_deleted(api, nodes, tmp_path):
    """Attempt 1 deleted its TrainJob and was killed before it went: the nodes take their time to stop, so the
    TrainJob still exists with deletionTimestamp set (foreground deletion waits for its pods). Attempt 2 waits for
    it to go and creates a new one, rather than reattaching to a dying TrainJob or failing on 409."""
    nodes.outcome, nodes.term_delay = None, 30.0
    api.grace = 4.0  # the nodes get 4 s to stop, then SIGKILL: the TrainJob is being deleted for 4 s
    name = trainjob_name("run-13", "sft")
    first = _subprocess(tmp_path, api, "run-13")
    api.wait_for(lambda: _lines(api, name) >= 6)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    api.delete("trainjobs", NS, name, "trainer.kubeflow.org", propagation="Foreground")
    assert api.trainjob(NS, name)["metadata"]["deletionTimestamp"]
    nodes.outcome, nodes.term_delay = "Complete", 0.0
    started = time.monotonic()
    summary = _run(_step(tmp_path, "run-13"))
    assert summary["final"] == {"nll": 1.25}
    assert api.created == [name, name] and time.monotonic() - started > 2.0


def test_sigterm_deletes_the_trainjob(api, nodes, tmp_path):
    """KFP stopping the run (or a drained node) sends the step SIGTERM: the TrainJob goes with it."""
    nodes.outcome = None
    name = trainjob_name("run-6", "sft")
    step = _subprocess(tmp_path, api, "run-6")
    api.wait_for(lambda: _lines(api, name) >= 6)
    time.sleep(1.0)  # the step's poll sees the pods and streams their logs
    step.send_signal(signal.SIGTERM)
    output, _ = step.communicate(timeout=30)
    assert step.returncode != 0, output
    assert api.deleted == [name], output
    api.wait_for(lambda: _gone(api, name))
    assert "[node-0] rank 0: step 1 loss 2.0" in output and f"deleted TrainJob posttrain/{name}" in output


def _workflow_and_step_pod(api: KubeApi, run: str) -> tuple[dict, str]:
    """The run's Argo Workflow and its step's pod, labelled as Argo labels it (workflow/common/common.go)."""
    workflow = api.add({"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                        "metadata": {"name": f"{run}-wf", "namespace": NS}, "spec": {}})
    pod = f"{run}-wf-system-container-impl-1234"
    api.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS, "labels": {
        "workflows.argoproj.io/workflow": workflow["metadata"]["name"]}},
        "spec": {"serviceAccountName": RUNNER, "containers": [{"name": "main", "image": "x"}]}})
    return workflow, pod


def test_a_killed_step_leaves_no_trainjob_once_the_run_is_deleted(api, nodes, tmp_path):
    """The step is SIGKILLed with its whole process group (its container ended, the node lost): no `finally`
    runs. The TrainJob keeps running for a retry to reattach, owned by the run's Workflow: deleting the run deletes
    it and its pods (Kubernetes' garbage collector) instead of leaving the GPUs busy for activeDeadlineSeconds."""
    nodes.outcome = None
    workflow, pod = _workflow_and_step_pod(api, "run-14")
    name = trainjob_name("run-14", "sft")
    step = _subprocess(tmp_path, api, "run-14", pod=pod, group=True)
    api.wait_for(lambda: _lines(api, name) >= 6)
    os.killpg(step.pid, signal.SIGKILL)
    step.wait(30)
    owners = api.trainjob(NS, name)["metadata"].get("ownerReferences") or []
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [
        ("Workflow", workflow["metadata"]["name"], workflow["metadata"]["uid"])]
    api.delete("workflows", NS, workflow["metadata"]["name"], "argoproj.io")
    api.wait_for(lambda: _gone(api, name), 30)


def test_argo_termination_orphans_no_trainjob(api, nodes, tmp_path):
    """Argo stops a step as its emissary does (argo-workflows cmd/argoexec, emissary): SIGTERM to the step's whole
    process group; KFP's Go launcher exits at once and the container ends with it (PID 1 gone: everything left in it
    is killed), racing the step's own delete. The TrainJob is then deleted, or owned by the run's Workflow so that
    deleting the run deletes it."""
    nodes.outcome = None
    workflow, pod = _workflow_and_step_pod(api, "run-15")
    name = trainjob_name("run-15", "sft")
    step = _subprocess(tmp_path, api, "run-15", pod=pod, group=True)
    api.wait_for(lambda: _lines(api, name) >= 6)
    os.killpg(step.pid, signal.SIGTERM)
    step.wait(30)  # the Go launcher, the container's main process, is gone
    try:
        os.killpg(step.pid, signal.SIGKILL)  # and so is everything else in the container
    except ProcessLookupError:
        pass
    job = api.trainjob(NS, name)
    if job is not None and not job["metadata"].get("deletionTimestamp"):
        owners = job["metadata"].get("ownerReferences") or []
        assert workflow["metadata"]["uid"] in [o["uid"] for o in owners], "an orphaned TrainJob"
    api.delete("workflows", NS, workflow["metadata"]["name"], "argoproj.io")
    api.wait_for(lambda: _gone(api, name), 30)


def test_the_workflow_owner_needs_the_runners_get_on_workflows(api, tmp_path, monkeypatch):
    """Without get on workflows.argoproj.io the step fails before creating anything, rather than leaving a
    TrainJob no run owns (the Role of k8s/overlays/trainer grants it)."""
    _, pod = _workflow_and_step_pod(api, "run-16")
    from cluster.kube import Rbac

    trainjobs = [o for o in api.rbac_objects if o["kind"] == "Role" and o["metadata"]["name"] == "posttrain-trainjobs"]
    assert any("workflows" in r["resources"] and "get" in r["verbs"] for r in trainjobs[0]["rules"])
    for role in trainjobs:
        role["rules"] = [r for r in role["rules"] if "workflows" not in r["resources"]]
    api.rbac = Rbac(api.rbac_objects)
    monkeypatch.setenv("HOSTNAME", pod)
    with pytest.raises(TrainJobFailed, match=r"reading the run's Workflow posttrain/run-16-wf failed: 403"):
        _run(_step(tmp_path, "run-16"))
    assert api.created == []


def test_a_scale_outside_the_spec_creates_nothing(api, tmp_path):
    with pytest.raises(ValueError, match=r"stage sft: sft_nodes=5 is invalid: between 1 and 4"):
        Step("sft", "{}", output_dir=str(tmp_path / "sft"), nproc=2, nodes=5, launch=_launch(), kfp_run_id="run-7")
    assert api.requests == []


def test_a_trainjob_of_another_run_is_never_taken(api, nodes, tmp_path):
    nodes.outcome = None
    name = trainjob_name("run-8", "sft")
    first = _subprocess(tmp_path, api, "run-8")
    api.wait_for(lambda: api.trainjob(NS, name) is not None)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    with api.lock:
        api.objects[("trainer.kubeflow.org", "trainjobs", NS, name)]["metadata"]["labels"]["posttrain/run-id"] = "x"
    with pytest.raises(TrainJobFailed, match="belongs to another run or stage"):
        _run(_step(tmp_path, "run-8"))
    assert api.created == [name]


def test_the_workspace_pvc_is_the_one_the_steps_pod_mounts(api):
    from components.trainjob import kube_client, workspace_claim

    api.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "step-pod", "namespace": NS, "labels": {}},
             "spec": {"containers": [{"name": "main", "image": "x", "volumeMounts": [
                 {"name": "kfp-workspace", "mountPath": "/kfp-workspace"}]}],
                      "volumes": [{"name": "kfp-workspace",
                                   "persistentVolumeClaim": {"claimName": "run-9-kfp-workspace"}}]}})
    assert workspace_claim(kube_client(), NS, "/kfp-workspace", "step-pod") == "run-9-kfp-workspace"
    with pytest.raises(TrainJobFailed, match="mounts no PVC at the workspace /elsewhere"):
        workspace_claim(kube_client(), NS, "/elsewhere", "step-pod")


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
