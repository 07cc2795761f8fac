"""Stage configs: every bad key or value is named with what is allowed."""

import pytest

from components.config import ConfigError, load_config
from components.sft.main import SFTConfig

BASE = "model: m\ntrain_data: d.jsonl\noutput_dir: out\n"


@pytest.mark.parametrize("extra, message", [
    ("lerning_rate: 0.1\n", "unknown key(s) 'lerning_rate'; allowed:"),
    ("lr: fast\n", "key 'lr' has value 'fast' of type str; expected float"),
    ("lr: -0.001\n", "lr=-0.001 is invalid: a positive number"),
    ("method: ppo\n", "method='ppo' is invalid: one of sft, psft, sft_kl"),
    ("batch_size: 0\n", "batch_size=0 is invalid: a positive integer"),
    ("overlong: wrap\n", "overlong='wrap' is invalid: drop or truncate"),
    ("zero_stage: 1\n", "zero_stage=1 is invalid: 2 or 3"),
    ("max_bad_fraction: 1.5\n", "max_bad_fraction=1.5 is invalid"),
    ("adam_betas: [0.9]\n", "adam_betas=[0.9] is invalid: two numbers in [0, 1)"),
    ("adam_betas: [1.5, 0.9]\n", "adam_betas=[1.5, 0.9] is invalid"),
    ("lr: .inf\n", "lr=inf is invalid: a positive number"),
    ("grad_clip: .nan\n", "grad_clip=nan is invalid: a number ≥ 0"),
    ("attn_implementation: sdpaa\n", "attn_implementation='sdpaa' is invalid: one of auto, sdpa,"),
    ("ref_model: r\n", "ref_model='r' is invalid with method sft: only sft_kl reads it"),
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
    with pytest.raises(ConfigError, match="missing required key.*'train_data'"):
        load_config(SFTConfig, f)


def test_valid_config_loads(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text(BASE + "method: psft\nupdates_per_batch: 8\nadam_betas: [0.9, 0.99]\n")
    cfg = load_config(SFTConfig, f)
    assert cfg.method == "psft" and cfg.updates_per_batch == 8 and cfg.adam_betas == (0.9, 0.99)


@pytest.mark.parametrize("module, cls, extra, key", [
    ("components.dpo.main", "DPOConfig", "train_data: d.jsonl\nmethod: psft\n", "method"),
    ("components.dpo.main", "DPOConfig", "train_data: d.jsonl\nepsilon_high: 0.3\n", "epsilon_high"),
    ("components.grpo.main", "GRPOConfig", "task: arithmetic\nupdates_per_batch: 4\n", "updates_per_batch"),
    ("components.grpo.main", "GRPOConfig", "task: arithmetic\nsft_warmup_steps: 5\n", "sft_warmup_steps"),
    ("components.grpo.main", "GRPOConfig", "task: arithmetic\nref_model: r\n", "ref_model"),
])
def test_training_keys_a_stage_does_not_read_are_refused(tmp_path, module, cls, extra, key):
    import importlib

    f = tmp_path / "stage.yaml"
    f.write_text("model: m\noutput_dir: out\n" + extra)
    with pytest.raises(ConfigError, match=f"{key}=.* is invalid( with beta 0)?: (not used by this stage|only)"):
        load_config(getattr(importlib.import_module(module), cls), f)


def test_grpo_reads_the_clip_range(tmp_path):
    from components.grpo.main import GRPOConfig

    f = tmp_path / "grpo.yaml"
    f.write_text("model: m\noutput_dir: out\ntask: arithmetic\nepsilon_high: 0.3\nmax_bad_fraction: 0.1\n")
    assert load_config(GRPOConfig, f).epsilon_high == 0.3
    f.write_text("model: m\noutput_dir: out\ntask: arithmetic\nmax_bad_fraction: 5\n")
    with pytest.raises(ConfigError, match=r"max_bad_fraction=5 is invalid: a number in \[0, 1\)"):
        load_config(GRPOConfig, f)


def test_stage_command_prints_a_config_error_without_a_traceback(tmp_path, capsys):
    from components.sft.main import main

    f = tmp_path / "sft.yaml"
    f.write_text(BASE + "lr: -1\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m components.sft: ") and "lr=-1 is invalid" in err and "Traceback" not in err
