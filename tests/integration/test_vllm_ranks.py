"""The vllm rollout engine on every rank: grpo and ppo under torchrun (2 processes on CPU, gloo, DeepSpeed), each
rank with its own colocated vLLM engine (vLLM's external launcher) sampling its share of a round's prompts, real
vLLM in fp32 over the tiny model.

After every sync the engine must sample from the trainer's current weights: the first optimizer step of each
round compares the trainer's log-probs of the sampled tokens with the engine's
(sampling/sampling_logp_difference/max, the largest gap over both ranks), which must stay below 1e-4 in fp32.
A sync that is skipped, or that pushes a partitioned model's empty shards, leaves gaps of 1e-2 and more. Under
ZeRO-3 every parameter is partitioned (zero3_param_persistence_threshold 0), so the engine's first weights and
every sync are streamed from the shards layer by layer (without the gathers the engine's start fails).

Each sample is seeded by its prompt's place in the round, not by the rank, so a 2-rank run samples what a
1-process run samples: under ZeRO-2 the two give the same samples, rewards, advantages, losses and gradient norms
(fp32; the sums differ only in order, as tests/integration/test_deepspeed.py measures), with LoRA too.

Killed with SIGKILL on every rank mid-run and rerun, grpo (ZeRO-3, and LoRA) and ppo (ZeRO-3) resume from their
last checkpoint and repeat the uninterrupted run's metrics. The killed run is the uninterrupted run up to its kill,
after its last step's metrics line: its rows are the reference, and the on-policy checks read them.

The bench lines with --nproc 2 (tests/integration/test_bench_ranks.py's _assert_ranks) are checked here, on the
one bench run that measures grpo and ppo with either engine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.models import build_tiny_model
from tests.engine_checks import assert_on_policy
from tests.torchrun import REPO, free_port, rank_env
from tests.unit.test_bench import _assert_ranks

TOLERANCE = 1e-4
ZERO = {2: {"zero_stage": 2}, 3: {"zero_stage": 3, "zero3_param_persistence_threshold": 0}}
TIMING = {"step_time_s", "tokens_per_s", "mfu", "rollout_s", "rollout/sync_s"}

# Runs the stage ({module}: grpo or ppo), and each rank SIGKILLs its own process right after step {last}'s metrics
# line, its last (two steps after the step-2 checkpoint, the last step writes none): nothing is closed, saved or
# flushed, the engines included, as a killed pod.
KILLED = """
import os, signal, sys
from components.training.loop import Session
record = Session.record
def record_then_die(self, step, *args, **kwargs):
    out = record(self, step, *args, **kwargs)
    if step + 1 == {last}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Session.record = record_then_die
from components.{module}.main import main
main(sys.argv[1:])
"""
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def run_stage(module: str, settings: dict, out: Path, nproc: int = 2, timeout: float = 600,
              script: Path | None = None) -> list[dict]:
    """`python -m components.<module>` (one process) or the same under torchrun with `nproc` processes (or
    `script` in its place, which must die); its metrics.jsonl rows. The output goes to `out`.log."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
    stage = [str(script) if script else "-m", *([] if script else [f"components.{module}"]), "--config", str(config)]
    cmd = [sys.executable, *stage] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), *stage]
    env = rank_env(tracking=False, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out.with_suffix(".log").write_text(done.stdout + done.stderr)
    assert (done.returncode != 0) == bool(script), done.stdout[-4000:] + done.stderr[-8000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def grpo_settings(model_dir: Path, zero_stage: int | None, steps: int = 3, lora: bool = False) -> dict:
    # 4 prompts × 4 samples a round, one optimizer step per round (each rank: 2 prompts, 8 samples), 3 rounds;
    # every sample logged (rank 0 logs its own); a checkpoint every 2 steps. LoRA: adapters on every linear
    # layer (dropout 0: the trainer's log-probs are the policy's), a larger lr for them
    return {"model": str(model_dir), "prompts": {"task": "arithmetic", "task_rows": 16},
            "prompts_per_round": 4, "num_generations": 4, "sampling": {"max_new_tokens": 8, "temperature": 1.0},
            "rollout": {"engine": "vllm", "sync_timeout_s": 120}, "samples_logged": 16,
            "rewards": [{"name": "format", "pattern": "(?s)[0-9A-Za-z].*"}], **({"lora": LORA} if lora else {}),
            "train": {"batch_size": 16, "lr": 3e-2 if lora else 3e-3, "max_steps": steps, "log_every": 1,
                      "precision": "fp32", "checkpoint_every": 2, **ZERO.get(zero_stage, {})}}


def killed_then_resumed(module: str, settings: dict, out: Path) -> list[dict]:
    """The stage killed (SIGKILL, every rank) after its last step's metrics line, then rerun into the same output
    directory: it resumes from the step-2 checkpoint (the engines start from the resumed weights), redoes steps 3
    and on, and its metrics are the killed run's. Those, returned, are the uninterrupted run's: the same process up
    to the kill, which comes after every step has run and been recorded. (samples.jsonl: the killed run's, in
    `out`.killed.)"""
    steps = settings["train"]["max_steps"]
    script = out.parent / f"killed_{module}.py"
    script.write_text(KILLED.replace("{module}", module).replace("{last}", str(steps)))
    hist = run_stage(module, settings, out, script=script)
    assert [h["step"] for h in hist] == list(range(1, steps + 1))
    assert not list(out.glob(f"**/step-{steps:08d}"))  # no checkpoint of the last step to resume from
    (out / "samples.jsonl").rename(out.with_suffix(".killed"))
    resumed = run_stage(module, settings, out)
    assert re.search(r"resumed from \S+step-00000002 at step 2", out.with_suffix(".log").read_text())
    assert [h["step"] for h in resumed] == [h["step"] for h in hist]
    for got, want in zip(resumed, hist):
        assert {k: v for k, v in got.items() if k not in TIMING} == pytest.approx(
            {k: v for k, v in want.items() if k not in TIMING}, rel=1e-5, abs=1e-6), got["step"]
    return hist


def logged_samples(path: Path) -> set[tuple]:
    return {(s["round"], s["prompt"], s["completion"], s["reward"], round(s["advantage"], 5))
            for s in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize(("zero_stage", "lora"), [pytest.param(2, False, id="2"), pytest.param(3, False, id="3"),
                                                  pytest.param(2, True, id="lora")])
def test_grpo_with_a_vllm_engine_per_rank_stays_on_policy(tmp_path, model_dir, zero_stage, lora):
    """ZeRO-2: the 2-rank run against one process, whose engine stays on policy too. ZeRO-3: killed and resumed.
    LoRA (the engines hold the merged weights, each sync pushes the adapted modules merged): both, the killed run's
    rows against one process."""
    steps = 3 if zero_stage == 2 and not lora else 4
    settings = grpo_settings(model_dir, zero_stage, steps, lora)
    out = tmp_path / f"zero{zero_stage}"
    if zero_stage == 3 or lora:
        hist = killed_then_resumed("grpo", settings, out)
        samples = out.with_suffix(".killed")
    else:
        hist, samples = run_stage("grpo", settings, out), out / "samples.jsonl"
    assert [h["step"] for h in hist] == list(range(1, steps + 1))
    gaps = [h["sampling/sampling_logp_difference/max"] for h in hist]
    assert all(gap < TOLERANCE for gap in gaps), gaps
    assert all(h["rollout/sync_s"] > 0 for h in hist[:-1]) and hist[-1]["rollout/sync_s"] == 0
    assert all(h["grad_norm"] > 0 for h in hist[:-1])  # the steps changed the policy, so a stale engine would show
    if zero_stage == 3:
        return
    # one process, one engine: a sample's seed depends on its place in the round, not on the ranks, so the
    # round samples the same completions, and the advantages, rewards and updates are those of the two ranks
    one = run_stage("grpo", grpo_settings(model_dir, None, steps, lora), tmp_path / "one", nproc=1)
    if not lora:  # its own engine on policy after each sync (with one skipped: tests/integration/test_vllm_rollout.py)
        assert_on_policy(one)
    two_samples, one_samples = logged_samples(samples), logged_samples(tmp_path / "one" / "samples.jsonl")
    assert len(two_samples) >= 8 and two_samples <= one_samples  # rank 0's samples, among all of them
    assert len({s[2] for s in one_samples}) > 4  # different completions, not one repeated
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "trained_tokens"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in one], rel=1e-6), key
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in one], rel=1e-4, abs=1e-6), key


def ppo_settings(model_dir: Path, zero_stage: int | None, steps: int = 3) -> dict:
    # 8 prompts a round (4 per rank), one completion each, one actor and one critic step per round, 3 rounds; a
    # checkpoint every 2 steps
    return {"model": str(model_dir), "prompts": {"task": "arithmetic", "task_rows": 16},
            "sampling": {"max_new_tokens": 8, "temperature": 1.0},
            "rollout": {"engine": "vllm", "sync_timeout_s": 120},
            "rewards": [{"name": "format", "pattern": "(?s)[0-9A-Za-z].*"}], "ppo_epochs": 1, "kl_coef": 0.1,
            "train": {"batch_size": 8, "lr": 3e-3, "max_steps": steps, "log_every": 1, "precision": "fp32",
                      "checkpoint_every": 2, **ZERO.get(zero_stage, {})}}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ppo_with_a_vllm_engine_per_rank_stays_on_policy(tmp_path, model_dir, zero_stage):
    """ppo measures the gap at each rollout (the actor's log-probs of the engine's samples, one more forward
    pass), so each round after the first checks the sync before it. ZeRO-3: killed and resumed (the actor, the
    critic, both optimizers and the KL coefficient from the checkpoint)."""
    steps = 4 if zero_stage == 3 else 3
    settings = ppo_settings(model_dir, zero_stage, steps)
    out = tmp_path / f"zero{zero_stage}"
    hist = killed_then_resumed("ppo", settings, out) if zero_stage == 3 else run_stage("ppo", settings, out)
    assert [h["step"] for h in hist] == list(range(1, steps + 1))
    gaps = [h["sampling/sampling_logp_difference/max"] for h in hist]
    assert all(gap < TOLERANCE for gap in gaps), gaps
    assert all(h["rollout/sync_s"] > 0 for h in hist[:-1]) and hist[-1]["rollout/sync_s"] == 0
    assert all(h["grad_norm"] > 0 for h in hist[:-1])
    if zero_stage == 3:
        return
    # one process: the same samples (seeded by their place in the round), so the same scores, KL and updates
    one = run_stage("ppo", ppo_settings(model_dir, None), tmp_path / "one", nproc=1)
    for key in ("objective/scores", "completions/mean_length", "trained_tokens"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in one], rel=1e-6), key
    # the KL reads the engines' log-probs, which move by ~1e-6 with the batch an engine runs
    for key in ("objective/kl", "loss", "grad_norm", "val/grad_norm"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in one], rel=1e-4, abs=1e-6), key


def test_sleep_while_training_is_refused_on_cpu_and_asks_vllm_for_sleep_mode_on_a_gpu():
    """vLLM has no sleep mode on CPU, so the setting cannot run here: it is refused before the engine starts (one
    line naming the key), and on a GPU it turns on vLLM's sleep mode. The sleep/wake itself is not testable on CPU."""
    from components.config import Invalid, UserError
    from components.training.config import RolloutEngine
    from components.training.engines import llm_arguments

    settings = RolloutEngine(engine="vllm", sleep_while_training=True)
    with pytest.raises(UserError, match="rollout.sleep_while_training needs a GPU"):
        llm_arguments(settings, Path("model"), seed=0, max_num_seqs=4, world_size=1, device_type="cpu")
    gpu = llm_arguments(settings, Path("model"), seed=0, max_num_seqs=4, world_size=1, device_type="cuda")
    assert gpu["enable_sleep_mode"] is True
    off = llm_arguments(RolloutEngine(engine="vllm"), Path("model"), seed=0, max_num_seqs=4, world_size=1,
                        device_type="cuda")
    assert "enable_sleep_mode" not in off
    with pytest.raises(Invalid, match="sleep_while_training"):
        RolloutEngine(engine="hf", sleep_while_training=True)


def test_bench_measures_each_rank_with_either_engine(capsys):
    """`posttrain bench --objectives grpo,ppo --rollout hf,vllm --nproc 2`: one line per objective and engine, in
    one run, each holding both ranks' sampled tokens, rate, sync seconds and peak memory (no timing asserted): each
    rank its own engine and its share of every round, the line holding each rank's numbers, with the bench's
    threads split over the ranks (one process: tests/unit/test_bench.py)."""
    from pipelines.bench.cli import main

    # (the demo model: head_dim 32, which vLLM's CPU attention supports; the tiny bench shape's 16 is below it)
    assert main(["--size", "demo", "--json", "--objectives", "grpo,ppo", "--rollout", "hf,vllm", "--nproc", "2",
                 "--prompt-len", "16", "--new-tokens", "12", "--grpo-steps", "2", "--grpo-warmup", "1",
                 "--grpo-batch-size", "16", "--group", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["what"], r["rollout"]) for r in lines] == [("posttrain_grpo", "hf"), ("posttrain_grpo", "vllm"),
                                                          ("posttrain_ppo", "hf"), ("posttrain_ppo", "vllm")]
    for line in lines:
        _assert_ranks(line, 2)
        assert line["threads"] == max(1, int(os.environ["POSTTRAIN_THREADS"]) // 2)  # the bench's, split
        assert line["nproc"] == 2 and [r["rank"] for r in line["ranks"]] == [0, 1]
        # every sampled token was sampled by one of the ranks' engines; 2 measured rounds of 16 sequences
        assert sum(r["completion_tokens"] for r in line["ranks"]) == line["completion_tokens"] <= 2 * 16 * 12
        for rank in line["ranks"]:
            assert rank["completion_tokens"] > 0 and rank["completion_tokens_per_s"] > 0
            assert rank["syncs"] == 1 and rank["peak_rss_gb"] > 0
        if line["rollout"] == "vllm":
            assert all(rank["sync_s"] > 0 for rank in line["ranks"])  # a push into each rank's own engine
            assert line["logprob_diff_max"] < TOLERANCE
