"""Resume: a run stopped at step k and restarted repeats the uninterrupted run's losses step by step."""

import json
import random

import pytest

from components.models import load_model, load_tokenizer
from components.training.batching import encode_example
from components.training.loop import TrainConfig, train


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
    cfg = TrainConfig(method=method, max_steps=7, batch_size=16, token_budget=128, lr=3e-3, warmup_steps=2,
                      updates_per_batch=3, checkpoint_every=2, seed=3)
    full = train(cfg, load_model(tiny_model_dir), exs, tmp_path / "a", pad_id=tok.pad_token_id)

    def crash_after_5(rec):
        if rec["step"] == 5:
            raise Stop  # after step 5's metrics, before its checkpoint: the latest checkpoint is step 4
    with pytest.raises(Stop):
        train(cfg, load_model(tiny_model_dir), exs, tmp_path / "b", pad_id=tok.pad_token_id, on_metrics=crash_after_5)
    ran = []
    resumed = train(cfg, load_model(tiny_model_dir), exs, tmp_path / "b", pad_id=tok.pad_token_id,
                    on_metrics=lambda rec: ran.append(rec["step"]))

    assert ran == [5, 6, 7]  # from the step-4 checkpoint (not a multiple of 3): π_old came from the checkpoint
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))
    assert resumed == lines  # the returned history holds the steps before the resume too
    for a, b in zip(full, lines):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
        assert a["entropy"] == b["entropy"]
    assert full[-1]["nll"] < full[0]["nll"]
