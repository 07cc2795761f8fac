"""Never train on garbage or register a broken model: a diverged stage stops in one line and saves nothing,
register refuses a non-finite model or one without its evaluation, a corrupt latest checkpoint gives way to
the previous intact one, and changed data under the same path is refused like a changed config."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from components.config import UserError, from_mapping
from components.datasets import write_jsonl
from components.models import load_model, load_tokenizer
from components.sft.loop import train
from components.tasks import get_task
from components.training.batching import encode_example
from components.training.config import TrainConfig
from components.training.loop import ConfigChanged


def _pairs(path):
    write_jsonl(path, [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                       for a in range(6) for b in range(4)])
    return path


def test_a_diverged_dpo_stage_fails_in_one_line_naming_the_step_and_saves_nothing(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """lr 1e30 (the pipeline's --param dpo_lr=1e30): the stage exits 2 with one line naming the step, and writes
    no model for evaluate or register to pick up."""
    import yaml

    from components.dpo.main import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "dpo"
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "train_data": str(_pairs(tmp_path / "p.jsonl")),
                                      "output_dir": str(out), "train": {"max_steps": 4, "batch_size": 8,
                                                                        "token_budget": 64, "lr": 1e30}}))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("python -m components.dpo")]  # (not progress bars)
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert re.search(r": step \d/4: loss nan .*training diverged.*lower train.lr \(now 1e\+30\)", errors[0]), err
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def _nonfinite_model(tiny_model_dir, path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, path)
    weights = load_file(path / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return name


def test_register_refuses_a_nonfinite_model_and_a_missing_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """Refused before anything reaches MLflow (the URI here leads nowhere), whatever the evaluate settings."""
    from components.register.config import RegisterConfig
    from components.register.main import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps({"metrics": {"arithmetic-id/accuracy": 0.5}}))
    bad = _nonfinite_model(tiny_model_dir, tmp_path / "nan-model")

    def register(model, **kw):
        return run(from_mapping(RegisterConfig, {"model": str(model), "name": "guarded",
                                                 "output_dir": str(tmp_path / "reg"), **kw}, "register"))

    with pytest.raises(UserError, match=rf"model.safetensors: 1 of \d+ tensors are not finite \(first: {bad}\)"):
        register(tmp_path / "nan-model", eval=str(eval_path))
    with pytest.raises(UserError, match=r"no evaluation of .* \(eval is not set\)"):
        register(tiny_model_dir)
    eval_path.write_text(json.dumps({"metrics": {}}))
    with pytest.raises(UserError, match=r"no evaluation of .* \(eval has no metrics\)"):
        register(tiny_model_dir, eval=str(eval_path))
    assert not (tmp_path / "reg" / "register.json").exists()


def _examples(tok):
    return [encode_example(tok, f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class Stop(Exception):
    pass


@pytest.mark.parametrize("damage", ["flip 4 KiB", "truncate"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, caplog, damage):
    """Checkpoints at steps 2 and 4, a crash after step 5, step 4's state.pt damaged: the resume says so in one
    line, starts from step 2, and ends with the uninterrupted run's weights and losses."""
    tok = load_tokenizer(tiny_model_dir)
    cfg = TrainConfig(max_steps=6, batch_size=8, token_budget=128, lr=3e-3, checkpoint_every=2, seed=1)
    full_model = load_model(tiny_model_dir)
    full = train(cfg, full_model, _examples(tok), tmp_path / "a", pad_id=tok.pad_token_id)

    def crash_after_5(record):
        if record["step"] == 5:
            raise Stop
    with pytest.raises(Stop):
        train(cfg, load_model(tiny_model_dir), _examples(tok), tmp_path / "b", pad_id=tok.pad_token_id,
              on_metrics=crash_after_5)
    state = tmp_path / "b" / "checkpoints" / "step-00000004" / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(byte ^ 0xFF for byte in data[middle:middle + 4096])
    state.write_bytes(bytes(data))

    ran, model = [], load_model(tiny_model_dir)
    with caplog.at_level("WARNING", logger="components.training.loop"):
        resumed = train(cfg, model, _examples(tok), tmp_path / "b", pad_id=tok.pad_token_id,
                        on_metrics=lambda record: ran.append(record["step"]))
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "step-00000004: state.pt" in warnings[0] and "step-00000002" in warnings[0]
    assert ran == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    expected, got = _state(full_model), _state(model)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_changed_data_under_the_same_path_is_refused_like_a_changed_config(tiny_model_dir, tmp_path):
    """The same path, size and mtime, other bytes (the rows reordered): refused naming train_data; the override
    key resumes anyway."""
    from components.sft.config import SFTConfig
    from components.sft.main import run

    data = tmp_path / "train.jsonl"
    write_jsonl(data, get_task("arithmetic").generate(64, seed=0))
    settings = {"model": str(tiny_model_dir), "train_data": str(data), "output_dir": str(tmp_path / "out"),
                "max_length": 64, "train": {"max_steps": 4, "batch_size": 8, "token_budget": 256, "lr": 1e-3,
                                            "checkpoint_every": 2}}
    run(from_mapping(SFTConfig, settings))
    stat = data.stat()
    data.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ConfigChanged, match=r"another config or data \(data_files.train_data: 'sha256:"):
        run(from_mapping(SFTConfig, settings))
    forced = {**settings, "train": {**settings["train"], "allow_config_change": True}}
    assert run(from_mapping(SFTConfig, forced))["steps"] == 4


def test_a_collapsed_run_warns(tiny_model_dir, tmp_path, caplog):
    """lr 1000 wrecks the model without a NaN: the loss stops moving, and the log says so (once)."""
    tok = load_tokenizer(tiny_model_dir)
    cfg = TrainConfig(max_steps=8, batch_size=8, token_budget=128, lr=1000.0, collapse_steps=3)
    with caplog.at_level("WARNING", logger="components.training.loop"):
        history = train(cfg, load_model(tiny_model_dir), _examples(tok), tmp_path / "c", pad_id=tok.pad_token_id)
    assert len(history) == 8
    warnings = [r.getMessage() for r in caplog.records if "training looks collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "train.collapse_steps" in warnings[0], warnings
