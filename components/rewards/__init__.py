"""Reward functions by name, built from a spec and summed with weights.

    from components.rewards import build_rewards
    rewards = build_rewards([{"name": "arithmetic", "weight": 1.0},
                             {"name": "length", "weight": 0.5, "max_length": 64, "cache": 16}])
    total, per_fn = rewards.score(prompts, completions, answers, tasks)

Every reward scores a batch: `(prompts, completions, answers, tasks) -> list[float]`. A completion is a
model's output, so untrusted: a row whose scoring raises gets the reward's minimum (its `floor`) and is
counted in `RewardSet.stats`, so one bad completion never stops a batch. What a user controls fails
early instead: a bad spec raises ConfigError at build time naming the key path, and a row without the
`answer` (or `task`) a reward needs raises ValueError naming the row before any row is scored.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from components.config import ConfigError, from_mapping
from components.tasks import TASKS, get_task

from .math_answer import math_equal
from .reward_model import RewardModel, local_dir

log = logging.getLogger(__name__)

RowFn = Callable[[Any, str, "str | None", "str | None"], float]          # (prompt, completion, answer, task)
BatchFn = Callable[[list, list[str], list, list], list[float]]           # (prompts, completions, answers, tasks)


# --- options of each reward (validated by components.config.from_mapping) -------------------------------

@dataclass(kw_only=True, slots=True)
class NoOptions:
    """The reward takes nothing besides `name` and `weight`."""


@dataclass(kw_only=True, slots=True)
class FormatOptions:
    pattern: str | None = None
    """Regular expression the whole completion must match (re.fullmatch). None: at least one non-space
    character, optionally closed by the EOS text `<|end|>`, with nothing after it."""

    def __post_init__(self):
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {e}") from None


@dataclass(kw_only=True, slots=True)
class LengthOptions:
    max_length: int
    """Length (characters, or tokens with `tokenizer`) beyond which the score is -1 (DAPO's L_max)."""
    cache: int
    """Width of the zone ending at max_length where the score falls linearly from 0 to -1 (DAPO's L_cache)."""
    tokenizer: str | None = None
    """Tokenizer directory (local or s3://) to count tokens with; None counts characters."""

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if not 0 <= self.cache <= self.max_length:
            raise ValueError(f"cache must be in [0, max_length={self.max_length}], got {self.cache}")


@dataclass(kw_only=True, slots=True)
class RewardModelOptions:
    uri: str
    """Hugging Face directory of a reward model (local or s3://): a sequence-classification model with
    num_labels=1, or a causal LM with `reward_head: logprob` in its config (the reward_model stage's head logprob);
    in a pipeline `stage:reward_model`: the model the reward_model stage before trained (read by ppo)."""
    batch_size: int = 8
    """Rows per forward pass."""
    max_length: int = 1024
    """Tokens per row; longer rows lose their beginning, so the completion's end is always scored."""

    def __post_init__(self):
        if not self.uri:
            raise ValueError("uri must name a model directory, got ''")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {self.batch_size}, {self.max_length}")


# --- the functions ---------------------------------------------------------------------------------------

def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - cache, linear to -1 at max_length, -1 beyond."""
    if length > max_length:
        return -1.0
    return min(0.0, (max_length - cache - length) / cache) if cache else 0.0


def _math(o: NoOptions) -> RowFn:
    import math_verify  # noqa: F401  (missing, it fails here once, not as an error on every row)

    return lambda prompt, completion, answer, task: math_equal(completion, answer)


def _format(o: FormatOptions) -> RowFn:
    if o.pattern is None:
        from components.models import EOS

        eos = re.escape(EOS)  # linear time: `\s*` and `\S` never compete, so a failed match backtracks once
        rx = re.compile(rf"(?s)\s*(?!{eos})\S(?:(?!{eos}).)*(?:{eos})?")
    else:
        rx = re.compile(o.pattern)
    return lambda prompt, completion, answer, task: float(rx.fullmatch(completion) is not None)


def _length(o: LengthOptions) -> RowFn:
    count: Callable[[str], int] = len
    if o.tokenizer is not None:
        from components.models import load_tokenizer

        tok = load_tokenizer(local_dir(o.tokenizer))
        count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    return lambda prompt, completion, answer, task: overlong_penalty(count(completion), o.max_length, o.cache)


STAGE_PREFIX = "stage:"
"""A reward model's `uri: stage:<name>` is the model the stage <name> of the same pipeline made: the pipeline
hands it to the stage that scores with it through that stage's input (e.g. ppo's reward_model), and
`resolve_stage_models` puts its path in."""


def resolve_stage_models(specs: list[dict], models: dict[str, str | None]) -> list[dict]:
    """`specs` with each `uri: stage:<name>` replaced by models[name] (left as is when not given: it then fails
    when built, naming the reference)."""
    out = []
    for spec in specs:
        uri = spec.get("uri") if isinstance(spec, dict) else None
        if isinstance(uri, str) and uri.startswith(STAGE_PREFIX) and models.get(uri[len(STAGE_PREFIX):]):
            spec = {**spec, "uri": models[uri[len(STAGE_PREFIX):]]}
        out.append(spec)
    return out


def _reward_model(o: RewardModelOptions) -> BatchFn:
    if o.uri.startswith(STAGE_PREFIX):
        raise ValueError(f"uri {o.uri!r} names the model of a stage of a pipeline, and none was handed to this one "
                         "(only a pipeline step whose stage reads that model resolves it); give a directory")
    return RewardModel(o.uri, batch_size=o.batch_size, max_length=o.max_length)


@dataclass(frozen=True)
class RewardKind:
    """How a named reward is built: its options, a factory, the row fields it needs, its score on error."""
    options: type
    build: Callable[[Any], Callable]  # options -> RowFn, or a BatchFn when `batched`
    needs: tuple[str, ...] = ()
    floor: float = 0.0                 # the function's minimum: what a row that breaks it scores
    batched: bool = False              # scores whole batches itself (no per-row error catching)


REWARDS: dict[str, RewardKind] = {
    "task": RewardKind(NoOptions, lambda o: lambda p, c, a, t: get_task(t).verify(p, c, a), needs=("answer", "task")),
    **{name: RewardKind(NoOptions, lambda o, task=task: lambda p, c, a, t: task.verify(p, c, a), needs=("answer",))
       for name, task in TASKS.items()},
    "math": RewardKind(NoOptions, _math, needs=("answer",)),
    "format": RewardKind(FormatOptions, _format),
    "length": RewardKind(LengthOptions, _length, floor=-1.0),
    "reward_model": RewardKind(RewardModelOptions, _reward_model, batched=True),
}


# --- built rewards ---------------------------------------------------------------------------------------

class Reward:
    """One built reward: a callable scoring a batch. Row functions are guarded row by row: a row that
    raises, or scores NaN or inf, scores `floor` and counts in `errors`."""

    def __init__(self, name: str, weight: float, kind: RewardKind, fn: Callable):
        self.name, self.weight, self.kind, self.fn = name, weight, kind, fn
        self.errors = 0

    def __call__(self, prompts, completions, answers, tasks) -> list[float]:
        if self.kind.batched:
            return [float(s) for s in self.fn(prompts, completions, answers, tasks)]
        scores = []
        for i, row in enumerate(zip(prompts, completions, answers, tasks)):
            try:
                score = float(self.fn(*row))
                if not math.isfinite(score):
                    raise ValueError(f"non-finite score {score}")
            except Exception as e:  # untrusted completion: it scores the minimum, the batch goes on
                self.errors += 1
                if self.errors == 1:
                    log.warning("reward %s: row %d scored %s after %s: %s (further errors only counted)",
                                self.name, i, self.kind.floor, type(e).__name__, str(e)[:200])
                score = self.kind.floor
            scores.append(score)
        return scores


class RewardSet:
    """The rewards of one spec; `score` returns their weighted sum and each one's scores."""

    def __init__(self, rewards: list[Reward], where: str = "rewards"):
        self.rewards, self.where = rewards, where

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    @property
    def needs_answer(self) -> bool:
        """Whether some reward compares with a reference answer (rows must then carry `answer`)."""
        return any("answer" in r.kind.needs for r in self.rewards)

    @property
    def stats(self) -> dict[str, int]:
        """Rows that broke each reward so far (scored its minimum): `rewards/<name>/errors`."""
        return {f"rewards/{r.name}/errors": r.errors for r in self.rewards}

    def check(self, n: int, answers: list, tasks: list, source: str = "input") -> None:
        """Raise ValueError naming the first row (of all `n`) that lacks a field some reward needs."""
        for field, values in (("answer", answers), ("task", tasks)):
            users = [r.name for r in self.rewards if field in r.kind.needs]
            if not users:
                continue
            if len(values) != n:
                raise ValueError(f"{source}: {len(values)} {field}s for {n} completions; rewards {users} need one each")
            known = TASKS if field == "task" else None
            bad = [i for i, v in enumerate(values)
                   if not isinstance(v, str) or not v.strip() or (known is not None and v not in known)]
            if bad:
                i = bad[0]
                allowed = f"one of {', '.join(sorted(known))}" if known is not None else "a non-empty string"
                raise ValueError(
                    f"{source}: row {i} (0-based; {len(bad)} such rows) has field '{field}' = {values[i]!r:.80}, "
                    f"expected {allowed}: rewards {users} (from {self.where}) need it in every row")

    def score(self, prompts: list, completions: list[str], answers: list | None = None, tasks: list | None = None,
              *, source: str = "input") -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per row, {name: scores per row}); every row is checked before any is scored."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{source}: {len(prompts)} prompts for {n} completions")
        answers = [None] * n if answers is None else list(answers)
        tasks = [None] * n if tasks is None else list(tasks)
        self.check(n, answers, tasks, source)
        per_fn = {r.name: r(prompts, completions, answers, tasks) for r in self.rewards}
        total = [sum(r.weight * per_fn[r.name][i] for r in self.rewards) for i in range(n)]
        return total, per_fn


def check_rewards(specs: list[dict], where: str = "rewards") -> list[tuple[str, float, RewardKind, Any]]:
    """Validate spec items like {"name": "math", "weight": 1.0, ...options} without loading anything
    (no model, no tokenizer, no download): (name, weight, kind, options) per item.

    Raises ConfigError naming the key path (`rewards[1].name`), the bad value and what is allowed.
    """
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"{where}: expected a non-empty list like [{{name: arithmetic, weight: 1.0}}], got {specs!r}")
    checked: list[tuple[str, float, RewardKind, Any]] = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{at}: expected a mapping with a 'name', got {spec!r}")
        options = dict(spec)
        name, weight = options.pop("name", None), options.pop("weight", 1.0)
        if not isinstance(name, str) or name not in REWARDS:
            raise ConfigError(f"{at}.name: unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
        if name in (c[0] for c in checked):
            raise ConfigError(f"{at}.name: reward {name!r} is given twice; each reward appears once")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{at}.weight: {weight!r} is not a finite number (like 1.0 or -0.5)")
        kind = REWARDS[name]
        allowed = [f.name for f in fields(kind.options)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(f"{at} ({name}): unknown option(s) {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(['name', 'weight'] + allowed)}")
        checked.append((name, float(weight), kind, from_mapping(kind.options, options, f"{at} ({name})")))
    return checked


def build_rewards(specs: list[dict], where: str = "rewards") -> RewardSet:
    """`check_rewards`, then build each function (load a reward model, a tokenizer); ConfigError on failure."""
    rewards = []
    for i, (name, weight, kind, options) in enumerate(check_rewards(specs, where)):
        try:
            rewards.append(Reward(name, weight, kind, kind.build(options)))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}[{i}] ({name}): {e}") from e
    return RewardSet(rewards, where)


__all__ = ["REWARDS", "STAGE_PREFIX", "Reward", "RewardKind", "RewardSet", "build_rewards", "check_rewards",
           "overlong_penalty", "resolve_stage_models"]
