"""Reward functions: hand-computed scores on crafted and hostile completions, the weighted sum, the errors."""

import math
import threading
import time

import pytest
import torch

from components.config import ConfigError
from components.rewards import REWARDS, build_rewards, check_rewards, overlong_penalty
from components.rewards.math_answer import extract_answer, parse_number
from components.tasks import get_task

HOSTILE = ["", " \n\t", "\ud800", "ünïcødé ½ ∞ 🤖", "9" * 10_000, "{" * 5000 + "}" * 5000, "(" * 5000, "\x00\x01",
           "1e999999", "-" * 1000 + "1", "\\boxed{" * 1000, "<|end|>" * 100]


def scores(specs, completions, answers=None, tasks=None, prompts=None):
    rewards = build_rewards(specs)
    total, per_fn = rewards.score(prompts or [""] * len(completions), completions, answers, tasks)
    return total, per_fn, rewards


# --- task verifiers ---------------------------------------------------------------------------------------

def test_task_rewards_dispatch_to_each_rows_verifier():
    gp = get_task("general_points").generate(1, seed=0)[0]
    prompts = ["47+58=", "12-45=", "47+58=", gp["prompt"], gp["prompt"]]
    completions = ["105", " -33\n", "105 is it", gp["completion"], "24"]
    answers = ["105", "-33", "105", "24", "24"]
    tasks = ["arithmetic", "arithmetic", "arithmetic", "general_points", "general_points"]
    total, per_fn, _ = scores([{"name": "task"}], completions, answers, tasks, prompts)
    assert per_fn["task"] == total == [1.0, 1.0, 0.0, 1.0, 0.0]
    _, per_fn, _ = scores([{"name": "arithmetic"}, {"name": "general_points"}], completions, answers, tasks, prompts)
    assert per_fn["arithmetic"] == [1.0, 1.0, 0.0, 0.0, 1.0]  # "24" is the integer 24
    assert per_fn["general_points"] == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_task_rewards_score_hostile_completions_zero_without_errors():
    n = len(HOSTILE)
    _, per_fn, rewards = scores([{"name": "task"}], HOSTILE, ["1"] * n, ["arithmetic"] * n)
    assert per_fn["task"] == [0.0] * n
    assert rewards.stats == {"rewards/task/errors": 0}


# --- math -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, answer, expected", [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is: 1,234.", "1234", 1.0),
    ("#### -3", "-3.0", 1.0),
    ("\\boxed{+7}", "7", 1.0),
    ("$\\boxed{-\\dfrac{3}{4}}$", "-0.75", 1.0),
    ("3/4", "\\frac{6}{8}", 1.0),
    ("\\boxed{2} no, \\boxed{5}", "5", 1.0),       # the last box counts
    ("\\boxed{2} no, \\boxed{5}", "2", 0.0),
    ("\\boxed{\\boxed{3}}", "3", 1.0),
    ("1,23", "123", 0.0),                            # not a thousands grouping
    ("0.3333", "1/3", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),  # symbolic: math-verify
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{1/0}", "0", 0.0),
    ("\\boxed{1", "1", 0.0),                         # unclosed box: no answer
])
def test_math_equal(completion, answer, expected):
    _, per_fn, rewards = scores([{"name": "math"}], [completion], [answer])
    assert per_fn["math"] == [expected]
    assert rewards.stats == {"rewards/math/errors": 0}


def test_math_parsers():
    assert extract_answer("x \\boxed{a{b}c} y") == "a{b}c"
    assert extract_answer("The final answer is $-12$.\nok") == "-12"
    assert parse_number("-1,234.5") == parse_number("-\\frac{2469}{2}") == parse_number("-2469/2")
    assert parse_number("1,2345") is None and parse_number("1/0") is None and parse_number("x") is None


def test_math_hostile_answers_score_zero_fast_and_unguarded_breaks_count_as_errors():
    hostile = HOSTILE + ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{100000}}", "\\boxed{100000!}",
                         "\\boxed{\\binom{10^9}{10^8}}", "\\boxed{" + "{" * 50 + "1" + "}" * 50 + "}"]
    start = time.monotonic()
    _, per_fn, rewards = scores([{"name": "math"}], hostile, ["1"] * len(hostile))
    # each of these would take seconds to forever in sympy or the LaTeX parser; the guards answer at once
    assert time.monotonic() - start < 10
    assert per_fn["math"] == [0.0] * len(hostile)
    assert rewards.stats == {"rewards/math/errors": 0}
    # a completion that is not even a string, and a reference that cannot be parsed, break the verifier:
    # the row scores 0 and is counted, the other rows are scored
    _, per_fn, rewards = scores([{"name": "math"}], [None, "\\boxed{2}", "7"], ["1", "\\boxed{}", "7"])
    assert per_fn["math"] == [0.0, 0.0, 1.0]
    assert rewards.stats == {"rewards/math/errors": 2}


def test_math_outside_the_main_thread():
    """math-verify's timeout needs the main thread; elsewhere it must still verify (without the alarm)."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=scores(
        [{"name": "math"}], ["\\boxed{\\frac{\\sqrt{3}}{2}}", "\\boxed{9^{9^{9^{9}}}}"],
        ["\\frac{\\sqrt{3}}{2}", "1"])[1]))
    worker.start()
    worker.join(timeout=60)
    assert out["r"]["math"] == [1.0, 0.0]


# --- format and length ------------------------------------------------------------------------------------

def test_format_default_and_pattern():
    completions = ["105", "105<|end|>", "  x  <|end|>", "", "   ", "<|end|>", "105<|end|>x", "105<|end|> ",
                   "<|end|>105"]
    _, per_fn, _ = scores([{"name": "format"}], completions)
    assert per_fn["format"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    _, per_fn, _ = scores([{"name": "format", "pattern": r"-?\d+"}], ["12", "-3", "12a", "", "\ud800"])
    assert per_fn["format"] == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_default_is_linear_on_long_adversarial_text():
    start = time.monotonic()
    _, per_fn, _ = scores([{"name": "format"}], ["a " * 100_000 + "<|end|>x", " " * 200_000 + "<|end|>"])
    assert per_fn["format"] == [0.0, 0.0]
    assert time.monotonic() - start < 5


def test_overlong_penalty_by_hand():
    # max 10, cache 4: free up to 6, then -1/4 per unit, -1 at and beyond 10
    assert [overlong_penalty(n, 10, 4) for n in (0, 6, 7, 8, 10, 11, 10**9)] == [0, 0, -0.25, -0.5, -1, -1, -1]
    assert [overlong_penalty(n, 10, 0) for n in (10, 11)] == [0, -1]


def test_length_counts_chars_or_tokens(tiny_model_dir):
    completions = ["", "123456", "1234567", "12345<|end|>", "x" * 10**6, "\ud800"]
    _, per_fn, rewards = scores([{"name": "length", "max_length": 10, "cache": 4}], completions)
    assert per_fn["length"] == [0.0, 0.0, -0.25, -1.0, -1.0, 0.0]
    # the character-level tokenizer: one token per character, and `<|end|>` is one token
    _, per_fn, rewards = scores([{"name": "length", "max_length": 10, "cache": 4, "tokenizer": str(tiny_model_dir)}],
                                completions)
    # a lone surrogate breaks the tokenizer: that row scores the minimum, -1, and is counted
    assert per_fn["length"] == [0.0, 0.0, -0.25, 0.0, -1.0, -1.0]
    assert rewards.stats == {"rewards/length/errors": 1}


# --- the set: weighted sum, needs, errors -----------------------------------------------------------------

def test_weighted_sum_and_properties():
    rewards = build_rewards([{"name": "arithmetic", "weight": 2}, {"name": "length", "weight": -0.5,
                                                                   "max_length": 4, "cache": 2}])
    assert rewards.names == ["arithmetic", "length"] and rewards.needs_answer
    total, per_fn = rewards.score(["1+1=", "9+9=", "1+1="], ["2", "18", "2 is it"], ["2", "17", "2"], [None] * 3)
    assert per_fn == {"arithmetic": [1.0, 0.0, 0.0], "length": [0.0, 0.0, -1.0]}
    assert total == [2.0, 0.0, 0.5]
    assert not build_rewards([{"name": "format"}, {"name": "length", "max_length": 4, "cache": 2}]).needs_answer


@pytest.mark.parametrize("specs, fragments", [
    ([{"name": "format"}, {"name": "nope"}], ["rewards[1].name", "'nope'", "arithmetic", "math", "reward_model"]),
    ([{"weight": 1.0}], ["rewards[0].name", "None", "known rewards"]),
    ([{"name": "math", "weight": "1"}], ["rewards[0].weight", "'1'"]),
    ([{"name": "math", "weight": float("nan")}], ["rewards[0].weight", "nan"]),
    ([{"name": "math", "weight": float("inf")}], ["rewards[0].weight", "inf"]),
    ([{"name": "math", "weight": True}], ["rewards[0].weight", "True"]),
    ([{"name": "format", "patern": "x"}], ["rewards[0] (format)", "'patern'", "pattern"]),
    ([{"name": "math", "max_length": 3}], ["rewards[0] (math)", "'max_length'", "allowed: name, weight"]),
    ([{"name": "format", "pattern": "(unclosed"}], ["rewards[0] (format)", "'(unclosed'", "regular expression"]),
    ([{"name": "length", "max_length": 10, "cache": 11}], ["rewards[0] (length)", "cache", "11"]),
    ([{"name": "length", "max_length": "10", "cache": 1}], ["rewards[0] (length)", "max_length", "'10'"]),
    ([{"name": "math"}, {"name": "math"}], ["rewards[1].name", "twice"]),
    ([], ["rewards", "non-empty list"]),
    (["math"], ["rewards[0]", "mapping"]),
    ([{"name": "reward_model"}], ["rewards[0] (reward_model)", "uri"]),
])
def test_bad_specs_name_the_key_path(specs, fragments):
    with pytest.raises(ConfigError) as e:
        build_rewards(specs)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_check_rewards_validates_without_loading(tmp_path):
    """What a spec validator runs at compile time: options are checked, no model or tokenizer is loaded."""
    specs = [{"name": "reward_model", "uri": "s3://posttrain-data/models/rm"},
             {"name": "length", "max_length": 8, "cache": 2, "tokenizer": str(tmp_path / "absent")}]
    assert [(name, weight) for name, weight, _, _ in check_rewards(specs)] == [("reward_model", 1.0), ("length", 1.0)]
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(length\).*absent: no such directory"):
        build_rewards(specs[1:])
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(reward_model\).*batch_size"):
        check_rewards([{"name": "reward_model", "uri": "x", "batch_size": 0}])


def test_missing_answer_or_task_names_the_row_before_scoring():
    rewards = build_rewards([{"name": "format"}, {"name": "math"}], where="grpo.rewards")
    with pytest.raises(ValueError, match=r"data/train\.jsonl: row 1 .*'answer'.*\['math'\].*grpo\.rewards"):
        rewards.score(["a", "b", "c"], ["1", "2", "3"], ["1", None, ""], source="data/train.jsonl")
    assert rewards.stats == {"rewards/format/errors": 0, "rewards/math/errors": 0}
    with pytest.raises(ValueError, match=r"row 0 .*'answer'"):
        rewards.score(["a"], ["1"])
    tasks = build_rewards([{"name": "task"}])
    with pytest.raises(ValueError, match=r"row 2 .*'task' = 'poetry'.*arithmetic, arithmetic_length, general_points"):
        tasks.score(["1+1="] * 3, ["2"] * 3, ["2"] * 3, ["arithmetic", "arithmetic", "poetry"])


def test_registry_names():
    assert set(REWARDS) == {"task", "arithmetic", "arithmetic_length", "general_points", "math", "format", "length",
                            "reward_model"}


# --- reward model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from components.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(cfg).eval()
    out = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, model, tok


def test_reward_model_scores_equal_a_direct_forward(reward_model_dir):
    path, model, tok = reward_model_dir
    prompts, completions = ["12+34=", "Cards: 5 K 3 A. Face cards count as 10. Make 24."], ["46", "(10-5)*3+9 sure"]
    rewards = build_rewards([{"name": "reward_model", "uri": str(path), "batch_size": 2, "weight": 0.5}])
    assert not rewards.needs_answer
    total, per_fn = rewards.score(prompts, completions, None, None)
    with torch.no_grad():
        direct = []
        for p, c in zip(prompts, completions):
            text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                           tokenize=False)
            assert text.endswith(f"<|assistant|>{c}<|end|>")
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            direct.append(model(input_ids=ids).logits[0, 0].item())
    assert per_fn["reward_model"] == pytest.approx(direct, abs=1e-5)  # one padded batch == each row alone
    assert direct[0] != pytest.approx(direct[1], abs=1e-4)
    assert total == pytest.approx([0.5 * s for s in direct], abs=1e-6)
    assert rewards.score(prompts, completions, None, None)[1] == per_fn  # deterministic
    # hostile text is scored (a lone surrogate is replaced), never fails the batch
    _, hostile = rewards.score([""] * 3, ["\ud800", "", "🤖" * 5000], None, None)
    assert all(math.isfinite(s) for s in hostile["reward_model"])


def test_reward_model_refuses_pickle_weights(reward_model_dir, tmp_path):
    path, model, tok = reward_model_dir
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tok.save_pretrained(pickled)
    # what `save_pretrained(safe_serialization=False)` wrote before transformers 5, which always writes safetensors
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError) as e:
        build_rewards([{"name": "reward_model", "uri": str(pickled)}])
    message = str(e.value)
    assert "rewards[0] (reward_model)" in message and str(pickled) in message
    assert "pytorch_model.bin" in message and "config.json" in message
    with pytest.raises(ConfigError, match="no such directory"):
        build_rewards([{"name": "reward_model", "uri": str(tmp_path / "absent")}])
