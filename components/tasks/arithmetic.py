"""`arithmetic`: integer addition and subtraction, the demo task.

Chosen so that a tiny character-level model trained for a few CPU minutes is clearly imperfect in-domain
(carries, borrows and signs of two-digit sums and differences are hard for it), which leaves room for RL, while the
out-of-domain split asks for a generalization such a model can make:

- in-domain ("id"): `a+b=` or `a-b=`, each operand a non-negative integer with 1..`max_digits_id` digits
  (the digit count is drawn uniformly first, then the value, so short operands are not drowned out), except the
  holes below. Prompt `47+58=`, completion `105`; `12-45=` -> `-33`.
- out-of-domain ("ood"), always test problems, `ood_kind` says which:
  - "holes" (the default): compositional holes. Two operands of `max_digits_id` digits whose leading digits
    (i, j) are a held-out pairing, (j - i) mod 9 == `hole_shift` (4): (1,5), (2,6), ..., (5,9), (6,1), ..., (9,4),
    one pairing per leading digit on either side (`43+83=`, `94-40=`). Training never shows these pairings, but it
    shows every leading digit on both sides with its 8 other partners, and every digit pair in the ones column, so a
    model that learned column-wise addition can bridge the gap; one that memorized operand pairs cannot.
  - "length": longer operands (two operands with 1..`ood_digits` digits, at least one longer than
    `max_digits_id`, `482-37=`) and an unseen form (three in-domain-sized terms, `12+34-5=`, evaluated left to
    right). Length generalization, which the demo's small model does not make (about 2% after training); the
    task `arithmetic_length` has this split, and no holes in its in-domain problems.

The train/test part of an in-domain problem is a hash of its prompt (see `_common.is_test_problem`).
`answer` is the result as a decimal integer string, and the reference completion is the same string.

Verifier: the completion, stripped of surrounding whitespace, must be exactly one decimal integer
(optional sign, ASCII digits, nothing else, at most `MAX_ANSWER_CHARS` characters) whose value equals
the answer. Anything else (trailing text, a second line, decimals, words) scores 0.0.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ._common import generate_rows, is_test_problem

# Difficulty knobs (the defaults of the `Arithmetic` dataclass).
MAX_DIGITS_ID = 2             # in-domain operands have 1..MAX_DIGITS_ID digits
OOD_DIGITS = 3                # ood "long" operands have up to OOD_DIGITS digits (> MAX_DIGITS_ID)
OOD_THREE_TERM_FRACTION = 0.5  # share of ood rows in the three-term form
OPS = "+-"                    # the operators drawn
OOD_KIND = "holes"            # what the ood split tests: "holes" (unseen digit pairings) or "length"
HOLE_SHIFT = 4                # the held-out leading-digit pairs: (i, j) with (j - i) mod 9 == HOLE_SHIFT

MAX_ANSWER_CHARS = 64  # longer completions are wrong without parsing them (no huge int conversions)
_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_integer(text: str) -> int | None:
    """The integer written by `text` (surrounding whitespace stripped), or None if it is not one."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if len(text) > MAX_ANSWER_CHARS or not _INTEGER.fullmatch(text):
        return None
    return int(text)


def draw_operand(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly `digits` digits (1 digit includes 0)."""
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10 ** digits)


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Left-to-right value of `operands[0] ops[0] operands[1] ...` with ops in {+, -}."""
    value = operands[0]
    for op, x in zip(ops, operands[1:]):
        value = value + x if op == "+" else value - x
    return value


def format_problem(operands: list[int], ops: list[str]) -> str:
    """`[12, 34, 5], ['+', '-']` -> `12+34-5` (the prompt is this plus `=`)."""
    return str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:]))


@dataclass(frozen=True)
class Arithmetic:
    """Addition/subtraction of small integers; see the module docstring for the splits."""

    name: str = "arithmetic"
    max_digits_id: int = MAX_DIGITS_ID
    ood_digits: int = OOD_DIGITS
    ood_three_term_fraction: float = OOD_THREE_TERM_FRACTION
    ops: str = OPS
    ood_kind: str = OOD_KIND
    hole_shift: int = HOLE_SHIFT

    def __post_init__(self) -> None:
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"ops must be a non-empty subset of '+-', got {self.ops!r}")
        if self.max_digits_id < 1:
            raise ValueError(f"max_digits_id must be >= 1, got {self.max_digits_id}")
        if self.ood_digits <= self.max_digits_id:
            raise ValueError(f"ood_digits ({self.ood_digits}) must exceed max_digits_id ({self.max_digits_id})")
        if self.ood_kind not in ("holes", "length"):
            raise ValueError(f"ood_kind must be 'holes' or 'length', got {self.ood_kind!r}")
        if not 1 <= self.hole_shift <= 8:
            raise ValueError(f"hole_shift must be in 1..8, got {self.hole_shift}")
        if not 0.0 <= self.ood_three_term_fraction <= 1.0:
            raise ValueError(f"ood_three_term_fraction must be in [0, 1], got {self.ood_three_term_fraction}")

    # --- problem drawing -------------------------------------------------------------------------------

    def in_hole(self, operands: list[int]) -> bool:
        """Whether two operands of `max_digits_id` digits each have a held-out pairing of leading digits."""
        if self.ood_kind != "holes" or len(operands) != 2 or min(operands) < 10 ** (self.max_digits_id - 1):
            return False
        i, j = (x // 10 ** (self.max_digits_id - 1) for x in operands)
        return (j - i) % 9 == self.hole_shift

    def _draw_id(self, rng: random.Random) -> tuple[list[int], list[str]] | None:
        operands = [draw_operand(rng, rng.randint(1, self.max_digits_id)) for _ in range(2)]
        return None if self.in_hole(operands) else (operands, [rng.choice(self.ops)])

    def _draw_ood(self, rng: random.Random) -> tuple[list[int], list[str]]:
        if self.ood_kind == "holes":
            while True:  # ends fast: 1 in 9 pairings of leading digits is a hole
                operands = [draw_operand(rng, self.max_digits_id) for _ in range(2)]
                if self.in_hole(operands):
                    return operands, [rng.choice(self.ops)]
        if rng.random() < self.ood_three_term_fraction:
            operands = [draw_operand(rng, rng.randint(1, self.max_digits_id)) for _ in range(3)]
            return operands, [rng.choice(self.ops), rng.choice(self.ops)]
        while True:  # at least one operand longer than in-domain; ends fast (P >= 1 - (max_id/ood)^2)
            digits = [rng.randint(1, self.ood_digits) for _ in range(2)]
            if max(digits) > self.max_digits_id:
                break
        return [draw_operand(rng, d) for d in digits], [rng.choice(self.ops)]

    def _draw(self, rng: random.Random, split: str, part: str) -> tuple[str, str, str] | None:
        drawn = self._draw_ood(rng) if split == "ood" else self._draw_id(rng)
        if drawn is None:
            return None
        operands, ops = drawn
        problem = format_problem(operands, ops)
        if split == "id" and is_test_problem(self.name, problem) != (part == "test"):
            return None
        answer = str(evaluate(operands, ops))
        return problem + "=", answer, answer

    # --- Task interface --------------------------------------------------------------------------------

    def generate(self, n: int, *, seed: int, split: str = "id", part: str = "train") -> list[dict]:
        """`n` distinct problems of `split`; `part` selects train/test in-domain and is ignored for ood."""
        return generate_rows(self.name, self._draw, n, seed=seed, split=split, part=part)

    def verify(self, prompt: str, completion: str, answer: str) -> float:
        """1.0 iff the completion is exactly one integer equal to `answer`; never raises."""
        try:
            got, want = parse_integer(completion), parse_integer(answer)
            return 1.0 if got is not None and want is not None and got == want else 0.0
        except Exception:  # untrusted input: any failure is a wrong answer
            return 0.0
