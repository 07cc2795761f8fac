"""Bundled task families: deterministic problem generators with reference answers, and their verifiers.

A task turns a seed into prompts with a reference completion (what SFT trains on) and a reference answer
(what the verifier compares to), and scores a model's completion with `verify` (1.0 right, 0.0 wrong).
Every task has an in-domain split ("id", with disjoint "train" and "test" parts decided by a hash of the
problem) and an out-of-domain split ("ood", test only) that asks for generalization. Text is printable
ASCII and short, so the tiny character-level demo model can learn it on a CPU.

    from components.tasks import get_task
    task = get_task("arithmetic")
    rows = task.generate(1000, seed=0)                        # id / train
    test = task.generate(200, seed=0, part="test")            # id / test, never a train prompt
    ood = task.generate(200, seed=0, split="ood")             # out-of-domain, test only
    reward = task.verify(row["prompt"], model_output, row["answer"])
"""

from __future__ import annotations

from typing import Protocol, TypedDict, runtime_checkable

from ._common import PARTS, SPLITS, TEST_FRACTION
from .arithmetic import Arithmetic
from .general_points import GeneralPoints


class Row(TypedDict):
    """One generated problem."""
    prompt: str
    completion: str  # a correct reference completion
    answer: str      # the reference answer the verifier compares to
    task: str        # the task's name
    split: str       # "id" or "ood"


@runtime_checkable
class Task(Protocol):
    """A task family. `generate` is deterministic in (n, seed, split, part); `verify` never raises."""

    name: str

    def generate(self, n: int, *, seed: int, split: str = "id", part: str = "train") -> list[dict]: ...

    def verify(self, prompt: str, completion: str, answer: str) -> float: ...


# arithmetic_length: in-domain problems without holes (its own train/test hash) and an OOD split of longer operands
# and three terms: length generalization, which the demo's small model does not reach (components/tasks/README.md)
TASKS: dict[str, Task] = {task.name: task for task in (
    Arithmetic(), Arithmetic(name="arithmetic_length", ood_kind="length"), GeneralPoints())}


def get_task(name: str) -> Task:
    """The registered task called `name`; an unknown name raises ValueError listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["PARTS", "SPLITS", "TASKS", "TEST_FRACTION", "Arithmetic", "GeneralPoints", "Row", "Task", "get_task"]
