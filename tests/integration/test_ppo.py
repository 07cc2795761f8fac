"""PPO on the tiny model: a reward model and a verifier as rewards, a critic started from the reward model, an
adaptive KL coefficient; killed with SIGKILL mid-run and rerun, it ends with the uninterrupted run's metrics."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, from_mapping
from components.ppo.config import PPOConfig
from components.ppo.main import run as run_ppo

REPO = Path(__file__).resolve().parents[2]
TIMING = {"step_time_s", "tokens_per_s", "mfu", "rollout_s", "rollout/sync_s"}

# Runs the stage, and SIGKILLs its own process right after step 6's metrics line: mid-round (a round is 4 steps),
# two steps after the step-4 checkpoint. Nothing is closed or flushed: as a killed pod.
KILLED = """
import os, signal, sys
from components.training.loop import Session
record = Session.record
def record_then_die(self, step, *args, **kwargs):
    out = record(self, step, *args, **kwargs)
    if step + 1 == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Session.record = record_then_die
from components.ppo.main import main
main(["--config", sys.argv[1]])
"""


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A reward model (the tiny model with a seeded random scalar head), as the reward_model stage saves one."""
    import torch

    from components.models import load_scalar_model, load_tokenizer
    from components.training.distributed import Dist, save_model

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = load_scalar_model(str(tiny_model_dir), tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("rm") / "model"
    save_model(model, tokenizer, out, Dist())
    return out


def settings(tiny_model_dir, reward_model_dir, output_dir, **extra) -> dict:
    return {"model": str(tiny_model_dir), "output_dir": str(output_dir),
            "prompts": {"task": "arithmetic", "task_rows": 32},
            "sampling": {"max_new_tokens": 6, "temperature": 1.2},
            "rewards": [{"name": "reward_model", "uri": str(reward_model_dir)}, {"name": "arithmetic"}],
            "critic_init": "reward_model", "ppo_epochs": 2, "num_minibatches": 2, "kl_coef": 0.1,
            "kl_controller": "adaptive", "kl_target": 0.5, "kl_horizon": 100,
            "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 12, "log_every": 1, "checkpoint_every": 4}, **extra}


def test_ppo_killed_mid_run_resumes_to_the_uninterrupted_metrics(tiny_model_dir, reward_model_dir, tmp_path):
    full = run_ppo(from_mapping(PPOConfig, settings(tiny_model_dir, reward_model_dir, tmp_path / "full")))
    hist = lines(tmp_path / "full" / "metrics.jsonl")
    assert full["steps"] == 12 and full["rounds"] == 3
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                "objective/non_score_reward", "objective/kl_coef", "policy/clipfrac_avg", "policy/approxkl_avg",
                "val/clipfrac_avg", "val/vpred", "val/error", "loss/policy_avg", "loss/value_avg",
                "rewards/reward_model/mean", "rewards/arithmetic/mean", "val/grad_norm"):
        assert all(math.isfinite(h[key]) for h in hist), key
    # round 1 is sampled from the reference itself: KL 0; the adaptive β then moves (KL below target: it falls)
    assert hist[0]["objective/kl"] == pytest.approx(0, abs=1e-5)
    assert hist[0]["objective/kl_coef"] == 0.1 and hist[4]["objective/kl_coef"] < 0.1
    # the first step of a round is on-policy: ratio 1, nothing clipped
    assert hist[0]["policy/approxkl_avg"] < 1e-8 and hist[0]["policy/clipfrac_avg"] == 0.0
    assert (tmp_path / "full" / "critic" / "config.json").exists()

    out = tmp_path / "killed"
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(settings(tiny_model_dir, reward_model_dir, out)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(config)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [h["step"] for h in lines(out / "metrics.jsonl")] == list(range(1, 7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["critic-step-00000004", "step-00000004"]

    proc = subprocess.run([sys.executable, "-m", "components.ppo", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-00000004" in proc.stderr
    again = lines(out / "metrics.jsonl")
    assert [h["step"] for h in again] == list(range(1, 13))
    for a, b in zip(hist, again):
        for key in a.keys() - TIMING:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key, a[key], b[key])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl_coef"] == pytest.approx(full["kl_coef"], rel=1e-5)
    assert summary["score_curve"] == pytest.approx(full["score_curve"], rel=1e-5, abs=1e-6)


def test_a2c_preset_is_one_unclipped_step_per_rollout(tiny_model_dir, reward_model_dir, tmp_path):
    base = settings(tiny_model_dir, reward_model_dir, tmp_path, preset="a2c", critic_init="policy")
    for key in ("ppo_epochs", "num_minibatches"):
        base.pop(key)
    base["train"] = {**base["train"], "max_steps": 2, "checkpoint_every": 0}
    cfg = from_mapping(PPOConfig, base)
    assert (cfg.ppo_epochs, cfg.num_minibatches, cfg.cliprange, cfg.cliprange_value) == (1, 1, None, None)
    summary = run_ppo(cfg)
    hist = lines(tmp_path / "metrics.jsonl")
    assert summary["rounds"] == 2 and [h["round"] for h in hist] == [1, 2]
    # a critic from the policy starts with its head at zero: V = 0 before its first step
    assert hist[0]["policy/clipfrac_avg"] == 0.0 and hist[0]["val/clipfrac_avg"] == 0.0
    with pytest.raises(ConfigError, match="ppo_epochs: 4 is invalid: unset with preset a2c"):
        from_mapping(PPOConfig, {**base, "ppo_epochs": 4})
    with pytest.raises(ConfigError, match="critic_init.*policy or auto when no reward is a reward_model"):
        from_mapping(PPOConfig, {**base, "critic_init": "reward_model", "rewards": [{"name": "arithmetic"}]})
