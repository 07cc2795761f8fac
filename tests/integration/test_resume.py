"""Resume: a run stopped at step k and restarted repeats the uninterrupted run's losses step by step."""

import json
import random

import pytest

from components.datasets import write_jsonl
from components.models import load_model, load_tokenizer
from components.sft.config import SFTObjective
from components.sft.loop import train
from components.tasks import get_task
from components.training.batching import encode_example
from components.training.config import TrainConfig


class Stop(Exception):
    pass


def _examples(tok):
    rng = random.Random(0)
    return [encode_example(tok, f"{a}+{b}=", str(a + b)) for a, b in
            ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(200))]


@pytest.mark.parametrize("method", ["sft", "psft"])
def test_resume_matches_uninterrupted(tmp_path, tiny_model_dir, method):
    tok = load_tokenizer(tiny_model_dir)
    exs = _examples(tok)
    cfg = TrainConfig(max_steps=7, batch_size=16, token_budget=128, lr=3e-3, warmup_steps=2, checkpoint_every=2,
                      seed=3)
    objective = SFTObjective(method=method, updates_per_batch=3)
    full = train(cfg, load_model(tiny_model_dir), exs, tmp_path / "a", pad_id=tok.pad_token_id, objective=objective)

    def crash_after_5(rec):
        if rec["step"] == 5:
            raise Stop  # after step 5's metrics, before its checkpoint: the latest checkpoint is step 4
    with pytest.raises(Stop):
        train(cfg, load_model(tiny_model_dir), exs, tmp_path / "b", pad_id=tok.pad_token_id, objective=objective,
              on_metrics=crash_after_5)
    ran = []
    resumed = train(cfg, load_model(tiny_model_dir), exs, tmp_path / "b", pad_id=tok.pad_token_id, objective=objective,
                    on_metrics=lambda rec: ran.append(rec["step"]))

    assert ran == [5, 6, 7]  # from the step-4 checkpoint (not a multiple of 3): π_old came from the checkpoint
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))
    assert resumed == lines  # the returned history holds the steps before the resume too
    for a, b in zip(full, lines):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
        assert a["entropy"] == b["entropy"]
    assert full[-1]["nll"] < full[0]["nll"]


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_earlier_one_named(tmp_path, caplog):
    from components.training.loop import read_metrics_lines

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')  # the disk filled up
    with caplog.at_level("WARNING"):
        assert [record["step"] for _, record in read_metrics_lines(path)] == [1, 2]
    assert "dropped its torn last line 3" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        read_metrics_lines(path)


def test_a_changed_config_is_not_resumed_silently(tiny_model_dir, tmp_path):
    """A rerun into the same output_dir with another lr or method is refused, naming the keys; the override
    resumes anyway."""
    from components.config import from_mapping
    from components.sft.config import SFTConfig
    from components.sft.main import run
    from components.training.loop import ConfigChanged

    data = tmp_path / "train.jsonl"
    write_jsonl(data, get_task("arithmetic").generate(64, seed=0))
    settings = {"model": str(tiny_model_dir), "train_data": str(data), "output_dir": str(tmp_path / "out"),
                "max_length": 64, "train": {"max_steps": 4, "batch_size": 8, "token_budget": 256, "lr": 1e-3,
                                            "checkpoint_every": 2}}
    run(from_mapping(SFTConfig, settings))
    changed = {**settings, "objective": {"method": "psft"}, "train": {**settings["train"], "lr": 2e-3}}
    with pytest.raises(ConfigChanged, match=r"objective.method: 'sft' → 'psft'; train.lr: 0.001 → 0.002"):
        run(from_mapping(SFTConfig, changed))
    forced = {**changed, "train": {**changed["train"], "allow_config_change": True}}
    assert run(from_mapping(SFTConfig, forced))["steps"] == 4
    # a neutral key (how often to log) is not a change: the original config with it resumes without the override
    assert run(from_mapping(SFTConfig, {**settings, "train": {**settings["train"], "log_every": 1}}))["steps"] == 4
