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


def test_psft_takes_each_blocks_first_pi_old_from_its_own_forward(tmp_path, tiny_model_dir, monkeypatch):
    """At the first step of a π_old block the policy is π_old: that step's own forward gives π_old's log-probs,
    one forward pass fewer per block, and the run is the one that computes them in a pass of their own, bit for
    bit. A model with dropout (a LoRA adapter's) keeps the pass: its training forward is not π_old's."""
    from peft import get_peft_model

    import components.sft.loop as loop
    from components.training.config import Adapter

    tok = load_tokenizer(tiny_model_dir)
    cfg = TrainConfig(max_steps=7, batch_size=16, token_budget=128, lr=3e-3, seed=3)
    objective = SFTObjective(method="psft", updates_per_batch=3)
    passes = []
    block = loop._old_logprobs_block

    def counted(*args, **kwargs):
        cache = block(*args, **kwargs)
        passes.append(sum(logprobs is not None for logprobs in cache.values()))
        return cache
    monkeypatch.setattr(loop, "_old_logprobs_block", counted)

    def run(out):
        passes.clear()
        lines = train(cfg, load_model(tiny_model_dir), _examples(tok), tmp_path / out, pad_id=tok.pad_token_id,
                      objective=objective)
        return [{k: v for k, v in line.items() if "time" not in k and "per_s" not in k} for line in lines], passes[:]

    own, own_passes = run("own")
    assert not loop.has_dropout(load_model(tiny_model_dir))
    monkeypatch.setattr(loop, "has_dropout", lambda model: True)
    second, second_passes = run("second")
    assert (own_passes, second_passes) == ([2, 2, 0], [3, 3, 1])  # blocks at steps 0, 3, 6 of 7
    assert own == second
    # π_old is the policy at each block's first step (0, 3, 6) and an older one after it
    assert [line["kl_old"] == 0 for line in own] == [True, False, False] * 2 + [True], own
    monkeypatch.undo()
    assert loop.has_dropout(get_peft_model(load_model(tiny_model_dir), Adapter(enabled=True).peft_config()))
    model = load_model(tiny_model_dir)
    model.config.attention_dropout = 0.1  # attention dropout is a function call: no module shows it
    assert loop.has_dropout(model)
