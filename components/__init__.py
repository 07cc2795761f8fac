"""The project's stages and their shared code. Importing the package, which every stage process, pipeline step,
torchrun rank and TrainJob pod does before it imports torch, sets OpenMP's wait policy while it can still take
effect (components/threads.py), and defers an import of scikit-learn that no stage needs at its start
(components/imports.py)."""

from components.imports import defer_sklearn
from components.threads import early_env

early_env()
defer_sklearn()
