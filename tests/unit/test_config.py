"""Stage configs: every bad key or value is named with what is allowed."""

import pytest

from components.config import ConfigError, load_config
from components.sft.config import SFTConfig

BASE = "model: m\ntrain_data: d.jsonl\noutput_dir: out\n"


@pytest.mark.parametrize("extra, message", [
    ("lerning_rate: 0.1\n", "lerning_rate: unknown key; allowed:"),
    ("lr: 0.1\n", "lr: unknown key here; it is a key of `train`: write train: {lr: 0.1}"),
    ("train: {lr: fast}\n", "train.lr: 'fast' is invalid: a number"),
    ("train: {lr: -0.001}\n", "train.lr: -0.001 is invalid: a positive number"),
    ("objective: {method: ppo}\n", "objective.method: 'ppo' is invalid: one of sft, psft, sft_kl"),
    ("train: {batch_size: 0}\n", "train.batch_size: 0 is invalid: a positive integer"),
    ("overlong: wrap\n", "overlong: 'wrap' is invalid: drop or truncate"),
    ("train: {zero_stage: 1}\n", "train.zero_stage: 1 is invalid: 2 or 3"),
    ("max_bad_fraction: 1.5\n", "max_bad_fraction: 1.5 is invalid"),
    ("train: {adam_betas: [0.9]}\n", "train.adam_betas: [0.9] is invalid: two numbers in [0, 1)"),
    ("train: {adam_betas: [1.5, 0.9]}\n", "train.adam_betas: [1.5, 0.9] is invalid"),
    ("train: {lr: .inf}\n", "train.lr: inf is invalid: a positive number"),
    ("train: {grad_clip: .nan}\n", "train.grad_clip: nan is invalid: a number ≥ 0"),
    ("loading: {attn_implementation: sdpaa}\n", "loading.attn_implementation: 'sdpaa' is invalid: one of auto, sdpa,"),
    ("ref_model: r\n", "ref_model: 'r' is invalid: unset with method sft: only sft_kl reads it"),
])
def test_bad_values_are_named(tmp_path, extra, message):
    f = tmp_path / "sft.yaml"
    f.write_text(BASE + extra)
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, f)
    assert str(e.value).startswith(str(f)) and message in str(e.value)


def test_missing_required_key(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("model: m\n")
    with pytest.raises(ConfigError, match="train_data: missing; this key is required"):
        load_config(SFTConfig, f)


def test_valid_config_loads(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text(BASE + "objective: {method: psft, updates_per_batch: 8}\ntrain: {adam_betas: [0.9, 0.99], lr: 1e-4}\n")
    cfg = load_config(SFTConfig, f)
    assert cfg.objective.method == "psft" and cfg.objective.updates_per_batch == 8
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.train.lr == 1e-4  # YAML reads 1e-4 as a string; a float key takes it


def test_a_part_keeps_the_stages_own_defaults(tmp_path):
    from components.grpo.config import GRPOConfig

    f = tmp_path / "grpo.yaml"
    f.write_text("model: m\noutput_dir: out\nprompts: {task: arithmetic}\ntrain: {lr: 0.001}\n")
    cfg = load_config(GRPOConfig, f)
    assert cfg.train.lr == 0.001 and cfg.train.batch_size == 128  # GRPO's own default, not TrainConfig's 32


@pytest.mark.parametrize("module, cls, extra, message", [
    ("components.dpo.main", "DPOConfig", "train_data: d.jsonl\nmethod: psft\n", "method: unknown key"),
    ("components.dpo.main", "DPOConfig", "train_data: d.jsonl\nepsilon_high: 0.3\n", "epsilon_high: unknown key"),
    ("components.grpo.main", "GRPOConfig", "prompts: {task: arithmetic}\nupdates_per_batch: 4\n",
     "updates_per_batch: unknown key"),
    ("components.grpo.main", "GRPOConfig", "prompts: {task: arithmetic}\nsft_warmup_steps: 5\n",
     "sft_warmup_steps: unknown key"),
    ("components.grpo.main", "GRPOConfig", "prompts: {task: arithmetic}\nref_model: r\n",
     "ref_model: 'r' is invalid: unset with beta 0"),
])
def test_keys_a_stage_does_not_read_are_refused(tmp_path, module, cls, extra, message):
    import importlib

    f = tmp_path / "stage.yaml"
    f.write_text("model: m\noutput_dir: out\n" + extra)
    with pytest.raises(ConfigError, match=message):
        load_config(getattr(importlib.import_module(module), cls), f)


def test_grpo_reads_the_clip_range(tmp_path):
    from components.grpo.config import GRPOConfig

    f = tmp_path / "grpo.yaml"
    f.write_text("model: m\noutput_dir: out\nprompts: {task: arithmetic, max_bad_fraction: 0.1}\nepsilon_high: 0.3\n")
    assert load_config(GRPOConfig, f).epsilon_high == 0.3
    f.write_text("model: m\noutput_dir: out\nprompts: {task: arithmetic, max_bad_fraction: 5}\n")
    with pytest.raises(ConfigError, match=r"prompts.max_bad_fraction: 5.0 is invalid: a number in \[0, 1\)"):
        load_config(GRPOConfig, f)


def test_stage_command_prints_a_config_error_without_a_traceback(tmp_path, capsys):
    from components.sft.main import main

    f = tmp_path / "sft.yaml"
    f.write_text(BASE + "train: {lr: -1}\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (err.startswith("python -m components.sft: ") and "train.lr: -1.0 is invalid" in err
            and "Traceback" not in err)
