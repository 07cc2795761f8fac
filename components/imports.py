"""An import a stage process need not pay for at its start.

transformers' generation package, which every model class imports, imports scikit-learn's `roc_curve` whenever
scikit-learn is installed, for one feature: assisted generation's adaptive confidence threshold
(`AssistedCandidateGenerator.update_candidate_strategy`), which no stage uses. scikit-learn is installed (MLflow
requires it), and importing it took about 1.1 s of each stage process's start on two cores (docs/bench.md, "The
test suite").

`defer_sklearn` (run by `import components`) makes that one import lazy: while
transformers.generation.candidate_generator is executed, scikit-learn looks absent to it, and the module's
`roc_curve` is then a function that imports scikit-learn's on its first call. The feature works as before, and
nothing changes in a process that imported scikit-learn first. The one window: while that module executes, an
import of scikit-learn from another thread would fail (stage processes import transformers' model classes on
their main thread, before they start any).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

DEFERRING = "transformers.generation.candidate_generator"
"""The module whose import of scikit-learn is deferred."""


def roc_curve(*args, **kwargs):
    """scikit-learn's `sklearn.metrics.roc_curve`, imported on the first call."""
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    return sklearn_roc_curve(*args, **kwargs)


def _forget_availability() -> None:
    """Clear transformers' cached answer of `is_sklearn_available()`."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    cache_clear = getattr(getattr(import_utils, "is_sklearn_available", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


class _DeferSklearn(importlib.abc.MetaPathFinder):
    """Finds DEFERRING once, through the other finders, and executes it with scikit-learn hidden."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != DEFERRING or self.done:
            return None
        self.done = True  # the module is imported once per process (a reload goes through the other finders)
        if "sklearn" in sys.modules:  # already paid for
            return None
        spec = importlib.util.find_spec(name)  # the other finders' (this one is done)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader

        def exec_module(module):
            if module.__name__ != DEFERRING:  # a loader shared with other modules (a zip): theirs as they are
                return type(loader).exec_module(loader, module)
            del loader.exec_module  # the loader's own again, whatever happens
            sys.modules["sklearn"] = None  # importlib.util.find_spec("sklearn") is None, so is_sklearn_available()
            _forget_availability()         # is False while the module runs
            try:
                loader.exec_module(module)
            finally:
                if "sklearn" in sys.modules and sys.modules["sklearn"] is None:
                    del sys.modules["sklearn"]
                _forget_availability()  # and True again afterwards, where the feature asks for it
            if not hasattr(module, "roc_curve"):
                module.roc_curve = roc_curve

        loader.exec_module = exec_module
        return spec


def defer_sklearn() -> None:
    """Install the finder, unless the module is imported already or the finder is installed."""
    if DEFERRING in sys.modules or any(isinstance(f, _DeferSklearn) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferSklearn())
