"""`math`: is the completion's final answer numerically equal to the reference?

The answer is the content of the last `\\boxed{...}` (braces matched), else the text after the last
"answer is" / "answer:" / "####" marker on its line, else the whole completion; `$` signs and a final
period around it are dropped. Plain numbers (sign, thousands commas, decimals, `a/b`, `\\frac{a}{b}`)
are compared exactly as fractions, with no parser library; anything else (`\\sqrt`, powers, sets, intervals)
goes to math-verify, which parses LaTeX into sympy.

math-verify's LaTeX grammar is slow on nested brackets (seconds at depth 8, minutes at depth 50) and sympy
evaluates `9^{9^{9^9}}` or `10^8!` for ever, so a model's answer reaches it only when it is short
(`MAX_ANSWER_CHARS`), shallow (`MAX_NESTING`), and, once parsed, free of factorials and huge or nested
exponents. math-verify bounds each call with `signal.alarm`, which only works in the main thread: there
each call gets `TIMEOUT_S` seconds; in another thread those guards are the only bound.
"""

from __future__ import annotations

import re
import string
import threading
from fractions import Fraction

MAX_ANSWER_CHARS = 100
MAX_NESTING = 4      # deepest ( [ { nesting sent to the LaTeX parser
MAX_EXPONENT = 1000  # largest |integer| allowed in an exponent
TIMEOUT_S = 2        # per math-verify call, main thread only

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_AROUND = string.whitespace + "$"  # stripped around an answer, and a final period (str methods: linear time)
_MARKER = re.compile(r"(?i)answer\s*(?:is\s*:?|:)|####")
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = rf"[+-]?(?:{_UNSIGNED})"
_NUMBER = re.compile(
    rf"(?P<sign>[+-]?)(?:\\[dt]?frac\{{(?P<fnum>{_SIGNED})\}}\{{(?P<fden>{_SIGNED})\}}"
    rf"|(?P<num>{_UNSIGNED})(?:/(?P<den>{_UNSIGNED}))?)"
)


def extract_answer(text: str) -> str:
    """The final answer written in `text` (see the module docstring); "" for an unclosed `\\boxed{`."""
    boxes = list(_BOXED.finditer(text))
    if boxes:
        start = boxes[-1].end()
        depth = 1
        for end in range(start, len(text)):
            depth += (text[end] == "{") - (text[end] == "}")
            if depth == 0:
                break
        else:
            return ""
        text = text[start:end]
    else:
        markers = list(_MARKER.finditer(text))
        if markers:
            text = text[markers[-1].end():].lstrip().split("\n", 1)[0]
    return text.lstrip(_AROUND).rstrip(_AROUND + ".")


def parse_number(text: str) -> Fraction | None:
    """The exact value of a plain number (`-1,234.5`, `3/4`, `\\frac{-3}{4}`), or None if `text` is not one."""
    m = _NUMBER.fullmatch(text.replace(" ", "").replace("\u2212", "-"))
    if m is None:
        return None
    num, den = (m["fnum"], m["fden"]) if m["fnum"] is not None else (m["num"], m["den"] or "1")
    num, den = Fraction(num.replace(",", "")), Fraction(den.replace(",", ""))
    if den == 0:
        return None
    return (-1 if m["sign"] == "-" else 1) * num / den


def nesting(text: str) -> int:
    """Deepest bracket nesting of `text`, counting ( [ { alike."""
    depth = deepest = 0
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        deepest = max(deepest, depth)
    return deepest


def _cheap(expr) -> bool:
    """Whether sympy can evaluate `expr` quickly: no factorial-like function, no huge or nested exponent."""
    from sympy import Basic, Number, Pow, preorder_traversal
    from sympy.functions.combinatorial.factorials import CombinatorialFunction

    if not isinstance(expr, Basic):
        return True
    for node in preorder_traversal(expr):
        if isinstance(node, CombinatorialFunction):
            return False
        if isinstance(node, Pow) and (node.exp.has(Pow) or any(abs(n) > MAX_EXPONENT for n in node.exp.atoms(Number))):
            return False
    return True


def _latex_equal(reference: str, answer: str) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig()]
    gold = parse(f"\\boxed{{{reference}}}", config, parsing_timeout=timeout, raise_on_error=True)
    if not gold:
        raise ValueError(f"reference answer {reference!r} cannot be parsed as a number or LaTeX")
    got = parse(f"\\boxed{{{answer}}}", config, parsing_timeout=timeout, raise_on_error=True)
    if not got or not all(_cheap(x) for x in got):
        return False
    return verify(gold, got, timeout_seconds=timeout, raise_on_error=True)


def math_equal(completion: str, reference: str) -> float:
    """1.0 iff the completion's final answer equals `reference`; raises on an unparseable reference."""
    answer, reference = extract_answer(completion), extract_answer(reference)
    if not answer or len(answer) > MAX_ANSWER_CHARS or nesting(answer) > MAX_NESTING:
        return 0.0
    got, want = parse_number(answer), parse_number(reference)
    if got is not None and want is not None:
        return float(got == want)
    return float(_latex_equal(reference, answer))
