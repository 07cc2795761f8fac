"""Where RL and scoring stages get prompts: a JSONL of prompt rows, or a bundled task's generator."""

from __future__ import annotations

from dataclasses import dataclass

from components.datasets import load_rows, prompt_row


@dataclass(kw_only=True)
class PromptSource:
    """Config fields shared by stages that sample from prompts (reward_scoring, grpo)."""

    prompts: str | None = None
    """JSONL of prompt rows {"prompt", "answer"?, "task"?} (data_prep's prompts.train.jsonl); or use `task`."""
    task: str | None = None
    """A bundled task (arithmetic, general_points) whose training prompts are generated instead of read."""
    task_rows: int = 2000
    """How many prompts to generate from `task`."""
    task_split: str = "id"
    """The task's split to generate from: id or ood."""
    max_bad_fraction: float = 0.0
    """Share of unusable prompt rows tolerated (each is reported by file and line)."""

    def __post_init__(self):
        if (self.prompts is None) == (self.task is None):
            raise ValueError(f"prompts={self.prompts!r}, task={self.task!r} is invalid: give exactly one of them")
        if self.task is not None:
            from components.tasks import TASKS
            if self.task not in TASKS:
                raise ValueError(f"task={self.task!r} is invalid: one of {', '.join(sorted(TASKS))}")
        if self.task_split not in ("id", "ood"):
            raise ValueError(f"task_split={self.task_split!r} is invalid: id or ood")
        if not isinstance(self.task_rows, int) or self.task_rows < 1:
            raise ValueError(f"task_rows={self.task_rows!r} is invalid: a positive integer")

    def load_prompts(self, seed: int) -> list[dict]:
        if self.task is not None:
            from components.tasks import get_task
            return get_task(self.task).generate(self.task_rows, seed=seed, split=self.task_split, part="train")
        return load_rows(self.prompts, prompt_row, max_bad_fraction=self.max_bad_fraction)


def require_answers(rows: list[dict], rewards, where: str) -> None:
    """Fail before any sampling when a reward needs reference answers and some prompt rows have none."""
    if not getattr(rewards, "needs_answer", False):
        return
    missing = [i for i, r in enumerate(rows) if r.get("answer") in (None, "")]
    if missing:
        shown = ", ".join(str(i + 1) for i in missing[:10])
        raise ValueError(f"{where}: {len(missing)} prompt rows have no 'answer' (rows {shown}"
                         f"{', ...' if len(missing) > 10 else ''}), which the rewards {rewards.names} need")
