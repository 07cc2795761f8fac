"""A user's mistake ends in one line naming what to fix, with exit status 2 and no traceback (`--debug` shows
it), before any model or data is loaded where it can be checked that early."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from components.datasets import write_jsonl
from components.tasks import get_task


def stage(module: str, config: dict, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", f"components.{module}", "--config", str(path), *extra],
                          capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("python -m components.")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, get_task("arithmetic").generate(16, seed=0))
    return path


def test_missing_train_data_is_one_line_and_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    config = {"model": str(tiny_model_dir), "train_data": str(tmp_path / "nope.jsonl"),
              "output_dir": str(tmp_path / "o")}
    line = one_line(stage("sft", config, tmp_path))
    assert line.endswith(f"{tmp_path / 'nope.jsonl'}: no such file")
    debug = stage("sft", config, tmp_path, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_a_missing_model_path_is_named_not_a_hub_id(data, tmp_path):
    line = one_line(stage("sft", {"model": str(tmp_path / "no-model"), "train_data": str(data),
                                  "output_dir": str(tmp_path / "o")}, tmp_path))
    assert "no-model: no such directory" in line and "Repo id" not in line


def test_an_empty_directory_as_the_model_says_it_holds_no_tokenizer(data, tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_line(stage("sft", {"model": str(tmp_path / "empty"), "train_data": str(data),
                                  "output_dir": str(tmp_path / "o")}, tmp_path))
    assert "empty: no tokenizer in it" in line and "sentencepiece" not in line


def test_an_unwritable_output_dir_fails_before_anything_loads(tiny_model_dir, data, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = stage("sft", {"model": str(tiny_model_dir), "train_data": str(data),
                           "output_dir": str(tmp_path / "a-file" / "out")}, tmp_path)
    line = one_line(result)
    assert "output_dir" in line and "a-file/out: not writable" in line
    assert "components.sft:" not in result.stderr.replace(line, "")  # nothing was logged: no data, no model loaded


def test_yaml_exponent_floats_are_numbers(tiny_model_dir, data, tmp_path):
    """`lr: 1e-4` is a string to YAML 1.1 (no dot); a float key takes it."""
    config = {"model": str(tiny_model_dir), "train_data": str(data), "output_dir": str(tmp_path / "o")}
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config) + "train: {lr: 1e-4, max_steps: 1, batch_size: 4}\n")
    result = subprocess.run([sys.executable, "-m", "components.sft", "--config", str(path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "model" / "config.json").exists()


def test_a_bad_data_sources_parameter_fails_before_the_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "demo", "--out", str(tmp_path / "o"),
                             "--param", "data_sources=notjson"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--param data_sources='notjson' is invalid: not JSON" in result.stderr
    assert not (tmp_path / "o").exists()  # nothing started
