"""Asynchronous RL on CPU with real vLLM: grpo and ppo with a rollout worker (a vLLM engine in a process of its own,
components/training/rollout_worker.py) over the tiny model, a few one-step rounds of 16 samples each.

- max_staleness 0 (grpo and ppo): the metrics and samples equal the colocated synchronous loop's for the same seed;
- ppo with max_staleness 1: no trained sample is more than one version old, the loss corrected per sequence with
  masked importance weights; and (the hf engine, no vLLM) ppo's correction weighs the actor's loss, not the critic's;
- max_staleness 1: no trained sample is more than one version old (from the logged versions), and each round's
  engine log-probs equal the trainer's under the weights of the version it names (≤ 1e-4, fp32); with a corrupted
  push the second check fails;
- the worker killed mid-round is restarted and caught up, and the run finishes with every round's samples trained
  once; with rollout_worker_restarts 0 (the step raises EngineSyncError), and with the trainer killed with -9
  mid-step (its worker dies with it), the run resumed from its checkpoint does.
"""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from components.config import from_mapping
from components.grpo.config import GRPOConfig
from components.grpo.main import run as run_grpo
from components.models import load_model, load_tokenizer
from components.ppo.config import PPOConfig
from components.ppo.main import run as run_ppo
from components.training import rollout_worker
from components.training.batching import Example, micro_batches
from components.training.engines import EngineSyncError
from components.training.loop import forward_logprobs

ROUND = 16  # prompts_per_round 4 × num_generations 4, one optimizer step per round
TIMING = ("_s", "tokens_per_s", "mfu", "samples_per_s", "steps_per_s")


@pytest.fixture(autouse=True)
def small_engine(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


STAGES = {"grpo": (GRPOConfig, run_grpo), "ppo": (PPOConfig, run_ppo)}
ROUNDS = {"grpo": {"prompts_per_round": 4, "num_generations": 4},  # one step per round of ROUND samples each
          "ppo": {"ppo_epochs": 1, "num_minibatches": 1}}


def mapping(model_dir, out, max_steps=3, stage="grpo", **keys):
    return {"model": str(model_dir), "output_dir": str(out), "prompts": {"task": "arithmetic", "task_rows": 16},
            **ROUNDS[stage], "samples_logged": ROUND,
            "sampling": {"max_new_tokens": 8, "temperature": 1.0}, "rollout": {"engine": "vllm", "sync_timeout_s": 60},
            "rewards": [{"name": "format", "pattern": "(?s)[0-9A-Za-z].*"}],
            "train": {"batch_size": ROUND, "lr": 3e-3, "max_steps": max_steps, "log_every": 1}, **keys}


def config(model_dir, out, stage="grpo", **keys):
    return from_mapping(STAGES[stage][0], mapping(model_dir, out, stage=stage, **keys))


def run(stage, cfg):
    return STAGES[stage][1](cfg)


def numbers(record):
    return {k: v for k, v in record.items() if not k.startswith("async/") and not k.endswith(TIMING)}


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_max_staleness_0_equals_the_synchronous_loop(tiny_model_dir, tmp_path, stage):
    run(stage, config(tiny_model_dir, tmp_path / "sync", stage))
    run(stage, config(tiny_model_dir, tmp_path / "worker", stage, rollout_worker=True))
    sync, worker = lines(tmp_path / "sync" / "metrics.jsonl"), lines(tmp_path / "worker" / "metrics.jsonl")
    assert [numbers(r) for r in worker] == [numbers(r) for r in sync] and len(sync) == 3
    assert [r["async/staleness"] for r in worker] == [0, 0, 0] and worker[-1]["async/staleness_hist/0"] == 3 * ROUND
    samples = lines(tmp_path / "worker" / "samples.jsonl")
    assert [r["version"] for r in samples] == [r["round"] - 1 for r in samples]
    assert [{k: v for k, v in r.items() if k not in ("version", "sample")} for r in samples] == \
        lines(tmp_path / "sync" / "samples.jsonl")


def test_ppo_max_staleness_1_trains_no_sample_older_than_one_version(tiny_model_dir, tmp_path):
    out = tmp_path / "k1"
    run_ppo(config(tiny_model_dir, out, "ppo", rollout_worker=True, max_staleness=1, tis_cap=2.0,
                   tis_level="sequence", tis_mode="mask"))
    samples = lines(out / "samples.jsonl")
    ages = Counter(r["round"] - 1 - r["version"] for r in samples)
    assert ages == {0: ROUND, 1: 2 * ROUND}  # round 1 from the start, rounds 2-3 one version behind: none older
    metrics = lines(out / "metrics.jsonl")
    assert [m["async/staleness"] for m in metrics] == [0, 1, 1] and metrics[-1]["async/dropped"] == 0
    assert metrics[1]["sampling/sampling_logp_difference/max"] > 1e-2  # the stale round's gap to the actor
    masked = [m["rollout_corr/rollout_rs_masked_fraction"] for m in metrics]
    assert masked[0] == 0.0 and all(0.0 <= f <= 1.0 for f in masked), masked  # round 1: the actor's own weights


def test_ppo_tis_weighs_the_actors_loss_and_not_the_critics(tiny_model_dir, tmp_path, monkeypatch):
    """The hf engine (the actor samples: ρ = 1 up to float noise), one step; then every weight halved: the actor's
    loss and gradient halve, the critic's do not move."""
    from components.training import rl_loop

    keys = dict(rollout={"engine": "hf"}, tis_cap=2.0, max_steps=1, whiten_advantages=False)
    run_ppo(config(tiny_model_dir, tmp_path / "one", "ppo", **keys))
    real = rl_loop.importance_weights
    monkeypatch.setattr(rl_loop, "importance_weights", lambda *a, **k: (lambda w, b: (w / 2, b))(*real(*a, **k)))
    run_ppo(config(tiny_model_dir, tmp_path / "half", "ppo", **keys))
    [one], [half] = lines(tmp_path / "one" / "metrics.jsonl"), lines(tmp_path / "half" / "metrics.jsonl")
    assert one["rollout_corr/rollout_is_ratio_fraction_high"] == 0.0 and abs(one["loss/policy_avg"]) > 1e-4
    for key in ("loss/policy_avg", "grad_norm"):
        assert half[key] == pytest.approx(one[key] / 2, rel=1e-5), key
    assert (half["loss/value_avg"], half["val/grad_norm"]) == (one["loss/value_avg"], one["val/grad_norm"])


def engine_gaps(model_dir, snapshots, taken):
    """The largest |engine − trainer| log-prob of each taken round, the trainer holding the weights of the version
    the round names."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    gaps = {}
    for round_index, (rollout, version) in taken.items():
        model.load_state_dict(snapshots[version])
        examples = [Example(p + c, len(p)) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
        [mb] = micro_batches(examples, 100_000, tok.pad_token_id, single_row=True)
        with torch.no_grad():
            logp, _ = forward_logprobs(model, mb, 64, autocast=False)
        trainer = [logp[(mb.seq_index == i) & (mb.loss_mask > 0)] for i in range(len(examples))]
        gaps[round_index] = max(float((a - b).abs().max()) for a, b in zip(trainer, rollout.logprobs) if len(b))
    return gaps


def watched_run(model_dir, out, monkeypatch, corrupt_version=None):
    """A max_staleness 1 run of 4 rounds; every pushed version's weights and every taken round, as the trainer saw
    them. corrupt_version: that push sends weights off by 1e-2 (the version it names is right)."""
    snapshots, taken = {}, {}
    real_push, real_take, real_flat = (rollout_worker.RolloutWorker.push, rollout_worker.RolloutWorker.take,
                                       rollout_worker.flat_weights)

    def push(self, model, version):
        snapshots[version] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if version == corrupt_version:
            monkeypatch.setattr(rollout_worker, "flat_weights", lambda m: (lambda f, meta: (f + 1e-2, meta))(
                *real_flat(m)))
        real_push(self, model, version)
        monkeypatch.setattr(rollout_worker, "flat_weights", real_flat)

    def take(self, round_index):
        rollout, version, seconds = real_take(self, round_index)
        taken[round_index] = (rollout, version)
        return rollout, version, seconds

    monkeypatch.setattr(rollout_worker.RolloutWorker, "push", push)
    monkeypatch.setattr(rollout_worker.RolloutWorker, "take", take)
    run_grpo(config(model_dir, out, max_steps=4, rollout_worker=True, max_staleness=1, tis_cap=2.0))
    monkeypatch.undo()
    return snapshots, taken


def test_max_staleness_1_trains_no_older_sample_and_samples_with_the_pushed_weights(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    snapshots, taken = watched_run(tiny_model_dir, tmp_path / "k1", monkeypatch)
    samples = lines(tmp_path / "k1" / "samples.jsonl")
    ages = Counter(r["round"] - 1 - r["version"] for r in samples)
    assert ages == {0: ROUND, 1: 3 * ROUND}  # round 1 from the start, rounds 2-4 one version behind: none older
    metrics = lines(tmp_path / "k1" / "metrics.jsonl")
    assert [m["async/staleness"] for m in metrics] == [0, 1, 1, 1] and metrics[-1]["async/dropped"] == 0
    assert metrics[-1]["async/staleness_hist/1"] == 3 * ROUND
    assert metrics[1]["sampling/sampling_logp_difference/max"] > 1e-2  # the stale rounds' gap to the trainer
    gaps = engine_gaps(tiny_model_dir, snapshots, taken)
    assert sorted(gaps) == [0, 1, 2, 3] and max(gaps.values()) <= 1e-4, gaps

    # the same check on a run whose push of version 1 carries other weights: it fails on the round sampled with it
    snapshots, taken = watched_run(tiny_model_dir, tmp_path / "corrupt", monkeypatch, corrupt_version=1)
    gaps = engine_gaps(tiny_model_dir, snapshots, taken)
    assert gaps[2] > 1e-3 and max(gaps[0], gaps[1], gaps[3]) <= 1e-4, gaps


def assert_every_sample_trained_once(out, rounds):
    """samples.jsonl (every sample of a round logged) holds each round's samples exactly once, and metrics.jsonl
    each step once."""
    samples = lines(Path(out) / "samples.jsonl")
    counted = Counter((r["round"], r["sample"]) for r in samples)
    assert set(counted) == {(r, s) for r in range(1, rounds + 1) for s in range(ROUND)}, "a sample is lost"
    assert max(counted.values()) == 1, "a sample is trained twice"
    assert [m["step"] for m in lines(Path(out) / "metrics.jsonl")] == list(range(1, rounds + 1))


def kill_the_worker_once_round_4_is_requested(monkeypatch):
    real_request, killed = rollout_worker.RolloutWorker.request, []

    def request(self, round_index, *args, **kwargs):
        real_request(self, round_index, *args, **kwargs)
        if round_index == 3 and not killed:  # round 4 in flight (round 3 sampled, round 2's step done)
            killed.append(self.proc.pid)
            os.kill(self.proc.pid, signal.SIGKILL)

    monkeypatch.setattr(rollout_worker.RolloutWorker, "request", request)
    return killed


def test_the_worker_killed_mid_round_is_restarted_and_caught_up(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    killed = kill_the_worker_once_round_4_is_requested(monkeypatch)
    run_grpo(config(tiny_model_dir, out, max_steps=4, rollout_worker=True, max_staleness=1, tis_cap=2.0))
    assert killed  # and the run finished in one go, every round's samples trained once
    assert_every_sample_trained_once(out, 4)
    metrics = lines(out / "metrics.jsonl")
    assert [m["async/restarts"] for m in metrics] in ([0, 0, 1, 1], [0, 0, 0, 1])  # noticed at round 3 or 4
    assert all(0 <= m["async/staleness"] <= 1 for m in metrics)


def test_the_worker_killed_mid_round_stops_the_step_and_the_run_resumes(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    keys = dict(max_steps=4, rollout_worker=True, max_staleness=1, tis_cap=2.0, rollout_worker_restarts=0,
                train={"batch_size": ROUND, "lr": 3e-3, "max_steps": 4, "log_every": 1, "checkpoint_every": 2})
    kill_the_worker_once_round_4_is_requested(monkeypatch)
    with pytest.raises(EngineSyncError, match="exited with code -9|connection closed"):
        run_grpo(config(tiny_model_dir, out, **keys))
    monkeypatch.undo()
    assert [m["step"] for m in lines(out / "metrics.jsonl")][:2] == [1, 2]
    run_grpo(config(tiny_model_dir, out, **keys))  # resumes at step 2 (version 2): rounds 3 and 4 replayed
    assert_every_sample_trained_once(out, 4)
    assert [r["version"] for r in lines(out / "samples.jsonl")][::ROUND] == [0, 0, 2, 2]
    last = lines(out / "metrics.jsonl")[-1]  # the counts go on from the checkpoint's
    assert (last["async/staleness_hist/0"], last["async/staleness_hist/1"], last["async/dropped"]) == (2 * ROUND,
                                                                                                      2 * ROUND, 0)


def _children(pid):
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(x) for x in (task / "children").read_text().split()}
    return found


def test_the_trainer_killed_mid_step_takes_its_worker_along_and_the_run_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    spec = mapping(tiny_model_dir, out, max_steps=4, rollout_worker=True, max_staleness=1, tis_cap=2.0,
                   train={"batch_size": ROUND, "lr": 3e-3, "max_steps": 4, "log_every": 1, "checkpoint_every": 2})
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(spec))
    trainer = subprocess.Popen([sys.executable, "-m", "components.grpo", "--config", str(tmp_path / "grpo.yaml")],
                               cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and len(lines(out / "metrics.jsonl")) >= 3):
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = _children(trainer.pid)
        assert workers  # its rollout worker
        trainer.kill()  # in step 4 (round 4), after the checkpoint of step 2
        trainer.wait()
    finally:
        if trainer.poll() is None:
            trainer.kill()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in workers):
        assert time.monotonic() < deadline, "the worker outlived its trainer"
        time.sleep(0.1)
    run_grpo(from_mapping(GRPOConfig, spec))
    assert_every_sample_trained_once(out, 4)


def test_bench_async_runs_beside_the_synchronous_line(capsys):
    from pipelines.bench.cli import main

    assert main(["--size", "demo", "--json", "--objectives", "grpo", "--async", "1", "--prompt-len", "16",
                 "--new-tokens", "12", "--grpo-steps", "2", "--grpo-warmup", "1", "--grpo-batch-size", "16",
                 "--group", "4"]) == 0
    sync, ahead = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert "error" not in sync and "error" not in ahead, (sync, ahead)
    assert sync["rollout"] == ahead["rollout"] == "vllm" and "async" not in sync and ahead["async"] == 1
    # the synchronous line is the colocated vllm engine's bench line: its weights synced, on policy after each sync
    assert sync["what"] == "posttrain_grpo" and sync["rollout_cache"] == "vllm" and sync["sync_s"] > 0
    assert sync["logprob_diff_max"] < 1e-4
    assert ahead["trainer_cpus"] and ahead["worker_cpus"] and not set(ahead["trainer_cpus"]) & set(ahead["worker_cpus"])
    for line in (sync, ahead):
        assert 2 * 16 <= line["completion_tokens"] <= 2 * 16 * 12 and line["completion_tokens_per_s"] > 0
        assert 0 <= line["reward"] <= 1
    assert ahead["staleness_hist"] == {"0": 16, "1": 32} and ahead["dropped"] == 0  # rounds 2-3 one version behind
