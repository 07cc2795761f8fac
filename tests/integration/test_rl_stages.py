"""reward_scoring → DPO, and GRPO, on the tiny model: real sampling, real rewards, real training (seconds)."""
import json
import math

import pytest

from components.config import from_mapping
from components.datasets import DataError, write_jsonl
from components.dpo.config import DPOConfig
from components.dpo.main import run as run_dpo
from components.grpo.config import GRPOConfig
from components.grpo.main import run as run_grpo
from components.reward_scoring.config import RewardScoringConfig
from components.reward_scoring.main import make_pairs
from components.reward_scoring.main import run as run_scoring


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_make_pairs_best_vs_worst_and_skips():
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    texts = ["x", "y", "z", "same", "same", "same", "", "ok", "no"]
    totals = [0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.0, 1.0, 0.2]
    pairs, skipped = make_pairs(rows, texts, totals, 3)
    assert pairs == [{"prompt": "a", "chosen": "y", "rejected": "x", "chosen_reward": 1.0, "rejected_reward": 0.0}]
    assert skipped == {"tie": 1, "empty completion": 1}


def test_scoring_then_dpo(tiny_model_dir, tmp_path):
    cfg = from_mapping(RewardScoringConfig, {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "score"),
                                             "prompts": {"task": "arithmetic", "task_rows": 12}, "num_samples": 4,
                                             "sampling": {"max_new_tokens": 6, "temperature": 1.5}, "seed": 1,
                                             # a random model is never right: the length reward tells samples apart
                                             "rewards": [{"name": "task"},
                                                         {"name": "length", "max_length": 6, "cache": 6}]})
    stats = run_scoring(cfg)
    scored, pairs = lines(tmp_path / "score" / "scored.jsonl"), lines(tmp_path / "score" / "pairs.jsonl")
    assert len(scored) == 48 and stats["samples"] == 48
    assert stats["pairs"] == len(pairs) and stats["pairs"] + sum(stats["skipped"].values()) == 12
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"] and p["chosen"] != p["rejected"]
    # a random model rarely gets arithmetic right: build pairs from known-good and bad completions instead
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(6) for b in range(4)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    dcfg = from_mapping(DPOConfig, {"model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"),
                                    "output_dir": str(tmp_path / "dpo"), "beta": 0.5,
                                    "train": {"max_steps": 6, "batch_size": 8, "token_budget": 64, "lr": 3e-3,
                                              "log_every": 1}})
    summary = run_dpo(dcfg)
    hist = lines(tmp_path / "dpo" / "metrics.jsonl")
    first = hist[0]
    # step 1: the policy is the reference, so every implicit reward is 0 and the loss is log 2
    assert (first["rewards/margins"] == pytest.approx(0, abs=1e-5)
            and first["loss"] == pytest.approx(math.log(2), rel=1e-4))
    assert hist[-1]["rewards/margins"] > 0 and hist[-1]["loss"] < math.log(2)
    assert summary["pairs"] == 24 and (tmp_path / "dpo" / "model" / "model.safetensors").exists()


def test_dpo_bad_rows_named(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "2"}\n'
                    '{"prompt": "", "chosen": "2", "rejected": "3"}\n')
    cfg = from_mapping(DPOConfig, {"model": str(tiny_model_dir), "train_data": str(path),
                                   "output_dir": str(tmp_path / "o"), "train": {"max_steps": 1}})
    with pytest.raises(DataError) as e:
        run_dpo(cfg)
    assert f"{path}:1" in str(e.value) and "rejected" in str(e.value) and "the same as chosen" in str(e.value)
    assert f"{path}:2" in str(e.value) and "prompt" in str(e.value)


def test_missing_answers_fail_before_sampling(tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": "1+1=", "answer": "2", "task": "arithmetic"},
                       {"prompt": "2+2=", "task": "arithmetic"}])
    cfg = from_mapping(GRPOConfig, {"model": str(tiny_model_dir), "prompts": {"path": str(path)},
                                    "output_dir": str(tmp_path / "g"), "prompts_per_round": 2, "num_generations": 2,
                                    "train": {"max_steps": 1, "batch_size": 4}})
    with pytest.raises(ValueError, match=r"prompts.jsonl: row 1 \(0-based; 1 such rows\) has field 'answer' = None"):
        run_grpo(cfg)


def test_grpo_runs_and_resumes(tiny_model_dir, tmp_path):
    train = {"batch_size": 8, "lr": 1e-3, "log_every": 1, "max_steps": 8}
    base = {"model": str(tiny_model_dir), "prompts": {"task": "arithmetic", "task_rows": 32}, "prompts_per_round": 4,
            "num_generations": 4, "num_iterations": 2, "sampling": {"max_new_tokens": 6, "temperature": 1.2},
            "rewards": [{"name": "task"}, {"name": "format", "weight": 0.5}]}
    full = run_grpo(from_mapping(GRPOConfig, {**base, "output_dir": str(tmp_path / "full"), "train": train}))
    assert full["steps"] == 8 and full["rounds"] == 2
    hist = lines(tmp_path / "full" / "metrics.jsonl")
    for key in ("reward", "reward_std", "rewards/task/mean", "rewards/format/std", "frac_reward_zero_std",
                "completions/mean_length", "clip_ratio/high_mean", "kl_old", "entropy", "grad_norm"):
        assert key in hist[0], key
    # the first step of a round trains on-policy: the ratio is 1 up to the rollout/forward agreement
    assert hist[0]["kl_old"] < 1e-6 and hist[4]["kl_old"] < 1e-6
    # a run that checkpoints after round 1 (step 4), restarted: it resumes at step 5 and repeats the losses
    part = {**base, "output_dir": str(tmp_path / "part"), "train": {**train, "checkpoint_every": 4}}
    run_grpo(from_mapping(GRPOConfig, part))
    resumed_dir = tmp_path / "part"
    assert [p.name for p in (resumed_dir / "checkpoints").iterdir()] == ["step-00000004"]
    run_grpo(from_mapping(GRPOConfig, part))
    again = lines(resumed_dir / "metrics.jsonl")
    assert [h["step"] for h in again] == list(range(1, 9))
    for a, b in zip(hist, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["reward"] == b["reward"]
    # samples.jsonl as well: round 2, redone by the resume, is written once
    samples = [lines(d / "samples.jsonl") for d in (tmp_path / "full", resumed_dir)]
    assert [(s["round"], s["completion"]) for s in samples[1]] == [(s["round"], s["completion"]) for s in samples[0]]


@pytest.mark.parametrize("advantage,beta", [("rloo", 0.0), ("reinforce_pp", 0.1)])
def test_grpo_other_advantage_estimators(tiny_model_dir, tmp_path, advantage, beta):
    cfg = from_mapping(GRPOConfig, {
        "model": str(tiny_model_dir), "prompts": {"task": "arithmetic", "task_rows": 16}, "prompts_per_round": 2,
        "num_generations": 4, "sampling": {"max_new_tokens": 6, "temperature": 1.2}, "advantage": advantage,
        "beta": beta, "rewards": [{"name": "task"}, {"name": "format", "weight": 0.5}], "output_dir": str(tmp_path),
        "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 2}})
    summary = run_grpo(cfg)
    hist = lines(tmp_path / "metrics.jsonl")
    assert summary["steps"] == 2 and all(math.isfinite(h["loss"]) for h in hist)
    if advantage == "reinforce_pp":  # the KL is in the reward: reported per round, at 0 on round 1 (π_old = π_ref)
        assert hist[0]["kl"] == pytest.approx(0, abs=1e-5) and hist[1]["kl"] != 0
        samples = lines(tmp_path / "samples.jsonl")
        assert all(math.isfinite(s["advantage"]) for s in samples)


def test_grpo_config_errors(tiny_model_dir):
    from components.config import ConfigError
    base = {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"}}
    with pytest.raises(ConfigError, match=r"train.batch_size: 48 is invalid: a divisor of prompts_per_round × "
                                          r"num_generations = 128"):
        from_mapping(GRPOConfig, {**base, "train": {"batch_size": 48}})
    with pytest.raises(ConfigError, match="scale_rewards: 'std' is invalid"):
        from_mapping(GRPOConfig, {**base, "scale_rewards": "std"})
    with pytest.raises(ConfigError, match="prompts: missing; this key is required"):
        from_mapping(GRPOConfig, {"model": "m", "output_dir": "o"})
    with pytest.raises(ConfigError, match="prompts.path: None is invalid: exactly one of path and task"):
        from_mapping(GRPOConfig, {"model": "m", "output_dir": "o", "prompts": {}})
    with pytest.raises(ConfigError, match=r"rollout.engine: 'sglang' is invalid: one of hf, vllm"):
        from_mapping(GRPOConfig, {**base, "rollout": {"engine": "sglang"}})
    with pytest.raises(ConfigError, match=r"tis_cap: 0.5 is invalid"):
        from_mapping(GRPOConfig, {**base, "tis_cap": 0.5})
    with pytest.raises(ConfigError, match=r"rollout.engine: 'vllm' is invalid: hf with lora.quantize"):
        from_mapping(GRPOConfig, {**base, "rollout": {"engine": "vllm"}, "lora": {"enabled": True, "quantize": "4bit"}})


def test_dpo_rpo_adds_the_chosen_nll(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(4) for b in range(2)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    run_dpo(from_mapping(DPOConfig, {"model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"),
                                     "output_dir": str(tmp_path / "rpo"), "rpo_alpha": 0.5,
                                     "train": {"max_steps": 1, "batch_size": 8}}))
    [first] = lines(tmp_path / "rpo" / "metrics.jsonl")
    # step 1: the DPO part is log 2 for every pair; RPO adds α × the chosen completions' mean token NLL
    assert first["nll"] > 1.0 and first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll"], rel=1e-4)


def test_dpo_resumes_against_the_starting_policy(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(8) for b in range(4)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = {"model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / "d"),
           "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 3, "log_every": 1}}
    run_dpo(from_mapping(DPOConfig, cfg))
    full = lines(tmp_path / "d" / "metrics.jsonl")
    assert [p.name for p in (tmp_path / "d" / "checkpoints").iterdir()] == ["step-00000003"]
    summary = run_dpo(from_mapping(DPOConfig, cfg))  # resumes at step 4: the reference is still the starting model
    assert summary["steps"] == 6 and summary["first"]["step"] == 1  # the summary covers the whole run
    again = lines(tmp_path / "d" / "metrics.jsonl")
    assert [h["step"] for h in again] == list(range(1, 7))
    assert abs(again[3]["rewards/margins"]) > 1e-3  # a reference equal to the resumed policy gives margin 0
    for a, b in zip(full, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]


def test_scoring_fails_below_min_pairs(tiny_model_dir, tmp_path):
    # one reward that scores every completion alike: every prompt's samples tie, so no pair is made
    cfg = from_mapping(RewardScoringConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "score"),
        "prompts": {"task": "arithmetic", "task_rows": 3}, "num_samples": 2, "sampling": {"max_new_tokens": 2},
        "rewards": [{"name": "length", "max_length": 64, "cache": 8}]})
    with pytest.raises(DataError, match=r"made 0 preference pairs from 3 prompts, fewer than min_pairs=1 "
                                        r"\(prompts without a pair: 3 tie\)"):
        run_scoring(cfg)
    assert (tmp_path / "score" / "stats.json").exists()
    with pytest.raises(Exception, match="min_pairs: 0 is invalid: a positive integer"):
        from_mapping(RewardScoringConfig, {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"},
                                           "min_pairs": 0})


def test_grpo_logs_the_rollout_gap_and_truncated_importance_sampling(tiny_model_dir, tmp_path):
    """Every step logs sampling/sampling_logp_difference/* (the hf sampler's log-probs vs the trainer's: equal in fp32).
    tis_cap: the trainer recomputes π_old and weighs each token by min(π_old / π_rollout, C); here the two
    agree, so the weights are 1 and the losses equal the run without the correction."""
    base = {"model": str(tiny_model_dir), "prompts": {"task": "arithmetic", "task_rows": 16},
            "prompts_per_round": 4, "num_generations": 4, "sampling": {"max_new_tokens": 8, "temperature": 1.0},
            "rewards": [{"name": "format", "pattern": "(?s)[0-9A-Za-z].*"}],
            "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 3, "log_every": 1}}
    run_grpo(from_mapping(GRPOConfig, {**base, "output_dir": str(tmp_path / "plain")}))
    run_grpo(from_mapping(GRPOConfig, {**base, "output_dir": str(tmp_path / "tis"), "tis_cap": 2.0}))
    plain, corrected = lines(tmp_path / "plain" / "metrics.jsonl"), lines(tmp_path / "tis" / "metrics.jsonl")
    assert len(plain) == len(corrected) == 3
    for a, b in zip(plain, corrected):
        for h in (a, b):
            assert 0 <= h["sampling/sampling_logp_difference/mean"] <= h["sampling/sampling_logp_difference/max"] < 1e-4
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
