"""The reward_model stage on the tiny model: Bradley–Terry on arithmetic pairs, held-out accuracy, and the
trained directory scored by the `reward_model` reward as is."""
import json
import math
import random
import time

import pytest

from components.config import from_mapping
from components.datasets import DataError, write_jsonl
from components.reward_model.config import RewardModelConfig
from components.reward_model.main import held_out
from components.reward_model.main import run as run_rm
from components.rewards import build_rewards
from components.tasks import get_task


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic problems with chosen = the correct answer and rejected = a wrong one: the answer plus a nonzero
    offset in [−10, 10] (a near miss, as a model that learnt the format but not the sums writes it)."""
    rng = random.Random(seed)
    pairs = []
    for row in get_task("arithmetic").generate(n, seed=seed):
        answer = int(row["answer"])
        pairs.append({"prompt": row["prompt"], "chosen": str(answer),
                      "rejected": str(answer + rng.choice([d for d in range(-10, 11) if d]))})
    return pairs


# Held-out accuracy on these pairs is measured, not asserted here: from the random-init tiny model it stayed at
# chance (0.48 after 300 steps, ~410 s on 2 shared cores; the 0.85 floor is not reached; the rlhf-demo's
# head logprob from the SFT model reaches it, README "RLHF on the tiny model"). This test checks the stage's
# contract in a few steps.
def test_reward_model_trains_reports_held_out_metrics_and_loads_as_a_reward(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(2000))
    cfg = from_mapping(RewardModelConfig, {
        "model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / "rm"),
        "eval_fraction": 0.1, "train": {"max_steps": 6, "batch_size": 32, "lr": 1e-3, "token_budget": 2048,
                                        "log_every": 50}})
    started = time.perf_counter()
    summary = run_rm(cfg)
    seconds = time.perf_counter() - started
    print(f"reward_model: held-out accuracy {summary['eval/accuracy']:.3f} on {summary['eval_pairs']} pairs "
          f"in {seconds:.0f}s")
    assert summary["eval_pairs"] > 100 and summary["train_pairs"] + summary["eval_pairs"] == 2000
    hist = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "mean_reward"} <= set(hist[0])
    for key in ("eval/accuracy", "eval/margin", "eval/mean_reward", "eval/std_reward", "eval/loss"):
        assert key in summary and key in summary["final"], key

    # the output is what the `reward_model` reward loads, unchanged: its scores rank the held-out pairs alike
    reward = build_rewards([{"name": "reward_model", "uri": str(tmp_path / "rm" / "model")}], where="rewards")
    held = [p for p in arithmetic_pairs(2000) if held_out(p["prompt"], 0.1)][:64]
    prompts = [p["prompt"] for p in held]
    chosen, _ = reward.score(prompts, [p["chosen"] for p in held], [None] * len(held), [None] * len(held))
    rejected, _ = reward.score(prompts, [p["rejected"] for p in held], [None] * len(held), [None] * len(held))
    assert len(chosen) == len(rejected) == len(held) and all(math.isfinite(x) for x in chosen + rejected)
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and summary["steps"] == 6


def test_reward_model_bad_pairs_and_a_model_without_a_head(tiny_model_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)} for a in range(20)]
    rows[3]["rejected"] = rows[3]["chosen"]
    write_jsonl(path, rows)
    out = tmp_path / "rm"
    base = {"model": str(tiny_model_dir), "train_data": str(path), "output_dir": str(out), "eval_fraction": 0.0,
            "train": {"max_steps": 1, "batch_size": 4}}
    with pytest.raises(DataError, match=rf"{path}:4.*the same as chosen"):
        run_rm(from_mapping(RewardModelConfig, base))
    summary = run_rm(from_mapping(RewardModelConfig, {**base, "max_bad_fraction": 0.1}))
    assert summary["rejected_rows"] == 1 and summary["train_pairs"] == 19
    # a causal LM is not a reward model: one line, naming the directory
    with pytest.raises(ValueError, match=r"not a reward model: its weights have no scalar head") as e:
        build_rewards([{"name": "reward_model", "uri": str(tiny_model_dir)}], where="rewards").score(
            ["1+1="], ["2"], [None], [None])
    assert "\n" not in str(e.value) and str(tiny_model_dir) in str(e.value)


def test_logprob_head_is_scored_by_the_reward_as_trained_and_starts_a_critic(tiny_model_dir, tmp_path):
    """head logprob: β times the model's summed completion log-probs is the score; the saved directory says so, the
    `reward_model` reward scores the held-out pairs exactly as the stage's eval did, and ppo's critic starts from
    its weights with a value head at zero."""
    import torch

    from components.ppo.config import PPOConfig
    from components.ppo.main import load_critic
    from components.rewards.reward_model import reward_head

    pairs = arithmetic_pairs(300)
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = from_mapping(RewardModelConfig, {
        "model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / "rm"),
        "head": "logprob", "beta": 2.5, "eval_fraction": 0.2,
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-3, "token_budget": 1024, "log_every": 50}})
    summary = run_rm(cfg)
    model_dir = tmp_path / "rm" / "model"
    assert reward_head(model_dir) == "logprob" and summary["eval_pairs"] > 20

    held = [p for p in pairs if held_out(p["prompt"], 0.2)]
    reward = build_rewards([{"name": "reward_model", "uri": str(model_dir), "batch_size": 7}], where="rewards")
    prompts, none = [p["prompt"] for p in held], [None] * len(held)
    chosen, _ = reward.score(prompts, [p["chosen"] for p in held], none, none)
    rejected, _ = reward.score(prompts, [p["rejected"] for p in held], none, none)
    assert all(x < 0 for x in chosen + rejected)  # sums of log-probs
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert sum(m > 0 for m in margins) / len(held) == pytest.approx(summary["eval/accuracy"])
    assert sum(margins) / len(held) == pytest.approx(summary["eval/margin"], abs=1e-4)
    assert sum(chosen + rejected) / (2 * len(held)) == pytest.approx(summary["eval/mean_reward"], abs=1e-4)

    ppo = from_mapping(PPOConfig, {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "ppo"),
                                   "prompts": {"task": "arithmetic"},
                                   "rewards": [{"name": "reward_model", "uri": str(model_dir)}]})
    assert ppo.critic_init == "reward_model"
    critic = load_critic(ppo, 0)
    assert torch.count_nonzero(critic.score.weight) == 0 and critic.config.reward_head == "scalar"
    from safetensors.torch import load_file
    trained = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(critic.base_model.state_dict()[name.removeprefix("model.")], trained[name])
