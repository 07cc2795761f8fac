"""A process's exit without the interpreter's teardown, for the processes that run a stage (`python -m
components.<stage>`: a torchrun rank, a pod, a local step) once their work is done.

A process that has imported torch, transformers, MLflow or vLLM spends seconds after its last line freeing modules
and objects it is about to drop anyway: on two idle cores 0.7 s for `import torch` alone, 1.4 s with a transformers
model class, 2.5 s with vLLM's `LLM`, and 4 s after a grpo stage that ran a vLLM engine (more with the cores shared).
`run(main)` registers an atexit callback first, so that it runs after every callback that `main`'s imports register,
then runs `main`. When `main` returns, the interpreter's exit sequence runs as usual: non-daemon threads are joined
and those callbacks run (MLflow's, vLLM's, multiprocessing's); then this one shuts logging down (whose own callback,
registered when `components` was imported, would come after it), flushes the standard streams and ends the process
with os._exit(0), where the teardown would begin. A `main` that raises, or exits with a status, ends as it always
does.

C++ static destructors do not run either, so nothing outside the process may depend on them: vLLM's CPU
communicator removes its shared memory names only in one, and a name left behind refuses the next engine of that
shape on the machine; the engine therefore removes them as soon as every rank has joined them
(components/training/engines.py, `release_shm_names`).
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
from collections.abc import Callable

_succeeded: list[bool] = []


def _exit_without_teardown() -> None:
    if not _succeeded:
        return
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def run(main: str | Callable[[], object]) -> None:
    """Run `main` (a callable, or the name of a module whose `main()` to call: imported after the callback is
    registered, so that whatever it registers runs before it), then exit without the teardown if it returned."""
    atexit.register(_exit_without_teardown)
    if isinstance(main, str):
        main = importlib.import_module(main).main
    main()
    _succeeded.append(True)
