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
