"""Checking a spec imports no torch and no transformers: `python -m pipelines.spec check` builds every stage's
config from its light config.py (components/<stage>/config.py), so a spec is checked in a second on a laptop or in
CI without the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "pipelines" / "specs").glob("*.yaml"))
HEAVY = ("torch", "transformers")

# `python -m pipelines.spec check SPEC`, then the heavy modules it left imported, as the last line of stdout
CHECK = f"""
import json, runpy, sys
sys.argv = ["pipelines.spec", "check", sys.argv[1]]
try:
    runpy.run_module("pipelines.spec", run_name="__main__", alter_sys=True)
    status = 0
except SystemExit as e:
    status = e.code
print(json.dumps({{"status": status, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


def check_imports(spec: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECK, str(spec)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_there_are_bundled_specs():
    assert len(SPECS) >= 5, SPECS


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_checking_a_bundled_spec_imports_no_torch(spec):
    result = check_imports(spec)
    assert result["status"] in (0, None), f"{spec.name}: the check failed: {result}"
    assert result["heavy"] == [], f"{spec.name}: checking it imported {result['heavy']}"


def test_the_probe_sees_a_heavy_import(tmp_path):
    """The probe itself: torch imported in the checking process (here before the check) is reported."""
    probe = subprocess.run([sys.executable, "-c", CHECK.replace('sys.argv = ["pipelines.spec"', 'import torch\n'
                                                                 'sys.argv = ["pipelines.spec"'), str(SPECS[0])],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "torch" in json.loads(probe.stdout.strip().splitlines()[-1])["heavy"]


def test_the_data_prep_step_imports_no_torch():
    """data_prep renders and counts text (components/templates.py renders the chat templates without torch): its
    module imports no torch, which each DAG run's data_prep step would otherwise pay for in seconds."""
    done = subprocess.run([sys.executable, "-c", "import sys, components.data_prep.main; "
                           "print(sorted(m for m in ('torch',) if m in sys.modules))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
