"""components/imports.py: a process that imports `components` first (every stage process, step, rank and pod)
imports transformers' generation package without scikit-learn, and assisted generation's use of it still works.
Each case runs in a fresh interpreter: the pytest worker has imported transformers already."""

from __future__ import annotations

import subprocess
import sys

from tests.torchrun import REPO

CHECK = """
import sys
{first}
from transformers import Qwen2ForCausalLM  # the model classes' import chain, as a stage loads a model
cg = sys.modules["transformers.generation.candidate_generator"]
print("imported", "sklearn" in sys.modules)
print("available", cg.is_sklearn_available())
print("roc", [round(float(x), 3) for x in cg.roc_curve([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3])[1]])
from sklearn.metrics import roc_curve
print("same", [round(float(x), 3) for x in roc_curve([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3])[1]])
"""


def _run(first: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", CHECK.format(first=first)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


def test_transformers_generation_imports_without_sklearn_and_roc_curve_imports_it_on_its_first_call():
    deferred = _run("import components")
    assert deferred["imported"] == "False"  # what a stage process saves (docs/bench.md, "The test suite")
    assert deferred["available"] == "True"  # assisted generation's confidence threshold still turns on
    assert deferred["roc"] == deferred["same"]  # and computes what scikit-learn's roc_curve computes
    plain = _run("")  # without components: transformers imports scikit-learn, as it does for anyone else
    assert plain["imported"] == "True"
    assert plain["roc"] == deferred["roc"]


def test_a_process_that_imported_sklearn_first_is_left_as_it_is():
    out = _run("import sklearn.metrics, components")
    assert out["imported"] == "True" and out["available"] == "True" and out["roc"] == out["same"]
