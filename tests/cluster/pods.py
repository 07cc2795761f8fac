"""A pod's process: only what the pod would see, as the user it would run as.

Each pod runs in its own mount namespace (`unshare --mount --propagation private`; the tests run as root) whose
root is a fresh tmpfs. Into it go, read-only, what the image holds here (the repository, its virtual environment,
the Python that environment points to, /usr and /etc), the kernel's /proc, /sys and /dev, a fresh /tmp, a home
and /cache of the pod's own (the images' Dockerfiles declare both writable for uid 10001), the pod's /etc/hosts,
and the volumes the pod declares, each at its mount path. Then the process moves that root over / (as
`switch_root` does), drops to the pod's user and groups and execs the command with the pod's environment. A path
on this machine that no volume declares (another pod's scratch directory, a test's tmp_path, /work) is not there.
Torch extensions this machine already built are copied into the pod's /cache (as an image shipping them prebuilt
would hold them), so that no pod spends minutes compiling DeepSpeed's CPU comm op. Where /cache is a volume (an
emptyDir) it starts empty and the pod builds them itself, with ninja behind this machine's build cache (as a build
cache on a CI node): the outputs of the same build file, which ninja judges up to date or rebuilds.

The kubelet's rules emulated, each from kubernetes/kubernetes:
- fsGroup: pkg/volume/volume_linux.go SetVolumeOwnership: every file of a volume whose plugin manages ownership
  gets group fsGroup and the group bits rw (r only for a read-only volume); every directory also setgid and
  group x; symlinks are skipped. fsGroupChangePolicy OnRootMismatch skips the walk when the root already has
  group fsGroup, those bits and setgid.
- fsGroup joins the container's supplemental groups (pkg/kubelet/kuberuntime/security_context.go
  determineEffectiveSecurityContext).
- emptyDir: pkg/volume/emptydir/empty_dir.go creates the directory 0777 (`const perm os.FileMode = 0777`).
- /etc/hosts: pkg/kubelet/kubelet_pods.go managedHostsFileContent (localhost lines, then the pod's entries).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
TOOLS = "/opt/pod-tools"  # first on the pod's PATH where this machine builds torch extensions with another ninja
IMAGE_USER = ("posttrain", 10001, 10001, "/home/posttrain")
"""The images' user (images/*/Dockerfile: useradd --uid 10001 --gid 10001 --home-dir /home/posttrain)."""
IMAGE_ENV = {
    # images/trainer/Dockerfile ENV (the runtime image sets a subset of the same)
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": IMAGE_USER[3],
    "XDG_CACHE_HOME": "/cache",
    "HF_HOME": "/cache/huggingface",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TORCH_EXTENSIONS_DIR": "/cache/torch_extensions",
    "TRITON_CACHE_DIR": "/cache/triton",
    "MPLCONFIGDIR": "/cache/matplotlib",
    "DS_BUILD_OPS": "0",
}
BUILD_CACHE = f"""#!/bin/sh
# ninja, behind this machine's build cache: torch runs it in the extension's build directory; a first build whose
# build file is the one this machine built from gets that build's outputs and log, which ninja then checks
cached="{TOOLS}/built/${{PWD##*/}}"
if [ ! -e .ninja_log ] && [ -f "$cached/build.ninja" ] && cmp -s build.ninja "$cached/build.ninja"; then
    cp -R --preserve=timestamps "$cached/." .
fi
exec {TOOLS}/ninja-real "$@"
"""
"""`ninja` first on the PATH of a pod whose torch extensions directory is a volume (module docstring)."""
HOSTS_HEADER = ("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                "fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n")

# mount(2) flags
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 1, 2, 4, 32, 4096, 8192, 16384


@dataclass
class Volume:
    mount_path: str            # where the container sees it
    host_dir: Path             # what backs it on this machine (a PVC's directory, an emptyDir, a scratch dir)
    read_only: bool = False
    manages_ownership: bool = True
    """Whether the kubelet applies the pod's fsGroup to it: emptyDir, configMap/secret/projected and a PVC on a
    block-backed class (a filesystem the node formats) do; hostPath and most NFS-backed classes do not."""


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    command: list[str]
    env: dict[str, str]
    volumes: list[Volume]
    service_account: str | None = None       # None: no token mounted (automountServiceAccountToken: false)
    run_as_user: int | None = None           # None: root
    run_as_group: int | None = None
    fs_group: int | None = None              # applied to volumes that support ownership management, as the kubelet does
    hosts: dict[str, str] = field(default_factory=dict)   # /etc/hosts of the pod: name → loopback address
    workdir: str = "/"
    fs_group_change_policy: str = "Always"   # or "OnRootMismatch" (PodSecurityContext.fsGroupChangePolicy)


def empty_dir(path: Path) -> Path:
    """A fresh emptyDir's directory as the kubelet makes it: world-writable (pkg/volume/emptydir/empty_dir.go)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def set_volume_ownership(root: Path, fs_group: int, read_only: bool = False, policy: str = "Always") -> None:
    """kubernetes/kubernetes pkg/volume/volume_linux.go SetVolumeOwnership (walkDeep + changeFilePermission)."""
    mask = 0o440 if read_only else 0o660
    if policy == "OnRootMismatch":
        info = os.stat(root)
        wanted = mask | 0o110
        if info.st_gid == fs_group and stat.S_ISDIR(info.st_mode) and (info.st_mode & wanted) == wanted \
                and info.st_mode & stat.S_ISGID:
            return

    def change(path: str) -> None:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            return
        os.chown(path, info.st_uid, fs_group)
        bits = mask | (stat.S_ISGID | 0o110 if stat.S_ISDIR(info.st_mode) else 0)
        os.chmod(path, stat.S_IMODE(info.st_mode) | bits)

    for top, dirs, files in os.walk(root, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            change(os.path.join(top, name))
        for name in dirs:
            if not os.path.islink(os.path.join(top, name)):
                change(os.path.join(top, name))
    change(str(root))


def image_paths() -> list[str]:
    """What the image holds here, bound read-only into every pod: the repository, the virtual environment the
    tests run in, the Python installation it points to, and the system's /usr and /etc."""
    paths = sorted({str(REPO), sys.prefix, sys.base_prefix, "/usr", "/etc"}, key=lambda p: (p.count("/"), p))
    return [p for i, p in enumerate(paths) if not any(p.startswith(q.rstrip("/") + "/") for q in paths[:i])]


class Runtime:
    """Starts pods as isolated processes. `root`: where the pods' files on this machine go (their hosts and
    passwd files, the empty directory their root is mounted on); `tokens`: for a pod with a service account and
    no volume at SERVICE_ACCOUNT_PATH, the directory of its token, ca.crt and namespace (kube.py's API provides
    it), mounted read-only there as the kubelet mounts the projected token."""

    def __init__(self, root: Path | None = None, tokens=None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="pods-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens = tokens
        self.started: list[subprocess.Popen] = []

    def stop_all(self) -> None:
        """Kill every pod this runtime started that still runs (a test's cleanup: no pod outlives its cluster)."""
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)

    def start(self, pod: Pod, log: Path) -> subprocess.Popen:
        """The pod's process, isolated; its own session (os.killpg(proc.pid, sig) signals the pod's processes).
        Raises FileNotFoundError where `unshare` is missing: the isolation is never skipped."""
        unshare = shutil.which("unshare") or "unshare"
        state = Path(tempfile.mkdtemp(prefix=f"{pod.namespace}.{pod.name}.", dir=self.root))
        volumes = list(pod.volumes)
        if pod.service_account and self.tokens is not None \
                and not any(v.mount_path.rstrip("/") == SERVICE_ACCOUNT_PATH for v in volumes):
            volumes.append(Volume(SERVICE_ACCOUNT_PATH, Path(self.tokens(pod)), read_only=True))
        for v in volumes:
            if not Path(v.host_dir).exists():
                raise FileNotFoundError(f"pod {pod.name}: volume {v.mount_path}: {v.host_dir} does not exist")
            if pod.fs_group is not None and v.manages_ownership:
                set_volume_ownership(Path(v.host_dir), pod.fs_group, v.read_only, pod.fs_group_change_policy)
        uid = pod.run_as_user if pod.run_as_user is not None else 0
        gid = pod.run_as_group if pod.run_as_group is not None else (IMAGE_USER[2] if uid == IMAGE_USER[1] else 0)
        groups = sorted({g for g in (pod.fs_group,) if g is not None} - {gid})
        (state / "hosts").write_text(HOSTS_HEADER + "".join(f"{a}\t{n}\n" for n, a in sorted(pod.hosts.items())))
        (state / "passwd").write_text(_with_image_user(Path("/etc/passwd").read_text(), "passwd"))
        (state / "group").write_text(_with_image_user(Path("/etc/group").read_text(), "group"))
        rootfs = state / "rootfs"
        rootfs.mkdir()
        env = {"PATH": f"{sys.prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "PYTHONPATH": str(REPO), "HOSTNAME": pod.name, **IMAGE_ENV, **pod.env}
        # Torch extensions this machine already built (DeepSpeed's CPU comm op: ~80 s on 2 cores) are copied into
        # the pod's /cache, as an image that ships them prebuilt would hold them: a copy, since torch takes a lock
        # file beside them, and only where /cache is the image's own, not a volume. Where it is a volume (the
        # TrainingRuntime's emptyDir) it stays empty and the pod builds them there itself, with this machine's build
        # cache in front of ninja (BUILD_CACHE): ninja then finds the outputs of the same build file and judges
        # them as it would its own, rebuilding whatever it finds out of date.
        built = os.environ.get("TORCH_EXTENSIONS_DIR")
        if not built:  # torch.utils.cpp_extension._get_build_directory: <cache>/torch_extensions/py311_cpu
            default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                   "torch_extensions")
            found = sorted(glob.glob(os.path.join(default, f"py{sys.version_info[0]}{sys.version_info[1]}_*")))
            built = found[0] if found else ""
        extensions = None
        if os.path.isdir(built) and env.get("TORCH_EXTENSIONS_DIR", "").startswith("/cache/") \
                and not any(("/" + v.mount_path.strip("/") + "/").startswith("/cache/") for v in volumes):
            extensions = [built, env["TORCH_EXTENSIONS_DIR"]]
            # and they are rebuilt with the ninja that built them: another ninja's log format forces a full rebuild
            ninja = shutil.which("ninja")
            if ninja and ninja != shutil.which("ninja", path=env["PATH"]):
                (state / "tools").mkdir()
                (state / "tools" / "ninja").symlink_to(ninja)
                env["PATH"] = f"{TOOLS}:{env['PATH']}"
                extensions.append(str(state / "tools"))
        elif os.path.isdir(built) and shutil.which("ninja"):
            tools = state / "tools"
            shutil.copytree(built, tools / "built", symlinks=True, ignore=shutil.ignore_patterns("lock"))
            (tools / "ninja-real").symlink_to(shutil.which("ninja"))
            (tools / "ninja").write_text(BUILD_CACHE)
            (tools / "ninja").chmod(0o755)
            env["PATH"] = f"{TOOLS}:{env['PATH']}"
            extensions = [None, None, str(tools)]
        config = {
            "rootfs": str(rootfs), "image": image_paths(), "uid": uid, "gid": gid, "groups": groups,
            "home": env["HOME"], "files": {"/etc/hosts": str(state / "hosts"), "/etc/passwd": str(state / "passwd"),
                                           "/etc/group": str(state / "group")},
            "volumes": [{**asdict(v), "host_dir": str(v.host_dir)} for v in volumes],
            "workdir": pod.workdir, "command": list(pod.command), "env": env, "extensions": extensions,
        }
        (state / "pod.json").write_text(json.dumps(config))
        with open(log, "ab") as out:
            proc = subprocess.Popen([unshare, "--mount", "--propagation", "private", sys.executable, "-I", "-S",
                                     str(Path(__file__).resolve()), str(state / "pod.json")],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, start_new_session=True)
        self.started.append(proc)
        return proc


def _with_image_user(text: str, kind: str) -> str:
    """/etc/passwd or /etc/group with the images' user and group (useradd in images/*/Dockerfile)."""
    name, uid, gid, home = IMAGE_USER
    ids = {line.split(":")[2] for line in text.splitlines() if line.count(":") >= 3}
    if kind == "passwd" and str(uid) not in ids:
        text += f"{name}:x:{uid}:{gid}::{home}:/usr/sbin/nologin\n"
    if kind == "group" and str(gid) not in ids:
        text += f"{name}:x:{gid}:\n"
    return text


# --- mutating admission: the pod spec the API server stores ------------------------------------------------------

MAP_VERSION = "admissionregistration.k8s.io/v1"
CONDITIONS = {
    # matchConditions this emulator can evaluate (CEL, kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/
    # admission/plugin/policy/mutating): the exact expression → its value for a Pod
    "!has(object.spec.securityContext) || !has(object.spec.securityContext.fsGroup)": lambda pod: pod.fs_group is None,
}
SECURITY_CONTEXT = {"fsGroup": "fs_group", "fsGroupChangePolicy": "fs_group_change_policy", "runAsUser": "run_as_user",
                    "runAsGroup": "run_as_group"}


def _only(what: str, mapping: dict, allowed: set[str]) -> dict:
    extra = set(mapping or {}) - allowed
    if extra:
        raise ValueError(f"{what}: {sorted(extra)} not emulated (only {sorted(allowed)})")
    return mapping or {}


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (k8s.io/apimachinery/pkg/apis/meta/v1/helpers.go LabelSelectorAsSelector); an absent
    or empty selector selects everything."""
    selector = _only("label selector", selector or {}, {"matchLabels", "matchExpressions"})
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}
        if op not in ok:
            raise ValueError(f"label selector operator {op!r}")
        if not ok[op]:
            return False
    return True


def _rule_matches_pod_create(rule: dict) -> bool:
    rule = _only("resourceRule", rule, {"apiGroups", "apiVersions", "operations", "resources", "scope"})
    return (set(rule.get("apiGroups") or []) & {"", "*"} and set(rule.get("apiVersions") or []) & {"v1", "*"}
            and set(rule.get("operations") or []) & {"CREATE", "*"} and set(rule.get("resources") or []) & {"pods", "*"}
            and rule.get("scope", "*") in ("*", "Namespaced"))


def _match_resources(what: str, match: dict | None, pod: Pod, namespace_labels: dict[str, str]) -> bool:
    match = _only(what, match, {"resourceRules", "namespaceSelector", "objectSelector", "matchPolicy"})
    if "resourceRules" in match and not any(_rule_matches_pod_create(r) for r in match["resourceRules"]):
        return False
    return (selects(match.get("namespaceSelector"), namespace_labels)
            and selects(match.get("objectSelector"), pod.labels))


def parse_apply_configuration(expression: str) -> dict:
    """The CEL object initializer of an ApplyConfiguration mutation, e.g. `Object{spec: Object.spec{...}}`, as a
    dict. Only literals (integers, strings, booleans) and nested initializers whose type is the field's path
    (Object.spec.securityContext for spec.securityContext) are understood; anything else is refused."""
    import re

    tokens = re.findall(r'\s*("(?:[^"\\]|\\.)*"|-?\d+|[A-Za-z_][A-Za-z0-9_.]*|[{}:,]|\S)', expression)
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"apply configuration {expression!r}: ends early")
        token = tokens[pos]
        if expected is not None and token != expected:
            raise ValueError(f"apply configuration {expression!r}: {token!r} where {expected!r} was expected")
        pos += 1
        return token

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def value(path: str):
        token = take()
        if token == path:
            take("{")
            out = {}
            while peek() != "}":
                name = take()
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in out:
                    raise ValueError(f"apply configuration {expression!r}: field {name!r}")
                take(":")
                out[name] = value(f"{path}.{name}")
                if peek() == ",":
                    take(",")
            take("}")
            return out
        if token.startswith('"'):
            return json.loads(token)
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        raise ValueError(f"apply configuration {expression!r}: {token!r} is no literal nor a {path} initializer")

    out = value("Object")
    if pos != len(tokens):
        raise ValueError(f"apply configuration {expression!r}: trailing {tokens[pos:]}")
    return out


def admit(pod: Pod, objects: list[dict], namespace_labels: dict[str, str]) -> Pod:
    """The pod as the API server stores it after the MutatingAdmissionPolicies among `objects` (and their
    bindings) mutated its creation (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/admission/plugin/policy/
    mutating: a binding's matchResources, then the policy's matchConstraints and matchConditions, then each
    ApplyConfiguration merged into the object). Only what this emulator can apply faithfully is accepted: a
    policy or binding with anything else (params, variables, JSONPatch, an unknown CEL condition, a field outside
    the pod's securityContext) raises ValueError rather than being half applied."""
    import copy

    policies = {o["metadata"]["name"]: o for o in objects
                if o.get("kind") == "MutatingAdmissionPolicy" and o.get("apiVersion") == MAP_VERSION}
    out = copy.deepcopy(pod)
    for binding in objects:
        if binding.get("kind") != "MutatingAdmissionPolicyBinding" or binding.get("apiVersion") != MAP_VERSION:
            continue
        spec = _only(f"binding {binding['metadata']['name']}", binding["spec"], {"policyName", "matchResources"})
        policy = policies.get(spec["policyName"])
        if policy is None:  # a binding to no policy is ignored
            continue
        where = f"MutatingAdmissionPolicy {spec['policyName']}"
        p = _only(where, policy["spec"], {"matchConstraints", "matchConditions", "mutations", "failurePolicy",
                                          "reinvocationPolicy"})
        if p.get("failurePolicy", "Fail") not in ("Fail", "Ignore") or p.get("reinvocationPolicy", "Never") not in (
                "Never", "IfNeeded"):
            raise ValueError(f"{where}: failurePolicy/reinvocationPolicy")
        if "resourceRules" not in (p.get("matchConstraints") or {}):
            raise ValueError(f"{where}: matchConstraints.resourceRules is required")
        # the whole policy is understood before it is matched: no part of it is left unchecked for any pod
        conditions = [" ".join(c["expression"].split()) for c in p.get("matchConditions") or []]
        for expression in conditions:
            if expression not in CONDITIONS:
                raise ValueError(f"{where}: matchCondition {expression!r} not emulated")
        settings = {}
        for mutation in p["mutations"]:
            if mutation.get("patchType") != "ApplyConfiguration":
                raise ValueError(f"{where}: patchType {mutation.get('patchType')!r} not emulated")
            applied = parse_apply_configuration(mutation["applyConfiguration"]["expression"])
            spec_part = _only(f"{where}: apply configuration", applied, {"spec"})["spec"]
            context = _only(f"{where}: apply configuration spec", spec_part, {"securityContext"})["securityContext"]
            settings.update(_only(f"{where}: securityContext", context, set(SECURITY_CONTEXT)))
        matched = _match_resources(f"{where} binding", spec.get("matchResources"), out, namespace_labels)
        matched = _match_resources(f"{where} matchConstraints", p["matchConstraints"], out, namespace_labels) \
            and matched
        if matched and all(CONDITIONS[e](out) for e in conditions):
            for field_name, value in settings.items():  # merged as server-side apply merges scalars: set
                setattr(out, SECURITY_CONTEXT[field_name], value)
    return out


# --- inside the pod's mount namespace (run as a script by Runtime.start) ---------------------------------------

def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = [x.encode() if x is not None else None for x in (source, target, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def _bind(source: str, target: str, read_only: bool, recursive: bool = True) -> None:
    _mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _mount_point(rootfs: str, path: str, image: list[str], is_dir: bool) -> str:
    """The mount point of `path` inside the new root, created in its tmpfs; never inside a directory bound from
    this machine (that would create it on this machine)."""
    target = rootfs + path
    if os.path.lexists(target):
        return target
    inside = [p for p in image if path == p or path.startswith(p.rstrip("/") + "/")]
    if inside:
        raise ValueError(f"mount path {path} would be created inside the image's {inside[-1]}")
    os.makedirs(target if is_dir else os.path.dirname(target), mode=0o755, exist_ok=True)
    if not is_dir:
        open(target, "w").close()
    return target


def _enter(config: dict) -> None:
    """Build the pod's root, move it over /, drop to the pod's user and exec its command."""
    rootfs, image = config["rootfs"], config["image"]
    uid, gid = config["uid"], config["gid"]
    _mount("tmpfs", rootfs, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    # the pod's own writable directories first: the image may live below one of them on this machine (/tmp/...)
    for path, mode, owned in (("/tmp", "1777", False), (config["home"], "0755", True), ("/cache", "0755", True)):
        target = _mount_point(rootfs, path, image, True)
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")
        if owned:
            os.chown(target, uid, gid)
    if config["extensions"]:
        built, path, *tools = config["extensions"]
        if built:
            shutil.copytree(built, rootfs + path, symlinks=True, ignore=shutil.ignore_patterns("lock"))
            for top, dirs, files in os.walk(rootfs + "/cache"):
                for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
                    os.lchown(name, uid, gid)
        for source in tools:
            _bind(source, _mount_point(rootfs, TOOLS, image, True), read_only=True)
    for path in image:  # parents first; their intermediate directories are the tmpfs's, 0755
        _bind(path, _mount_point(rootfs, path, [], True), read_only=True)
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr links, or the directories
        if os.path.islink(f"/{link}"):
            os.symlink(os.readlink(f"/{link}"), f"{rootfs}/{link}")
        elif os.path.isdir(f"/{link}"):
            _bind(f"/{link}", _mount_point(rootfs, f"/{link}", [], True), read_only=True)
    for path, ro in (("/proc", False), ("/sys", True), ("/dev", False)):
        _bind(path, _mount_point(rootfs, path, [], True), read_only=ro)
    _mount("tmpfs", rootfs + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")  # not this machine's
    for volume in sorted(config["volumes"], key=lambda v: v["mount_path"].rstrip("/").count("/")):
        source, path = volume["host_dir"], "/" + volume["mount_path"].strip("/")
        target = _mount_point(rootfs, path, image, os.path.isdir(source))
        _bind(source, target, read_only=volume["read_only"], recursive=False)
    for path, source in config["files"].items():
        _bind(source, _mount_point(rootfs, path, [], False), read_only=True, recursive=False)
    os.chdir(rootfs)
    _mount(rootfs, "/", None, MS_MOVE)
    os.chroot(".")
    os.setgroups(config["groups"])
    os.setgid(gid)
    os.setuid(uid)
    os.chdir(config["workdir"])
    os.umask(0o022)
    os.execvpe(config["command"][0], config["command"], config["env"])


if __name__ == "__main__":
    _enter(json.loads(Path(sys.argv[1]).read_text()))
