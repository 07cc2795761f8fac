"""Unit tests for components.tasks: determinism, train/test disjointness, OOD properties, reference
completions, hand-checked verifier cases and verifier robustness on hostile input."""

from __future__ import annotations

import itertools
import random
import re
import time

import pytest

from components.tasks import TASKS, Task, get_task
from components.tasks._common import TEST_FRACTION, is_test_problem
from components.tasks.arithmetic import Arithmetic
from components.tasks.general_points import (
    FACE_RANKS,
    MAX_DEPTH,
    RULE_TEXT,
    RULE_VALUES,
    GeneralPoints,
    parse_prompt,
    solve,
)

TASK_NAMES = ["arithmetic", "arithmetic_length", "general_points"]
COMBOS = [("id", "train"), ("id", "test"), ("ood", "test")]
ROW_KEYS = {"prompt", "completion", "answer", "task", "split"}


def prompts(rows):
    return [r["prompt"] for r in rows]


def printable(text: str) -> bool:
    return all(32 <= ord(c) <= 126 for c in text)


# --- registry ---------------------------------------------------------------------------------------------

def test_registry_holds_both_tasks():
    assert set(TASKS) == set(TASK_NAMES)
    for name in TASK_NAMES:
        task = get_task(name)
        assert task is TASKS[name] and task.name == name
        assert isinstance(task, Task)


def test_get_task_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_task("chess")
    message = str(err.value)
    assert "chess" in message
    for name in TASK_NAMES:
        assert name in message


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generate_rejects_bad_arguments(name):
    task = get_task(name)
    with pytest.raises(ValueError, match="split"):
        task.generate(3, seed=0, split="weird")
    with pytest.raises(ValueError, match="part"):
        task.generate(3, seed=0, part="validation")
    with pytest.raises(ValueError):
        task.generate(-1, seed=0)
    assert task.generate(0, seed=0) == []


# --- generation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split,part", COMBOS)
def test_generate_is_deterministic_and_seed_dependent(name, split, part):
    task = get_task(name)
    a = task.generate(40, seed=7, split=split, part=part)
    b = task.generate(40, seed=7, split=split, part=part)
    c = task.generate(40, seed=8, split=split, part=part)
    assert a == b
    assert prompts(a) != prompts(c)
    assert len(a) == 40


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split,part", COMBOS)
def test_rows_are_well_formed_short_ascii_and_distinct(name, split, part):
    rows = get_task(name).generate(300, seed=1, split=split, part=part)
    assert len(set(prompts(rows))) == len(rows) == 300
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["task"] == name and row["split"] == split
        for key in ("prompt", "completion", "answer"):
            assert isinstance(row[key], str) and row[key] and printable(row[key]), row
        assert len(row["prompt"]) + len(row["completion"]) <= 80, row


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split,part", COMBOS)
def test_reference_completion_verifies(name, split, part):
    task = get_task(name)
    for row in task.generate(300, seed=2, split=split, part=part):
        assert task.verify(row["prompt"], row["completion"], row["answer"]) == 1.0, row


@pytest.mark.parametrize("name", TASK_NAMES)
def test_train_and_test_never_share_a_prompt(name):
    task = get_task(name)
    train = {p for seed in range(5) for p in prompts(task.generate(300, seed=seed, part="train"))}
    test = {p for seed in range(5) for p in prompts(task.generate(300, seed=seed, part="test"))}
    ood = {p for seed in range(5) for p in prompts(task.generate(300, seed=seed, split="ood"))}
    assert train and test and ood
    assert not train & test
    assert not train & ood


def test_train_test_membership_follows_the_problem_hash():
    for part in ("train", "test"):
        for row in get_task("arithmetic").generate(200, seed=3, part=part):
            assert is_test_problem("arithmetic", row["prompt"][:-1]) == (part == "test")
    keys = [f"k{i}" for i in range(20_000)]
    share = sum(is_test_problem("arithmetic", k) for k in keys) / len(keys)
    assert abs(share - TEST_FRACTION) < 0.01


def test_general_points_parts_split_by_value_multiset():
    """Reordered hands, or hands differing only in which face card is a 10, stay in one part."""
    task = get_task("general_points")

    def hands(part):
        rows = [r for seed in range(3) for r in task.generate(300, seed=seed, part=part)]
        return {tuple(sorted(parse_prompt(r["prompt"])[0])) for r in rows}

    assert not hands("train") & hands("test")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_ood_ignores_part(name):
    task = get_task(name)
    assert task.generate(50, seed=4, split="ood", part="train") == task.generate(50, seed=4, split="ood", part="test")


def test_too_small_problem_space_raises():
    tiny = Arithmetic(max_digits_id=1, ood_digits=2)  # 200 in-domain problems, about 20 of them test
    assert len(tiny.generate(10, seed=0, part="test")) == 10
    with pytest.raises(ValueError, match="too small"):
        tiny.generate(100, seed=0, part="test")


# --- arithmetic -------------------------------------------------------------------------------------------

ARITH_ID = re.compile(r"([0-9]+)([-+])([0-9]+)=")
ARITH_TERMS = re.compile(r"[0-9]+")


def test_arithmetic_id_rows_are_two_small_operands():
    task = Arithmetic()
    for part in ("train", "test"):
        for row in task.generate(300, seed=5, part=part):
            m = ARITH_ID.fullmatch(row["prompt"])
            assert m, row
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert len(m.group(1)) <= task.max_digits_id and len(m.group(3)) <= task.max_digits_id
            assert row["answer"] == row["completion"] == str(a + b if op == "+" else a - b)


def leading_pair(prompt: str) -> tuple[int, int] | None:
    """The leading digits of a two-operand prompt whose operands both have two digits."""
    m = ARITH_ID.fullmatch(prompt)
    return (int(m.group(1)[0]), int(m.group(3)[0])) if m and len(m.group(1)) == len(m.group(3)) == 2 else None


def test_arithmetic_ood_rows_are_the_held_out_pairings_of_leading_digits():
    task = Arithmetic()
    holes = {(i, j) for i in range(1, 10) for j in range(1, 10) if (j - i) % 9 == 4}
    assert len(holes) == 9 and {i for i, _ in holes} == {j for _, j in holes} == set(range(1, 10))
    ood = task.generate(300, seed=6, split="ood")
    assert {leading_pair(r["prompt"]) for r in ood} == holes  # every hole, nothing else
    assert {r["prompt"][2] for r in ood} == {"+", "-"}
    for row in ood:
        assert int(row["answer"]) == eval_plus_minus(row["prompt"][:-1])  # trusted, generated text only
    # in-domain rows, train and test, never fall in a hole, yet every leading digit is seen on both sides
    seen = {leading_pair(r["prompt"]) for part, n in (("train", 3000), ("test", 1500))
            for r in task.generate(n, seed=6, part=part)}
    assert not seen & holes
    assert {p[0] for p in seen if p} == {p[1] for p in seen if p} == set(range(1, 10))


def test_arithmetic_length_ood_rows_are_long_or_three_terms():
    task = Arithmetic(ood_kind="length")
    kinds = set()
    for row in task.generate(300, seed=6, split="ood"):
        assert re.fullmatch(r"[0-9]+(?:[-+][0-9]+){1,2}=", row["prompt"]), row
        terms = ARITH_TERMS.findall(row["prompt"])
        if len(terms) == 3:
            kinds.add("three_terms")
            assert all(len(t) <= task.max_digits_id for t in terms)
        else:
            kinds.add("long")
            assert max(len(t) for t in terms) == task.ood_digits  # longer than any in-domain operand
        assert int(row["answer"]) == eval_plus_minus(row["prompt"][:-1])  # trusted, generated text only
    assert kinds == {"three_terms", "long"}
    # with no holes, in-domain rows cover every pairing of leading digits
    assert len({leading_pair(r["prompt"]) for r in task.generate(3000, seed=6)} - {None}) == 81


def eval_plus_minus(expr: str) -> int:
    """Independent left-to-right evaluation of a generated `a+b-c` string."""
    tokens = re.findall(r"[-+]|[0-9]+", expr)
    value = int(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):
        value = value + int(x) if op == "+" else value - int(x)
    return value


def test_arithmetic_difficulty_is_tunable():
    task = Arithmetic(max_digits_id=2, ood_digits=5, ood_three_term_fraction=0.0, ood_kind="length")
    for row in task.generate(100, seed=0):
        assert all(len(t) <= 2 for t in ARITH_TERMS.findall(row["prompt"]))
    for row in task.generate(100, seed=0, split="ood"):
        terms = ARITH_TERMS.findall(row["prompt"])
        assert len(terms) == 2 and 2 < max(len(t) for t in terms) <= 5
    with pytest.raises(ValueError):
        Arithmetic(max_digits_id=3, ood_digits=3)
    with pytest.raises(ValueError, match="ood_kind"):
        Arithmetic(ood_kind="other")


@pytest.mark.parametrize("prompt,completion,answer,expected", [
    ("347+58=", "405", "405", 1.0),
    ("347+58=", "  405\n", "405", 1.0),
    ("347+58=", "+405", "405", 1.0),
    ("12-345=", "-333", "-333", 1.0),
    ("12-345=", "333", "-333", 0.0),
    ("347+58=", "404", "405", 0.0),
    ("347+58=", "405.0", "405", 0.0),
    ("347+58=", "405 ", "405", 1.0),
    ("347+58=", "405\n406", "405", 0.0),
    ("347+58=", "405 apples", "405", 0.0),
    ("347+58=", "4 05", "405", 0.0),
    ("347+58=", "", "405", 0.0),
    ("347+58=", "--405", "405", 0.0),
    ("347+58=", "\u0664\u0660\u0665", "405", 0.0),  # Arabic-Indic digits are not ASCII digits
    ("347+58=", "405", "not a number", 0.0),
])
def test_arithmetic_verify_cases(prompt, completion, answer, expected):
    assert Arithmetic().verify(prompt, completion, answer) == expected


# --- general_points ---------------------------------------------------------------------------------------

ID_1234 = "Cards: A 2 3 4. Face cards count as 10. Make 24."


@pytest.mark.parametrize("completion,expected", [
    ("(1+2+3)*4", 1.0),
    ("1*2*3*4", 1.0),
    ("4*3*2*1", 1.0),
    ("4*3*2", 0.0),              # a card unused
    ("(1+2+3)*4+0", 0.0),        # an extra number
    ("(1+2+3)*4*1", 0.0),        # a card used twice
    ("(1+2+3)*4=24", 1.0),       # optional trailing "=24"
    (" ( 1 + 2 + 3 ) * 4 = 24 ", 1.0),
    ("(1+2+3)*4=25", 0.0),
    ("(1+2+3)*4=24=24", 0.0),
    ("1+2+3+4", 0.0),            # right cards, wrong value
    ("(1+2+3)*04", 0.0),         # leading zero
    ("-(1-2-3)*4", 0.0),         # no unary minus
    ("(1+2+3)4", 0.0),           # no implicit multiplication
    ("(1+2+3)x4", 0.0),
    ("4/(1-1)*2*3", 0.0),        # division by zero (and wrong cards)
    ("((1+2+3)*4", 0.0),
    ("(1+2+3)*4)", 0.0),
    ("24", 0.0),
    ("", 0.0),
])
def test_general_points_hand_checked_in_domain(completion, expected):
    assert GeneralPoints().verify(ID_1234, completion, "24") == expected


def test_general_points_division_by_zero_scores_zero():
    prompt = "Cards: A A 2 3. Face cards count as 10. Make 24."
    assert GeneralPoints().verify(prompt, "3/(1-1)+2", "24") == 0.0


def test_general_points_fractions_are_exact():
    prompt = "Cards: 3 3 8 8. Face cards count as 10. Make 24."
    assert GeneralPoints().verify(prompt, "8/(3-8/3)", "24") == 1.0
    assert solve([3, 3, 8, 8]) is not None


def test_general_points_face_values_follow_the_prompt_rule():
    gp = GeneralPoints()
    id_prompt = "Cards: Q 2 A A. Face cards count as 10. Make 24."
    ood_prompt = "Cards: Q 2 A A. J=11 Q=12 K=13. Make 24."
    assert gp.verify(id_prompt, "(10+2)*(1+1)", "24") == 1.0
    assert gp.verify(ood_prompt, "(10+2)*(1+1)", "24") == 0.0
    assert gp.verify(ood_prompt, "12*2*1*1", "24") == 1.0
    assert gp.verify(id_prompt, "12*2*1*1", "24") == 0.0
    assert gp.verify("Cards: K Q J A. J=11 Q=12 K=13. Make 24.", "12*(13-11)*1", "24") == 1.0
    assert gp.verify("Cards: K Q J A. Face cards count as 10. Make 24.", "12*(13-11)*1", "24") == 0.0
    assert gp.verify("Cards: Q 2 A A. Some other rule. Make 24.", "(10+2)*(1+1)", "24") == 0.0


def test_general_points_nesting_limit():
    gp = GeneralPoints()
    ok = "(" * MAX_DEPTH + "1+2+3" + ")" * MAX_DEPTH + "*4"
    too_deep = "(" * (MAX_DEPTH + 1) + "1+2+3" + ")" * (MAX_DEPTH + 1) + "*4"
    assert gp.verify(ID_1234, ok, "24") == 1.0
    assert gp.verify(ID_1234, too_deep, "24") == 0.0


def test_general_points_ood_hands_have_a_face_card_and_use_face_values():
    rows = get_task("general_points").generate(300, seed=9, split="ood")
    used_face_values = set()
    for row in rows:
        assert RULE_TEXT["ood"] in row["prompt"]
        cards = row["prompt"].split(".")[0].removeprefix("Cards: ").split(" ")
        assert len(cards) == 4 and any(c in FACE_RANKS for c in cards), row
        values = [RULE_VALUES["ood"][c] for c in cards]
        assert parse_prompt(row["prompt"])[0] == values
        used_face_values |= {v for v in values if v > 10}
    assert used_face_values == {11, 12, 13}


def test_general_points_id_rows_state_the_id_rule():
    for row in get_task("general_points").generate(100, seed=9):
        assert RULE_TEXT["id"] in row["prompt"]
        assert all(v <= 10 for v in parse_prompt(row["prompt"])[0])


def test_solver_counts_the_known_number_of_solvable_hands():
    """Of the 1820 multisets of four values in 1..13, 1362 can make 24 (a well-known count)."""
    hands = list(itertools.combinations_with_replacement(range(1, 14), 4))
    assert len(hands) == 1820
    assert sum(solve(h) is not None for h in hands) == 1362
    assert solve([1, 1, 1, 1]) is None


# --- robustness on hostile completions --------------------------------------------------------------------

NASTY = [
    "", " ", "\n", "\x00", "1/0", "0/0", "(1+2+3)*4/0", "4/(2-2)",
    "(" * 10_000, ")" * 10_000, "(" * 500 + "1" + ")" * 500, "(" * 100_000 + "1",
    "9" * 10_000, "-" + "9" * 5000, "1" * 4301, "9" * 199 + "*" + "9",
    "1e308", "1e-308", "nan", "inf", "-inf", "NaN", "0x18", "0b11000", "24.0", "24/1",
    "10**100", "2**2**2**2**2", "__import__('os').system('true')", "eval('24')",
    "1 2 3 4", "=24", "==", "=", "24=", "(1+2+3)*4==24", "+" * 300, "*" * 300, "/" * 300,
    "\u0664\u0660\u0665", "\uff12\uff14", "24\u200b", "\u202e42", "\U0001f600" * 50, "A 2 3 4",
    "x" * 10_000, "(1+2+3)*4" * 1000, "1+" * 5000 + "1", "(((((((((((((((((((((1)))))))))))))))))))))",
]


def hostile_strings(count: int, seed: int = 0):
    rng = random.Random(seed)
    alphabets = [
        "".join(chr(c) for c in range(32, 127)),
        "0123456789+-*/()= ",
        "0123456789+-*/()=\n\t\u00e9\u0664\uff14\U0001f600",
    ]
    for _ in range(count):
        alphabet = rng.choice(alphabets)
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_verify_never_raises_on_hostile_completions(name):
    task = get_task(name)
    row = task.generate(1, seed=0)[0]
    start = time.perf_counter()
    for text in itertools.chain(NASTY, hostile_strings(3000)):
        if text.strip() == row["completion"]:
            continue
        assert task.verify(row["prompt"], text, row["answer"]) == 0.0, text[:80]
        assert task.verify(text, row["completion"], row["answer"]) in (0.0, 1.0)  # hostile prompt
        assert task.verify(row["prompt"], row["completion"], text) in (0.0, 1.0)  # hostile answer
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("bad", [None, 24, 24.0, b"24", ["24"], object()])
def test_verify_never_raises_on_non_strings(name, bad):
    task = get_task(name)
    row = task.generate(1, seed=0)[0]
    assert task.verify(row["prompt"], bad, row["answer"]) == 0.0
    assert task.verify(bad, bad, bad) == 0.0


def test_arithmetic_ops_restrict_the_operators():
    task = Arithmetic(ops="+")
    for split in ("id", "ood"):
        assert all("-" not in r["prompt"] for r in task.generate(100, seed=0, split=split))
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops="*")


def test_data_prep_cache_key_follows_the_task_generator(monkeypatch, tmp_path):
    """preflight's data fingerprint covers a task source's generator: other problems, another cache key."""
    from components.models import build_tiny_model
    from components.preflight.main import sources_digest
    from components.tasks import TASKS

    model = build_tiny_model(tmp_path / "tiny", seed=0)
    sources = [{"name": "a", "task": "arithmetic", "rows": 100, "shape": "sft", "seed": 0}]
    before, again = sources_digest(sources, str(model))[0], sources_digest(sources, str(model))[0]
    monkeypatch.setitem(TASKS, "arithmetic", Arithmetic(hole_shift=3))
    assert before == again != sources_digest(sources, str(model))[0]
