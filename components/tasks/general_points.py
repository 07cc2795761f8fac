"""`general_points`: the 24-card game of "SFT Memorizes, RL Generalizes" (Chu et al., 2025).

Four cards are dealt from a 52-card deck (ranks A, 2..10, J, Q, K). The player writes an equation that uses
each card's value exactly once, with + - * / and parentheses, and equals the target 24.

- in-domain ("id"): J, Q and K all count as 10. Prompt `Cards: 5 K 3 A. Face cards count as 10. Make 24.`
- out-of-domain ("ood"): J=11, Q=12, K=13, and every hand holds at least one face card, so the new rule
  always matters. Prompt `Cards: 5 K 3 A. J=11 Q=12 K=13. Make 24.` OOD hands are always test problems.

Only hands with a solution under their split's rule are generated (exact brute force with Fraction over
every binary expression tree, cached per multiset of values). The reference completion is the solution
that `cost` prefers (fewest divisions, then parentheses, then characters), written with the numeric values
and only the parentheses it needs, e.g. `(10-5)*3+9`; `answer` is the target, "24".
The train/test part of an in-domain hand is a hash of its sorted card *values*, so reorderings of a hand,
and hands that differ only in which face card stands for a 10, always fall in the same part.

Verifier (never raises, never evals): the completion, stripped of surrounding whitespace and at most
`MAX_EQUATION_CHARS` long, optionally ending in `=24` (the answer), is parsed by a small recursive-descent
parser: integers (ASCII digits, no leading zeros), binary + - * /, parentheses nested at most
`MAX_DEPTH` deep, spaces between tokens; no unary minus, no decimals. The multiset of numbers used must
equal the card values implied by the prompt (cards and rule are read from the prompt text), and the exact
Fraction value must equal the target, taken from `answer`. Division by zero, a parse error or an unreadable prompt
scores 0.0.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from ._common import generate_rows, is_test_problem

TARGET = 24
RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
FACE_RANKS = ("J", "Q", "K")
DECK = tuple(rank for rank in RANKS for _suit in range(4))

_NUMBER_VALUES = {"A": 1, **{str(v): v for v in range(2, 11)}}
RULE_VALUES = {
    "id": {**_NUMBER_VALUES, "J": 10, "Q": 10, "K": 10},
    "ood": {**_NUMBER_VALUES, "J": 11, "Q": 12, "K": 13},
}
# The rule as stated in the prompt; the verifier reads the rule back from this text.
RULE_TEXT = {"id": "Face cards count as 10.", "ood": "J=11 Q=12 K=13."}

MAX_EQUATION_CHARS = 200
MAX_DEPTH = 16  # parenthesis nesting limit of the verifier's parser

_PROMPT = re.compile(r"Cards: ((?:A|[2-9]|10|J|Q|K)(?: (?:A|[2-9]|10|J|Q|K)){3})\. (.*?) Make ([0-9]{1,4})\.")


def format_prompt(cards: list[str], split: str, target: int = TARGET) -> str:
    return f"Cards: {' '.join(cards)}. {RULE_TEXT[split]} Make {target}."


def parse_prompt(prompt: str) -> tuple[list[int], int] | None:
    """(card values under the stated rule, target) from a prompt, or None if it is not one of ours."""
    m = _PROMPT.search(prompt)
    if m is None:
        return None
    rule = next((split for split, text in RULE_TEXT.items() if m.group(2) == text), None)
    if rule is None:
        return None
    return [RULE_VALUES[rule][c] for c in m.group(1).split(" ")], int(m.group(3))


# --- solver ---------------------------------------------------------------------------------------------
# An expression tree is an int (a leaf) or a tuple (op, left, right).

OPS = ("+", "-", "*", "/")


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b != 0 else None


def _splits(values: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every ordered split of a sorted multiset into two non-empty sorted sub-multisets, without repeats."""
    out: dict[tuple[tuple[int, ...], tuple[int, ...]], None] = {}
    for mask in range(1, 2 ** len(values) - 1):
        left = tuple(v for i, v in enumerate(values) if mask >> i & 1)
        right = tuple(v for i, v in enumerate(values) if not mask >> i & 1)
        out[(left, right)] = None
    return list(out)


def cost(text: str) -> tuple:
    """Preference among equivalent expressions: fewer divisions, fewer parentheses, shorter, then text
    (a total order, so the chosen solution does not depend on search order)."""
    return text.count("/"), text.count("("), len(text), text


@functools.cache
def reachable(values: tuple[int, ...]) -> dict[Fraction, tuple[tuple, int | tuple]]:
    """Every value an expression over exactly the multiset `values` (sorted) can take -> (cost, tree) of
    the cheapest tree with that value.

    Every binary tree splits its leaves at the root, so recursing over all splits covers all orderings,
    operators and parenthesizations; keeping one tree per distinct value loses no reachable value.
    Only called on sub-hands (at most 3 values for the game), so the cache stays small.
    """
    if len(values) == 1:
        return {Fraction(values[0]): (cost(str(values[0])), values[0])}
    out: dict[Fraction, tuple[tuple, int | tuple]] = {}
    for left, right in _splits(values):
        rights = reachable(right)
        for a, (_, ta) in reachable(left).items():
            for b, (_, tb) in rights.items():
                for op in OPS:
                    v = _apply(op, a, b)
                    if v is None:
                        continue
                    tree = (op, ta, tb)
                    c = cost(render(tree)[0])
                    if v not in out or c < out[v][0]:
                        out[v] = (c, tree)
    return out


def _partners(op: str, t: Fraction, x: Fraction, x_is_left: bool) -> Fraction | None:
    """The y with `x op y == t` (x on the left) or `y op x == t` (x on the right); None when there is no
    single such y (t == 0 cases are left to the caller's fallback)."""
    if x_is_left:
        if op == "+":
            return t - x
        if op == "-":
            return x - t
        if op == "*":
            return t / x if x != 0 else None
        return x / t if t != 0 and x != 0 else None
    if op == "+":
        return t - x
    if op == "-":
        return t + x
    if op == "*":
        return t / x if x != 0 else None
    return t * x if x != 0 else None


def _solutions(values: tuple[int, ...], target: Fraction):
    """Every (split, op) root of a tree over `values` equal to `target`, as trees: for each split, walk
    the smaller side and look the needed partner value up in the other side."""
    for left, right in _splits(values):
        lefts, rights = reachable(left), reachable(right)
        walk_left = len(lefts) <= len(rights)
        walked, other = (lefts, rights) if walk_left else (rights, lefts)
        for x, (_, tx) in walked.items():
            for op in OPS:
                if target == 0:  # partners are not unique; check every pair
                    candidates = [y for y in other if _apply(op, *((x, y) if walk_left else (y, x))) == 0]
                else:
                    y = _partners(op, target, x, walk_left)
                    candidates = [y] if y is not None and y in other else []
                for y in candidates:
                    ty = other[y][1]
                    tree = (op, tx, ty) if walk_left else (op, ty, tx)
                    if evaluate_tree(tree) == target:
                        yield tree


def evaluate_tree(tree: int | tuple) -> Fraction | None:
    """Exact value of a tree, None on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = evaluate_tree(left), evaluate_tree(right)
    return None if a is None or b is None else _apply(op, a, b)


@functools.cache
def _solve_sorted(values: tuple[int, ...], target: int) -> str | None:
    if len(values) == 1:
        return str(values[0]) if values[0] == target else None
    texts = [render(tree)[0] for tree in _solutions(values, Fraction(target))]
    return min(texts, key=cost, default=None)


def solve(values, target: int = TARGET) -> str | None:
    """The cheapest (see `cost`) equation using each of `values` once that equals `target`, or None if
    the hand is unsolvable. Depends only on the multiset of values."""
    values = tuple(sorted(int(v) for v in values))
    if not values:
        return None
    return _solve_sorted(values, int(target))


_ATOM, _MUL, _ADD = 3, 2, 1  # precedence of a rendered subexpression


def render(tree: int | tuple) -> tuple[str, int]:
    """(text, precedence) of a tree, with only the parentheses the value needs."""
    if isinstance(tree, int):
        return str(tree), _ATOM
    op, left, right = tree
    (lt, lp), (rt, rp) = render(left), render(right)
    wrap_left = op in "*/" and lp == _ADD
    wrap_right = (op == "-" and rp == _ADD) or (op == "*" and rp == _ADD) or (op == "/" and rp <= _MUL)
    lt = f"({lt})" if wrap_left else lt
    rt = f"({rt})" if wrap_right else rt
    return f"{lt}{op}{rt}", (_ADD if op in "+-" else _MUL)


# --- verifier's parser ----------------------------------------------------------------------------------

class _Reject(Exception):
    """The completion is not a well-formed equation (or divides by zero)."""


_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")


def tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Reject(f"bad character at {pos}")
        number = m.group(1)
        if number is not None and len(number) > 1 and number[0] == "0":
            raise _Reject("leading zero")
        tokens.append(number if number is not None else m.group(2))
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'.

    Evaluates with Fraction while parsing and records every number used."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction:
        value = self._expr(0)
        if self.pos != len(self.tokens):
            raise _Reject("trailing tokens")
        return value

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            value = _apply(op, value, self._term(depth))
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            value = _apply(op, value, self._factor(depth))
            if value is None:
                raise _Reject("division by zero")
        return value

    def _factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise _Reject("unexpected end")
        self.pos += 1
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise _Reject("nested too deeply")
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise _Reject("missing )")
            self.pos += 1
            return value
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise _Reject(f"unexpected {tok!r}")


def evaluate_equation(text: str) -> tuple[Fraction, list[int]]:
    """(value, numbers used) of an equation's left-hand side; raises _Reject when it is malformed."""
    if len(text) > MAX_EQUATION_CHARS:
        raise _Reject("too long")
    parser = _Parser(tokenize(text))
    value = parser.parse()
    return value, parser.numbers


def score(prompt: str, completion: str, answer: str) -> float:
    """The verifier's logic; may raise on hostile input (GeneralPoints.verify catches everything)."""
    parsed = parse_prompt(prompt)
    target_text = answer.strip()
    if parsed is None or not re.fullmatch(r"[0-9]{1,4}", target_text):
        return 0.0
    cards, _ = parsed
    text = completion.strip()
    if len(text) > MAX_EQUATION_CHARS:
        return 0.0
    if "=" in text:  # optional trailing "=<target>"
        lhs, _, rhs = text.partition("=")
        if rhs.strip() != target_text:
            return 0.0
        text = lhs
    try:
        value, numbers = evaluate_equation(text)
    except _Reject:
        return 0.0
    if sorted(numbers) != sorted(cards):
        return 0.0
    return 1.0 if value == int(target_text) else 0.0


# --- the task -------------------------------------------------------------------------------------------

def has_face(cards: list[str]) -> bool:
    return any(c in FACE_RANKS for c in cards)


@dataclass(frozen=True)
class GeneralPoints:
    """The 24 game; see the module docstring for the splits and the verifier."""

    name: str = "general_points"
    target: int = TARGET

    def _draw(self, rng: random.Random, split: str, part: str) -> tuple[str, str, str] | None:
        cards = rng.sample(DECK, 4)
        if split == "ood" and not has_face(cards):
            return None
        values = [RULE_VALUES[split][c] for c in cards]
        key = f"{split}:{','.join(map(str, sorted(values)))}:{self.target}"
        if split == "id" and is_test_problem(self.name, key) != (part == "test"):
            return None
        solution = solve(values, self.target)
        if solution is None:
            return None
        return format_prompt(cards, split, self.target), solution, str(self.target)

    def generate(self, n: int, *, seed: int, split: str = "id", part: str = "train") -> list[dict]:
        """`n` distinct solvable hands of `split`; `part` selects train/test in-domain, ignored for ood."""
        return generate_rows(self.name, self._draw, n, seed=seed, split=split, part=part)

    def verify(self, prompt: str, completion: str, answer: str) -> float:
        """1.0 iff the completion is a valid equation over the prompt's cards equal to `answer`; never raises."""
        try:
            if not (isinstance(prompt, str) and isinstance(completion, str) and isinstance(answer, str)):
                return 0.0
            return score(prompt, completion, answer)
        except Exception:  # untrusted input: any failure is a wrong answer
            return 0.0
