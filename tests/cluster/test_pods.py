"""pods.py: a pod's process sees its declared volumes and the image, nothing else of this machine, runs as its
user, and gets its fsGroup as the kubelet applies it (kubernetes/kubernetes pkg/volume/volume_linux.go); and the
workspace permissions of issue item B.6: a step (uid 10001, no fsGroup from KFP) cannot create its directory in a
fresh workspace whose root is root-owned 0755, as a block-backed StorageClass makes it, unless the shipped
MutatingAdmissionPolicy (k8s/overlays/workspace-fsgroup) gave its pod fsGroup 10001.

The isolation is real (a mount namespace per pod, `unshare`), so these tests need root, as CI has; without root or
`unshare` they fail rather than skip.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from .pods import (
    IMAGE_USER,
    REPO,
    SERVICE_ACCOUNT_PATH,
    Pod,
    Runtime,
    Volume,
    admit,
    empty_dir,
    image_paths,
    set_volume_ownership,
)

UID = IMAGE_USER[1]
PYTHON = sys.executable


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    return Runtime(tmp_path / "pods")


def run(runtime: Runtime, pod: Pod, tmp_path: Path, timeout: float = 120) -> tuple[int, str]:
    log = tmp_path / f"{pod.name}.log"
    proc = runtime.start(pod, log)
    rc = proc.wait(timeout=timeout)
    return rc, log.read_text()


def probe(runtime: Runtime, tmp_path: Path, name: str, script: str, volumes=(), **kw) -> dict:
    """Run a Python script in a pod; it prints one JSON object as its last line."""
    pod = Pod(name, "posttrain", {}, [PYTHON, "-c", textwrap.dedent(script)], {}, list(volumes), **kw)
    rc, out = run(runtime, pod, tmp_path)
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


CHECK = """
import json, os, sys
def can_read(p):
    try:
        open(p).read(); return True
    except OSError:
        return False
def can_write(p):
    try:
        open(p, "w").write("x"); return "ok"
    except OSError as e:
        return e.strerror
"""


def test_a_pod_sees_its_volumes_and_nothing_else_of_this_machine(runtime, tmp_path):
    """KFP's launcher downloads a step's inputs to /s3/<bucket>/<key> on the step pod's own scratch volume: another
    pod (a TrainJob node) must not see them, under /s3 nor at their path on this machine; nor the test's files."""
    scratch = tmp_path / "step-scratch"
    (scratch / "posttrain-data" / "data").mkdir(parents=True)
    (scratch / "posttrain-data" / "data" / "train.jsonl").write_text("rows")
    (tmp_path / "test-file").write_text("the test's")
    paths = [str(scratch / "posttrain-data" / "data" / "train.jsonl"), str(tmp_path / "test-file")]

    step = probe(runtime, tmp_path, "step", CHECK + f"""
print(json.dumps({{"s3": open("/s3/posttrain-data/data/train.jsonl").read(),
                   "host": [can_read(p) for p in {paths!r}]}}))""", volumes=[Volume("/s3", scratch)],
                 run_as_user=UID, run_as_group=UID)
    assert step == {"s3": "rows", "host": [False, False]}

    node = probe(runtime, tmp_path, "node", CHECK + f"""
print(json.dumps({{"s3": os.path.exists("/s3"), "host": [can_read(p) for p in {paths!r}],
                   "tmp": os.listdir("/tmp"), "repo_parent": sorted(os.listdir({str(REPO.parent)!r})),
                   "root": sorted(os.listdir("/")), "repo": os.path.isfile({str(REPO / "pyproject.toml")!r})}}))""",
                 run_as_user=UID, run_as_group=UID)
    assert node["s3"] is False and node["host"] == [False, False]
    image = image_paths()
    assert node["repo_parent"] == [REPO.name] and node["repo"] is True
    assert node["tmp"] == sorted({Path(p).parts[2] for p in image if p.startswith("/tmp/")})
    system = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "sys", "dev", "tmp", "home",
              "opt", "cache"}
    assert set(node["root"]) <= system | {Path(p).parts[1] for p in image}
    assert os.path.exists(paths[0]) and (tmp_path / "test-file").exists()  # there on this machine all along


def test_a_read_only_volume_cannot_be_written_even_by_root(runtime, tmp_path):
    data, out = empty_dir(tmp_path / "data"), empty_dir(tmp_path / "out")
    got = probe(runtime, tmp_path, "ro", CHECK + """
print(json.dumps({"ro": can_write("/data/x"), "rw": can_write("/out/x"), "uid": os.getuid()}))""",
                volumes=[Volume("/data", data, read_only=True), Volume("/out", out)])
    assert got == {"ro": "Read-only file system", "rw": "ok", "uid": 0}
    assert not (data / "x").exists() and (out / "x").read_text() == "x"


def test_the_pod_runs_as_its_user_with_fs_group_among_its_groups(runtime, tmp_path):
    got = probe(runtime, tmp_path, "ids", """
import json, os, pwd
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
                  "user": pwd.getpwuid(os.getuid()).pw_name, "home": os.environ["HOME"],
                  "home_writable": os.access(os.environ["HOME"], os.W_OK), "env": sorted(os.environ)}))""",
                run_as_user=UID, run_as_group=UID, fs_group=4242)
    assert (got["uid"], got["gid"], got["groups"]) == (UID, UID, [4242])
    assert got["user"] == IMAGE_USER[0] and got["home"] == IMAGE_USER[3] and got["home_writable"]
    assert "PYTEST_CURRENT_TEST" not in got["env"] and "VIRTUAL_ENV" not in got["env"]  # the pod's env only


def test_fs_group_makes_a_root_owned_volume_root_writable(runtime, tmp_path):
    """A fresh volume of a block-backed class: its root is root-owned 0755. uid 10001 cannot create anything in
    it, unless the pod has fsGroup (and the volume's plugin manages ownership: not hostPath, not most NFS)."""
    mkdir = CHECK + """
try:
    os.mkdir("/vol/psft"); print(json.dumps("ok"))
except OSError as e:
    print(json.dumps(e.strerror))"""

    def fresh(name: str) -> Path:
        path = tmp_path / name
        path.mkdir(mode=0o755)
        os.chown(path, 0, 0)
        return path

    plain = fresh("plain")
    assert probe(runtime, tmp_path, "no-fsgroup", mkdir, volumes=[Volume("/vol", plain)], run_as_user=UID,
                 run_as_group=UID) == "Permission denied"
    owned = fresh("owned")
    assert probe(runtime, tmp_path, "fsgroup", mkdir, volumes=[Volume("/vol", owned)], run_as_user=UID,
                 run_as_group=UID, fs_group=UID) == "ok"
    info = os.stat(owned)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, UID, 0o2775)
    assert os.stat(owned / "psft").st_gid == UID  # setgid: what the step creates stays in the group
    unmanaged = fresh("unmanaged")
    assert probe(runtime, tmp_path, "nfs", mkdir, volumes=[Volume("/vol", unmanaged, manages_ownership=False)],
                 run_as_user=UID, run_as_group=UID, fs_group=UID) == "Permission denied"


def test_set_volume_ownership_follows_the_kubelet(tmp_path):
    """pkg/volume/volume_linux.go changeFilePermission: group fsGroup; files | 0660 (0440 read-only); directories
    also setgid | 0110; symlinks untouched. OnRootMismatch (requiresPermissionChange) skips a root already right."""
    root = tmp_path / "v"
    (root / "d").mkdir(parents=True, mode=0o700)
    (root / "d").chmod(0o700)
    (root / "f").write_text("")
    (root / "f").chmod(0o600)
    (root / "target").write_text("")
    (root / "target").chmod(0o600)
    (root / "link").symlink_to(root / "target")
    os.lchown(root / "link", 0, 0)
    set_volume_ownership(root, 777)
    modes = {n: (os.stat(root / n).st_gid, stat.S_IMODE(os.stat(root / n).st_mode)) for n in ("d", "f", "target")}
    assert modes == {"d": (777, 0o2770), "f": (777, 0o660), "target": (777, 0o660)}
    assert os.lstat(root / "link").st_gid == 0

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "f").write_text("")
    (ro / "f").chmod(0o600)
    set_volume_ownership(ro, 5, read_only=True)
    assert stat.S_IMODE(os.stat(ro / "f").st_mode) == 0o640 and stat.S_IMODE(os.stat(ro).st_mode) & 0o2550 == 0o2550

    (root / "new").write_text("")
    os.chown(root / "new", 0, 0)
    set_volume_ownership(root, 777, policy="OnRootMismatch")  # the root is right: no walk
    assert os.stat(root / "new").st_gid == 0
    set_volume_ownership(root, 778, policy="OnRootMismatch")
    assert os.stat(root / "new").st_gid == 778


def test_etc_hosts_is_the_pods(runtime, tmp_path):
    before = Path("/etc/hosts").read_text()
    got = probe(runtime, tmp_path, "hosts", """
import json, socket
print(json.dumps({"hosts": open("/etc/hosts").read(),
                  "mlflow": socket.gethostbyname("mlflow.posttrain.svc.cluster.local")}))""",
                run_as_user=UID, run_as_group=UID, hosts={"mlflow.posttrain.svc.cluster.local": "127.0.0.7"})
    assert got["mlflow"] == "127.0.0.7"
    assert got["hosts"].startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")
    assert got["hosts"].endswith("127.0.0.7\tmlflow.posttrain.svc.cluster.local\n")
    assert Path("/etc/hosts").read_text() == before


def test_the_service_account_token_is_mounted_only_with_a_service_account(tmp_path):
    tokens = tmp_path / "sa"
    tokens.mkdir()
    for name, value in (("token", "t0ken"), ("namespace", "posttrain"), ("ca.crt", "CA")):
        (tokens / name).write_text(value)
    runtime = Runtime(tmp_path / "pods", tokens=lambda pod: tokens)
    script = f"""
import json, os
p = {SERVICE_ACCOUNT_PATH + "/token"!r}
print(json.dumps(open(p).read() if os.path.exists(p) else None))"""
    assert probe(runtime, tmp_path, "with-sa", script, service_account="runner", run_as_user=UID) == "t0ken"
    assert probe(runtime, tmp_path, "without-sa", script, run_as_user=UID) is None


def test_a_mount_path_inside_the_image_is_refused_not_created_on_this_machine(runtime, tmp_path):
    vol = empty_dir(tmp_path / "vol")
    rc, out = run(runtime, Pod("bad", "posttrain", {}, ["true"], {}, [Volume("/usr/posttrain-vol", vol)]), tmp_path)
    assert rc != 0 and "inside the image" in out
    assert not Path("/usr/posttrain-vol").exists()


def test_torch_extensions_built_here_are_copied_into_the_pods_cache(runtime, tmp_path, monkeypatch):
    """A pod's /cache is its own; what this machine already built (DeepSpeed's CPU comm op) is copied in, without
    another process's build lock, writable by the pod's user (torch takes a lock file beside the build)."""
    built = tmp_path / "extensions"
    (built / "op").mkdir(parents=True)
    (built / "op" / "op.so").write_text("built")
    (built / "op" / "lock").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built))
    got = probe(runtime, tmp_path, "ext", """
import json, os
d = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "op")
print(json.dumps({"dir": d, "files": sorted(os.listdir(d)), "writable": os.access(d, os.W_OK)}))""",
                run_as_user=UID, run_as_group=UID)
    assert got == {"dir": "/cache/torch_extensions/op", "files": ["op.so"], "writable": True}


def test_a_pod_whose_cache_is_a_volume_builds_there_behind_this_machines_build_cache(runtime, tmp_path, monkeypatch):
    """A pod whose /cache is an emptyDir (the TrainingRuntime's) finds it empty and builds its torch extensions there
    itself; ninja, behind this machine's build cache, gets the outputs of a build file this machine built from
    (and does no work), and builds what this machine never built."""
    import shutil
    import subprocess

    built = tmp_path / "extensions"
    for name, command in (("op", "echo built-here > $out"), ("other", "echo other-here > $out")):
        (built / name).mkdir(parents=True)
        (built / name / "build.ninja").write_text(f"rule make\n  command = {command}\nbuild op.so: make\n")
        subprocess.run([shutil.which("ninja")], cwd=built / name, check=True, capture_output=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built))
    cache = empty_dir(tmp_path / "cache")
    got = probe(runtime, tmp_path, "ext", """
import json, os, subprocess
root = os.environ["TORCH_EXTENSIONS_DIR"]
empty = os.listdir(root) if os.path.isdir(root) else []
out = {}
for name, command in (("op", "echo built-here > $out"), ("other", "echo built-in-the-pod > $out")):
    d = os.path.join(root, name)
    os.makedirs(d)
    open(os.path.join(d, "build.ninja"), "w").write(f"rule make\\n  command = {command}\\nbuild op.so: make\\n")
    ran = subprocess.run(["ninja"], cwd=d, capture_output=True, text=True, check=True).stdout
    out[name] = [open(os.path.join(d, "op.so")).read().strip(), "no work to do" in ran]
print(json.dumps({"empty": empty, **out}))""", volumes=[Volume("/cache", cache)], run_as_user=UID, run_as_group=UID)
    assert got == {"empty": [], "op": ["built-here", True], "other": ["built-in-the-pod", False]}
    assert (cache / "torch_extensions" / "other" / "op.so").read_text() == "built-in-the-pod\n"  # in the volume


def test_the_image_imports_torch_and_the_project_as_uid_10001(runtime, tmp_path):
    pod = Pod("import", "posttrain", {}, [PYTHON, "-c", "import torch, transformers, components; print('ok')"],
              {"OMP_NUM_THREADS": "1"}, [], run_as_user=UID, run_as_group=UID)
    rc, out = run(runtime, pod, tmp_path)
    assert rc == 0 and out.strip().endswith("ok"), out


# --- B.6: workspace permissions ---------------------------------------------------------------------------------

STAGE = "psft"
FSGROUP_POLICY = REPO / "k8s" / "overlays" / "workspace-fsgroup"


@pytest.fixture(scope="module")
def psft_step(tmp_path_factory) -> dict:
    """The psft step's pod settings in the compiled `cluster` spec (kfp-kubernetes platform config)."""
    from pipelines.posttrain import compile_spec

    out = compile_spec("cluster", tmp_path_factory.mktemp("cluster") / "pipeline.yaml")
    _, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (config,) = [c for c in executors.values() if c["podMetadata"]["labels"].get("posttrain/stage") == STAGE]
    return config


def _fsgroup_policy() -> list[dict]:
    sys.path.insert(0, str(REPO / "k8s"))
    try:
        import validate
    finally:
        sys.path.remove(str(REPO / "k8s"))
    objects = validate.render(FSGROUP_POLICY)
    assert validate.schema_errors(objects) == []
    return objects


def _step_pod(config: dict, workspace: Path) -> Pod:
    """The step's pod as KFP creates it: its labels and security context from the platform config (runAsUser and
    runAsGroup, no fsGroup: kfp-kubernetes set_security_context has no such field), the workspace PVC at
    /kfp-workspace (kfp.dsl.constants.WORKSPACE_MOUNT_PATH); the step's first act is to create <workspace>/<stage>
    (components/step.py, output_dir)."""
    from kfp.dsl.constants import WORKSPACE_MOUNT_PATH

    security = config["securityContext"]
    assert "fsGroup" not in security
    script = f"from pathlib import Path; Path({WORKSPACE_MOUNT_PATH!r}, {STAGE!r}).mkdir(parents=True, exist_ok=True)"
    return Pod(f"{STAGE}-step", "posttrain", dict(config["podMetadata"]["labels"]), [PYTHON, "-c", script], {},
               [Volume(WORKSPACE_MOUNT_PATH, workspace)], run_as_user=int(security["runAsUser"]),
               run_as_group=int(security["runAsGroup"]))


def _fresh_block_volume(path: Path) -> Path:
    """A new filesystem's root, as a block-backed class provisions it: root-owned 0755."""
    path.mkdir(mode=0o755)
    os.chown(path, 0, 0)
    return path


def test_b6_a_step_cannot_create_its_directory_in_a_fresh_root_owned_workspace(runtime, tmp_path, psft_step):
    workspace = _fresh_block_volume(tmp_path / "workspace")
    rc, out = run(runtime, _step_pod(psft_step, workspace), tmp_path)
    assert rc != 0 and "PermissionError" in out and "/kfp-workspace/psft" in out
    assert not (workspace / STAGE).exists()


@pytest.mark.parametrize("namespace", ["posttrain", "kubeflow"])  # plain or profile namespace; standalone KFP
def test_b6_the_shipped_policy_gives_the_step_fs_group_and_its_directory(runtime, tmp_path, psft_step, namespace):
    """The admission policy as rendered from k8s/overlays/workspace-fsgroup, applied to the step's pod as the API
    server would (pods.admit refuses any part of it it cannot apply), then the kubelet's fsGroup on the workspace."""
    workspace = _fresh_block_volume(tmp_path / "workspace")
    pod = _step_pod(psft_step, workspace)
    pod.namespace = namespace
    admitted = admit(pod, _fsgroup_policy(), {"kubernetes.io/metadata.name": namespace})
    assert (admitted.fs_group, admitted.fs_group_change_policy) == (UID, "OnRootMismatch")
    rc, out = run(runtime, admitted, tmp_path)
    assert rc == 0, out
    assert (workspace / STAGE).is_dir() and os.stat(workspace / STAGE).st_uid == UID


def test_b6_the_policy_leaves_other_pods_and_an_explicit_fs_group_alone(psft_step, tmp_path):
    objects = _fsgroup_policy()
    pod = _step_pod(psft_step, tmp_path)
    other = copy.deepcopy(pod)
    other.labels = {k: v for k, v in pod.labels.items() if k != "posttrain/spec"}
    assert admit(other, objects, {}).fs_group is None
    own = copy.deepcopy(pod)
    own.fs_group = 2000
    assert admit(own, objects, {}).fs_group == 2000


@pytest.mark.parametrize("change, refused", [
    (lambda p, b: p["spec"]["mutations"][0].update(patchType="JSONPatch"), "patchType"),
    (lambda p, b: p["spec"]["matchConditions"][0].update(expression="object.metadata.name != ''"), "matchCondition"),
    (lambda p, b: p["spec"].update(variables=[{"name": "x", "expression": "1"}]), "variables"),
    (lambda p, b: p["spec"]["mutations"][0]["applyConfiguration"].update(
        expression="Object{spec: Object.spec{securityContext: Object.spec.securityContext{fsGroup: 1 + 1}}}"), "+"),
    (lambda p, b: p["spec"]["mutations"][0]["applyConfiguration"].update(
        expression="Object{spec: Object.spec{nodeName: \"n\"}}"), "nodeName"),
    (lambda p, b: b["spec"]["matchResources"].update(excludeResourceRules=[]), "excludeResourceRules"),
], ids=["json-patch", "unknown-condition", "variables", "cel-arithmetic", "field-outside-security-context",
        "exclude-rules"])
def test_b6_admission_refuses_a_policy_it_cannot_apply_faithfully(psft_step, tmp_path, change, refused):
    objects = copy.deepcopy(_fsgroup_policy())
    policy, binding = (next(o for o in objects if o["kind"] == k)
                       for k in ("MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"))
    change(policy, binding)
    with pytest.raises(ValueError, match=refused if refused != "+" else r"\+"):
        admit(_step_pod(psft_step, tmp_path), objects, {})
