"""The project's stages and their shared code. Importing the package, which every stage process, pipeline step,
torchrun rank and TrainJob pod does before it imports torch, sets OpenMP's wait policy while it can still take
effect (components/threads.py)."""

from components.threads import early_env

early_env()
