"""Where RL and scoring stages get prompts: a JSONL of prompt rows, or a bundled task's generator."""

from __future__ import annotations

from dataclasses import dataclass

from components.config import positive_ints, require
from components.datasets import check_max_bad_fraction, load_rows, prompt_row


@dataclass(kw_only=True)
class PromptSource:
    """Where prompts come from: the `prompts` part of the stages that sample from prompts (reward_scoring,
    grpo, ppo)."""

    path: str | None = None
    """JSONL of prompt rows {"prompt", "answer"?, "task"?} (data_prep's prompts.train.jsonl); or use `task`."""
    task: str | None = None
    """A bundled task (components.tasks: arithmetic, arithmetic_length, general_points) whose training prompts are
    generated instead of read."""
    task_rows: int = 2000
    """How many prompts to generate from `task`."""
    task_split: str = "id"
    """The task's split to generate from: id or ood."""
    max_bad_fraction: float = 0.0
    """Share of unusable prompt rows tolerated (each is reported by file and line)."""

    def __post_init__(self):
        require((self.path is None) != (self.task is None), "path", self.path,
                f"exactly one of path and task (task={self.task!r})")
        if self.task is not None:
            from components.tasks import TASKS
            require(self.task in TASKS, "task", self.task, f"one of {', '.join(sorted(TASKS))}")
        require(self.task_split in ("id", "ood"), "task_split", self.task_split, "id or ood")
        positive_ints(self, "task_rows")
        check_max_bad_fraction(self.max_bad_fraction)

    def load_prompts(self, seed: int) -> list[dict]:
        if self.task is not None:
            from components.tasks import get_task
            return get_task(self.task).generate(self.task_rows, seed=seed, split=self.task_split, part="train")
        return load_rows(self.path, prompt_row, max_bad_fraction=self.max_bad_fraction)

    def check_rows(self, rows: list[dict], rewards) -> None:
        """Fail before any model is loaded when the rewards need a field (answer, task) some prompt rows lack."""
        rewards.check(len(rows), [r.get("answer") for r in rows], [r.get("task") for r in rows],
                      source=self.path or f"task {self.task}")



def prompts_and_rewards(cfg) -> tuple[list[dict], object]:
    """An RL stage's prompt rows and rewards (cfg.prompts, cfg.rewards), checked against each other."""
    from components.rewards import build_rewards

    rewards = build_rewards(cfg.rewards, where="rewards")
    prompt_rows = cfg.prompts.load_prompts(cfg.train.seed)
    cfg.prompts.check_rows(prompt_rows, rewards)
    return prompt_rows, rewards
