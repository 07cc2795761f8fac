"""Eval suites and the sampling of an evaluation, light: `python -m pipelines.spec check` reads them without
importing torch.

The evaluate stage and the `eval` part of the training stages (evaluation during training) read suites and
sampling settings with the same rules, so a suite means the same prompts in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from components.config import require
from components.tasks import SPLITS, TASKS

HELDOUT = "heldout"
RESERVED_NAMES = (HELDOUT, "baselines", "differences")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SUITE_KEYS = {"task": ("name", "task", "split", "n_prompts", "seed"), "data": ("name", "data", "task", "split")}


def normalize_suite(suite: dict, where: str, default_seed: int) -> dict:
    """A suite in full form: {"name", "task", "split", "n_prompts", "seed"} or {"name", "data", "task"?, "split"?}."""
    if not isinstance(suite, dict):
        raise ValueError(f"{where}={suite!r} is invalid: a mapping with 'task' or 'data'")
    kind = "data" if "data" in suite else "task"
    unknown = sorted(set(suite) - set(SUITE_KEYS[kind]))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for a {kind} suite; "
                         f"allowed: {', '.join(SUITE_KEYS[kind])}")
    task, split = suite.get("task"), suite.get("split", "id" if kind == "task" else None)
    if kind == "task" and task is None:
        raise ValueError(f"{where}: a suite needs 'task' (one of {', '.join(sorted(TASKS))}) or 'data' (a JSONL path)")
    if task is not None and task not in TASKS:
        raise ValueError(f"{where}.task={task!r} is invalid: one of {', '.join(sorted(TASKS))}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}.split={split!r} is invalid: one of {', '.join(SPLITS)}")
    name = suite.get("name", f"{task}-{split}" if kind == "task" else None)
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(f"{where}.name={name!r} is invalid: letters, digits, '_', '.', '-' (a data suite must "
                         f"name itself), not one of {', '.join(RESERVED_NAMES)}")
    if kind == "data":
        if not isinstance(suite["data"], str) or not suite["data"]:
            raise ValueError(f"{where}.data={suite['data']!r} is invalid: a JSONL path or s3:// URI")
        return {"name": name, "data": suite["data"], "task": task, "split": split}
    n_prompts, seed = suite.get("n_prompts", 200), suite.get("seed", default_seed)
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts < 1:
        raise ValueError(f"{where}.n_prompts={n_prompts!r} is invalid: a positive integer")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{where}.seed={seed!r} is invalid: an integer")
    return {"name": name, "task": task, "split": split, "n_prompts": n_prompts, "seed": seed}


def normalize_suites(suites, default_seed: int, where: str = "suites") -> list[dict]:
    """A non-empty list of suites with distinct names, each in full form (normalize_suite)."""
    if not isinstance(suites, list) or not suites:
        raise ValueError(f"{where}={suites!r} is invalid: a non-empty list of suites")
    out = [normalize_suite(s, f"{where}[{i}]", default_seed) for i, s in enumerate(suites)]
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}={suites!r} is invalid: suites with distinct names (got {', '.join(names)})")
    return out


def check_sampling(s) -> list[int]:
    """The sampling settings of an evaluation (`samples`, `temperature`, `top_p`, `max_new_tokens`, `k`,
    `batch_size` of `s`) are valid; returns the k's sorted and unique."""
    for key in ("samples", "max_new_tokens", "batch_size"):
        value = getattr(s, key)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value,
                "a positive integer")
    require(s.temperature >= 0, "temperature", s.temperature, "a number ≥ 0 (0 is greedy)")
    require(0 < s.top_p <= 1, "top_p", s.top_p, "a number in (0, 1]")
    require(not (s.temperature == 0 and s.samples > 1), "samples", s.samples,
            "1 with temperature 0 (greedy samples are all the same); set a temperature > 0")
    require(isinstance(s.k, list) and bool(s.k) and all(
        isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= s.samples for k in s.k), "k", s.k,
        f"a non-empty list of integers in [1, samples={s.samples}]")
    return sorted(set(s.k))


@dataclass(kw_only=True)
class TrainingEval:
    """Evaluation by generation during training: the `eval` part of sft, dpo, grpo and ppo. Every `every`
    optimizer steps (and at the last step) the model being trained samples each suite's prompts with these
    settings, the task's verifier scores them, and the step's record gets eval/<suite>/accuracy, pass@k,
    length and entropy: the numbers the evaluate stage (engine hf) gives for that checkpoint with the same suites
    and settings."""

    every: int = 0
    """Evaluate every this many optimizer steps, and at the last step; 0: never."""
    suites: list[dict] = field(default_factory=list)
    """Suites in the evaluate stage's format: {task, split, n_prompts, seed, name?} or {name, data, task?,
    split?} (components/evaluate/README.md); needed when `every` > 0."""
    samples: int = 1
    """Completions per prompt (n of avg@n and pass@k); more than one needs a temperature > 0."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 32
    """Longest completion in tokens."""
    k: list[int] = field(default_factory=lambda: [1])
    """The k of each pass@k logged (each ≤ samples)."""
    seed: int = 0
    """Seed of the sampling (the same at every evaluation) and the default seed of task suites."""
    batch_size: int = 64
    """Sequences decoded together."""
    max_length: int = 1024
    """Longest teacher-forced sequence (entropy on a task suite's reference completions) in tokens."""
    watch_window: int = 3
    """grpo and ppo: the reward-hacking warning compares the first and the last of this many latest evaluations
    (docs/tracking.md)."""

    def __post_init__(self):
        require(isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 0, "every",
                self.every, "an integer ≥ 0 (0: no evaluation during training)")
        self.k = check_sampling(self)
        require(isinstance(self.max_length, int) and self.max_length >= 2, "max_length", self.max_length,
                "an integer ≥ 2")
        require(isinstance(self.watch_window, int) and self.watch_window >= 2, "watch_window", self.watch_window,
                "an integer ≥ 2 (two evaluations at least are compared)")
        require(not self.every or bool(self.suites), "suites", self.suites,
                f"a non-empty list of suites with every {self.every}")
        if self.suites:
            self.suites = normalize_suites(self.suites, self.seed)

    def ranked_metrics(self) -> list[str]:
        """The metrics an evaluation records, as train.checkpoint_metric may name them: eval/<suite>/<metric>."""
        return [f"eval/{suite['name']}/" for suite in self.suites]
