"""Evaluation by generation during training (`eval.every`) on the tiny model: the numbers logged at the last step are
the evaluate stage's for the exported model; the reward-hacking watch fires on a reward that pays for length while
the held-out accuracy falls, and stays silent otherwise."""
import json
import logging
from pathlib import Path

import pytest

from components.config import ConfigError, from_mapping
from components.evaluate.config import EvaluateConfig
from components.evaluate.main import run as run_evaluate
from components.evaluation.during_training import HACKING_TAG, hacking_signal
from components.grpo.config import GRPOConfig
from components.grpo.main import run as run_grpo
from components.sft.config import SFTConfig

SUITE = {"task": "arithmetic", "n_prompts": 6, "seed": 3}
SAMPLING = {"max_new_tokens": 6}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_grpo_eval_at_the_last_step_equals_the_evaluate_stage(tiny_model_dir, tmp_path):
    cfg = from_mapping(GRPOConfig, {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "grpo"),
        "prompts": {"task": "arithmetic", "task_rows": 16}, "prompts_per_round": 2, "num_generations": 4,
        "sampling": {"max_new_tokens": 6, "temperature": 1.2},
        "rewards": [{"name": "task"}, {"name": "length", "max_length": 6, "cache": 6}],
        "train": {"batch_size": 8, "lr": 3e-3, "max_steps": 3, "log_every": 1},
        "eval": {"every": 2, "suites": [SUITE], **SAMPLING}})
    run_grpo(cfg)
    hist = lines(tmp_path / "grpo" / "metrics.jsonl")
    name = "eval/arithmetic-id"
    # due every 2 steps and at the last one; the training reward beside it in the same record
    assert [f"{name}/accuracy" in record for record in hist] == [False, True, True]
    assert {f"{name}/accuracy", f"{name}/pass@1", f"{name}/length", f"{name}/entropy", "reward"} <= set(hist[-1])
    assert hist[1][f"{name}/entropy"] != hist[2][f"{name}/entropy"]  # each evaluation sees the weights of its step

    ev = from_mapping(EvaluateConfig, {"model": str(tmp_path / "grpo" / "model"), "output_dir": str(tmp_path / "ev"),
                                       "suites": [SUITE], **SAMPLING, "bootstrap_samples": 10})
    metrics = run_evaluate(ev)["metrics"]
    for metric in ("accuracy", "pass@1", "length"):
        assert hist[-1][f"{name}/{metric}"] == metrics[f"arithmetic-id/{metric}"], metric
    assert hist[-1][f"{name}/entropy"] == pytest.approx(metrics["arithmetic-id/entropy"], rel=1e-5)


def test_sft_dpo_and_ppo_evaluate_too(tiny_model_dir, tmp_path):
    """The same `eval` part in the other training stages: every step's record (here every 2 steps and the last)."""
    from components.datasets import write_jsonl
    from components.dpo.config import DPOConfig
    from components.dpo.main import run as run_dpo
    from components.ppo.config import PPOConfig
    from components.ppo.main import run as run_ppo
    from components.sft.main import run as run_sft

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8)
                                         for b in range(4)])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                                           for a in range(8) for b in range(4)])
    evaluation = {"every": 2, "suites": [SUITE], **SAMPLING}
    train = {"max_steps": 3, "batch_size": 8, "lr": 1e-3}
    runs = {
        "sft": lambda out: run_sft(from_mapping(SFTConfig, {
            "model": str(tiny_model_dir), "train_data": str(tmp_path / "sft.jsonl"), "output_dir": str(out),
            "objective": {"method": "psft"}, "train": train, "eval": evaluation})),
        "dpo": lambda out: run_dpo(from_mapping(DPOConfig, {
            "model": str(tiny_model_dir), "train_data": str(tmp_path / "pairs.jsonl"), "output_dir": str(out),
            "train": train, "eval": evaluation})),
        "ppo": lambda out: run_ppo(from_mapping(PPOConfig, {
            "model": str(tiny_model_dir), "output_dir": str(out), "prompts": {"task": "arithmetic", "task_rows": 16},
            "preset": "a2c", "critic_init": "policy", "rewards": [{"name": "arithmetic"}],
            "sampling": {"max_new_tokens": 6}, "train": {**train, "batch_size": 4}, "eval": evaluation}))}
    for stage, run in runs.items():
        run(tmp_path / stage)
        hist = lines(tmp_path / stage / "metrics.jsonl")
        keys = [f"eval/arithmetic-id/{m}" for m in ("accuracy", "entropy", "length", "pass@1")]
        assert [sorted(k for k in record if k.startswith("eval/")) for record in hist] == [[], keys, keys], stage


def test_the_eval_part_is_checked_when_read():
    base = {"model": "m", "train_data": "d.jsonl", "output_dir": "o"}
    for change, message in [
            ({"every": 5}, "sft.yaml: eval.suites: [] is invalid: a non-empty list of suites with every 5"),
            ({"every": -1}, "sft.yaml: eval.every: -1 is invalid"),
            ({"every": 1, "suites": [{"task": "nope"}]}, "sft.yaml: eval: suites[0].task='nope' is invalid"),
            ({"samples": 2}, "sft.yaml: eval.samples: 2 is invalid: 1 with temperature 0"),
            ({"watch_window": 1}, "sft.yaml: eval.watch_window: 1 is invalid")]:
        with pytest.raises(ConfigError) as e:
            from_mapping(SFTConfig, {**base, "eval": change}, "sft.yaml")
        assert message in str(e.value), (change, str(e.value))
    cfg = from_mapping(SFTConfig, {**base, "eval": {"every": 2, "suites": [{"task": "arithmetic"}]}})
    assert cfg.eval.suites == [{"name": "arithmetic-id", "task": "arithmetic", "split": "id", "n_prompts": 200,
                                "seed": 0}]
    assert from_mapping(SFTConfig, base).eval.every == 0  # off by default


def evaluations(pairs, prompts_before=0):
    """Step records of a run evaluated every 2 steps: (training reward, held-out accuracy) per evaluation."""
    out, step = [], 0
    for reward, accuracy in pairs:
        for _ in range(2):
            step += 1
            out.append({"step": step, "reward": reward})
        out[-1]["eval/s/accuracy"] = accuracy
    return out


def test_the_reward_hacking_rule():
    # a reward that pays for length: it climbs while the verifier's accuracy on 200 held-out prompts falls
    hacked = evaluations([(0.20, 0.62), (0.45, 0.51), (0.78, 0.39)])
    signal = hacking_signal(hacked, "s", prompts=200, window=3)
    assert signal["reward"] == (0.20, 0.78) and signal["accuracy"] == (0.62, 0.39)
    assert signal["from_step"] == 2 and signal["to_step"] == 6 and 0 < signal["noise"] < 0.23
    # the same fall on 20 prompts is within noise (1.96 standard errors ≈ 0.30)
    assert hacking_signal(hacked, "s", prompts=20, window=3) is None
    # accuracy falls but the reward falls too: not hacking, a worse policy
    assert hacking_signal(evaluations([(0.8, 0.62), (0.5, 0.51), (0.2, 0.39)]), "s", 200, 3) is None
    # reward and accuracy rise together, or the accuracy wobbles within noise
    assert hacking_signal(evaluations([(0.2, 0.40), (0.5, 0.50), (0.8, 0.61)]), "s", 200, 3) is None
    assert hacking_signal(evaluations([(0.2, 0.50), (0.5, 0.53), (0.8, 0.47)]), "s", 200, 3) is None
    # the window: only the latest evaluations count (an early fall, since recovered, is old news)
    recovered = evaluations([(0.1, 0.70), (0.3, 0.40), (0.5, 0.41), (0.7, 0.42)])
    assert hacking_signal(recovered, "s", 200, 4) is not None and hacking_signal(recovered, "s", 200, 3) is None
    assert hacking_signal(evaluations([(0.2, 0.62)]), "s", 200, 3) is None  # one evaluation: nothing to compare


@pytest.fixture(scope="module")
def sevens(tiny_model_dir, tmp_path_factory):
    """A policy that answers 7 (SFT on `a+b=` → `7`, 20 steps), the prompts GRPO samples and a held-out suite whose
    answer is always 7: its verifier accuracy starts at 1."""
    from components.datasets import write_jsonl
    from components.sft.main import run as run_sft

    root = tmp_path_factory.mktemp("sevens")
    write_jsonl(root / "sft.jsonl", [{"prompt": f"{a}+{b}=", "completion": "7"} for a in range(10) for b in range(10)])
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"{a}*{b}=", "answer": "7", "task": "arithmetic"}
                                         for a in range(10) for b in range(10)])
    write_jsonl(root / "heldout.jsonl", [{"prompt": f"{a}-{b}=", "answer": "7", "task": "arithmetic"}
                                         for a in range(8) for b in range(5)])
    run_sft(from_mapping(SFTConfig, {"model": str(tiny_model_dir), "train_data": str(root / "sft.jsonl"),
                                     "output_dir": str(root / "sft"),
                                     "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3}}))
    return root


def grpo_paid_for_length(root, out, lr, **train):
    """GRPO whose only reward pays for length (1 for a completion of 4 characters or more), evaluated every step on
    the held-out suite; `train`: more train settings."""
    return run_grpo(from_mapping(GRPOConfig, {
        "model": str(root / "sft" / "model"), "output_dir": str(out), "prompts": {"path": str(root / "prompts.jsonl")},
        "prompts_per_round": 4, "num_generations": 8, "sampling": {"max_new_tokens": 8, "temperature": 1.5},
        "rewards": [{"name": "format", "pattern": "(?s).{4,}"}],
        "train": {"batch_size": 32, "lr": lr, "max_steps": 4, **train},
        "eval": {"every": 1, "suites": [{"name": "sevens", "data": str(root / "heldout.jsonl")}],
                 "max_new_tokens": 8}}))


def hacking_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "possible reward hacking" in r.getMessage()]


def test_a_reward_that_pays_for_length_is_flagged(sevens, tmp_path, tracking_env, caplog):
    """The policy learns to write long answers: the reward climbs to 1 and the held-out accuracy falls to 0. The
    warning line names both, the stage's MLflow run is tagged, and MLflow gets pass@1 as pass_at_1."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, "components.evaluation")
    out = tmp_path / "hacked"
    grpo_paid_for_length(sevens, out, lr=3e-3)
    hist = lines(out / "metrics.jsonl")
    assert hist[0]["eval/sevens/accuracy"] == 1.0 and hist[-1]["eval/sevens/accuracy"] < 0.5
    assert hist[-1]["reward"] > hist[0]["reward"]
    warnings = hacking_warnings(caplog)
    assert warnings and "eval/sevens/accuracy fell 1.000 → " in warnings[0]
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking_env.env["POSTTRAIN_EXPERIMENT"])
    [mlrun] = client.search_runs([experiment.experiment_id], f"params.output_dir = '{out}'")
    assert mlrun.data.tags[HACKING_TAG].startswith("possible reward hacking: from step 1 to step")
    assert "eval/sevens/pass_at_1" in mlrun.data.metrics and "reward" in mlrun.data.metrics


def test_the_best_checkpoint_is_exported_and_registered(sevens, tmp_path, tracking_env):
    """The same hacked run, ranked by the held-out accuracy (train.keep_top_k, export best): the stage outputs the
    best checkpoint, not the last step, and says which in summary.json; the evaluate stage measures the exported
    model at that step's logged accuracy, and the registry's version holds those weights."""
    import hashlib

    import mlflow
    from mlflow import MlflowClient

    from components.register.main import log_and_register

    out = tmp_path / "ranked"
    summary = grpo_paid_for_length(sevens, out, lr=3e-3, checkpoint_every=1, keep_checkpoints=1, keep_top_k=1,
                                   checkpoint_metric="eval/sevens/accuracy", export="best")
    hist = lines(out / "metrics.jsonl")
    accuracy = {record["step"]: record["eval/sevens/accuracy"] for record in hist}
    assert accuracy[4] < 0.5  # the last step is not the best
    best = max(accuracy[step] for step in (1, 2, 3))
    assert summary["export_step"] == max(step for step in (1, 2, 3) if accuracy[step] == best)  # a tie: the later
    assert summary["export_value"] == best and summary["export_metric"] == "eval/sevens/accuracy"
    assert json.loads((out / "summary.json").read_text())["export_step"] == summary["export_step"]
    kept = {p.name for p in (out / "checkpoints").glob("step-*")}
    assert kept == {f"step-{summary['export_step']:08d}", "step-00000003"}  # the best and the latest
    run_evaluate(from_mapping(EvaluateConfig, {
        "model": str(out / "model"), "output_dir": str(tmp_path / "eval"), "max_new_tokens": 8,
        "suites": [{"name": "sevens", "data": str(sevens / "heldout.jsonl")}], "bootstrap_samples": 100}))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["sevens/accuracy"] == pytest.approx(best)

    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name(tracking_env.env["POSTTRAIN_EXPERIMENT"]).experiment_id)
    name = f"ranked-{run.info.run_id[:8]}"
    version, _ = log_and_register(client, out / "model", name, run.info.run_id, {})
    client.set_terminated(run.info.run_id)
    registered = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "reg"))

    def digest(directory):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(directory).glob("*.safetensors"))))

    assert digest(registered).hexdigest() == digest(out / "model").hexdigest()


def test_a_rising_reward_with_a_steady_accuracy_is_not_flagged(sevens, tmp_path, caplog):
    """At a lower learning rate the reward rises as much while the greedy answer stays 7: no warning."""
    caplog.set_level(logging.WARNING, "components.evaluation")
    out = tmp_path / "honest"
    grpo_paid_for_length(sevens, out, lr=1e-3)
    hist = lines(out / "metrics.jsonl")
    assert hist[-1]["reward"] > hist[0]["reward"] + 0.5
    assert all(record["eval/sevens/accuracy"] == 1.0 for record in hist)
    assert not hacking_warnings(caplog)


def test_two_ranks_evaluate_their_shards_and_agree_with_one(tiny_model_dir, tmp_path):
    """sft under torchrun, 2 ranks, ZeRO-3 with every parameter partitioned (every forward a collective): each rank
    samples its shard (3 and 2 prompts; 1 and 0 for the one-prompt suite, whose idle rank joins the other's decode
    steps) and every rank gets every shard: the numbers of one process (samples are seeded per prompt)."""
    import subprocess
    import sys

    import yaml

    from components.datasets import write_jsonl
    from components.tasks import get_task
    from tests.torchrun import REPO, free_port, rank_env

    data = tmp_path / "train.jsonl"
    write_jsonl(data, get_task("arithmetic").generate(64, seed=0))
    suites = [{"task": "arithmetic", "n_prompts": 5, "seed": 3}, {"name": "one", "task": "arithmetic", "n_prompts": 1}]
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        train = {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "precision": "fp32", "log_every": 1,
                 **({"zero_stage": 3, "zero3_param_persistence_threshold": 0} if world > 1 else {})}
        config = tmp_path / f"w{world}.yaml"
        evaluation = {"every": 1, "suites": suites, "samples": 2, "k": [1, 2], "temperature": 1.0, **SAMPLING}
        config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "train_data": str(data), "output_dir": str(out),
                                          "train": train, "eval": evaluation}))
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port())] if world > 1 else [sys.executable])
        proc = subprocess.run([*launch, "-m", "components.sft", "--config", str(config)], cwd=REPO,
                              env=rank_env(tracking=False), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-6000:]
        outs[world] = lines(out / "metrics.jsonl")
    for one, two in zip(outs[1], outs[2]):
        evals = sorted(key for key in one if key.startswith("eval/"))
        assert len(evals) == 10 and evals == sorted(key for key in two if key.startswith("eval/"))
        for key in evals:
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
