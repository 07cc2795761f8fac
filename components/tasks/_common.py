"""Helpers shared by every task family: argument checks, seeding, the train/test hash, rejection sampling.

Kept apart from `__init__` (which holds the registry and the `Task` protocol) so that task modules can
import these without a circular import.

Train/test separation is decided by a hash of a *canonical problem key*, never by the seed: a problem is a
test problem iff `sha256(task|key)` falls in the lowest `TEST_FRACTION` of the hash range. So no seed of a
"train" call can ever produce a prompt that a "test" call produces, and the split is stable across
processes, Python versions and machines (no use of the salted built-in `hash`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

SPLITS = ("id", "ood")
PARTS = ("train", "test")
TEST_FRACTION = 0.1  # share of the in-domain problem space held out for "test"

# Rejection sampling gives up after this many draws in a row that were rejected (wrong part, unsolvable,
# duplicate prompt). When a space is large this never happens by chance; when it does, the space is
# (nearly) exhausted and the request cannot be met.
MAX_CONSECUTIVE_REJECTS = 20_000


def check_args(n: int, split: str, part: str) -> None:
    """Validate `generate` arguments, raising ValueError with the accepted values."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}; got {part!r}")


def effective_part(split: str, part: str) -> str:
    """Out-of-domain problems are never trained on: an "ood" request is always a test request."""
    return "test" if split == "ood" else part


def make_rng(task: str, seed: int, split: str, part: str) -> random.Random:
    """A private RNG per (task, seed, split, part). String seeds are hashed with SHA-512 by `random`,
    so the stream is the same in every process (independent of PYTHONHASHSEED)."""
    return random.Random(f"{task}|{split}|{part}|{int(seed)}")


def is_test_problem(task: str, key: str) -> bool:
    """Whether the problem with canonical `key` belongs to the held-out test part of `task`."""
    digest = hashlib.sha256(f"{task}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64


# A draw returns (prompt, completion, answer), or None when the drawn problem is rejected.
Draw = Callable[[random.Random], "tuple[str, str, str] | None"]


def sample_rows(n: int, rng: random.Random, draw: Draw, *, task: str, split: str, part: str) -> list[dict]:
    """Draw until `n` rows with distinct prompts are collected.

    Raises ValueError when MAX_CONSECUTIVE_REJECTS draws in a row are rejected, which means the requested
    (split, part) space is too small for `n` distinct prompts.
    """
    rows: list[dict] = []
    seen: set[str] = set()
    rejects = 0
    while len(rows) < n:
        drawn = draw(rng)
        if drawn is None or drawn[0] in seen:
            rejects += 1
            if rejects >= MAX_CONSECUTIVE_REJECTS:
                raise ValueError(
                    f"{task}: could only generate {len(rows)} distinct {split}/{part} problems of the {n} "
                    f"requested; the problem space is too small (ask for fewer rows or widen the task)"
                )
            continue
        rejects = 0
        prompt, completion, answer = drawn
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": completion, "answer": answer, "task": task, "split": split})
    return rows


def generate_rows(task: str, draw: Callable[[random.Random, str, str], tuple[str, str, str] | None], n: int, *,
                  seed: int, split: str, part: str) -> list[dict]:
    """The shared body of every task's `generate`: check arguments, seed, and sample `n` distinct rows."""
    check_args(n, split, part)
    part = effective_part(split, part)
    rng = make_rng(task, seed, split, part)
    return sample_rows(n, rng, lambda r: draw(r, split, part), task=task, split=split, part=part)
