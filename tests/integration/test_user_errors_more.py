"""More mistakes that end in one line (exit status 2, no traceback): a full disk, broken model files; and
samples.jsonl after a resume.

The full disk is real: a small tmpfs mounted in a private mount namespace (`unshare --mount`, as root), which
the rest of the machine never sees and which is gone when the command ends."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components.config import UserError
from components.datasets import write_jsonl
from components.tasks import get_task


def _private_mounts() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _private_mounts(), reason="needs unshare --mount (root)")


@pytest.fixture
def sft_config(tiny_model_dir, tmp_path):
    def make(output_dir, **train) -> str:
        data = tmp_path / "train.jsonl"
        write_jsonl(data, get_task("arithmetic").generate(16, seed=0))
        path = tmp_path / "stage.yaml"
        path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "train_data": str(data),
                                        "output_dir": str(output_dir), "train": {"batch_size": 4, **train}}))
        return str(path)
    return make


def on_tmpfs(mount, size: str, script: str) -> subprocess.CompletedProcess:
    """Run shell `script` with a tmpfs of `size` at `mount`, in a private mount namespace."""
    mount.mkdir()
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs -o size={size} tmpfs {mount} && {script}"],
                          capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("python -m components.")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@needs_mounts
def test_a_full_disk_during_a_checkpoint_names_the_path_and_the_bytes(sft_config, tmp_path):
    """An 8 MiB disk: the output_dir check and metrics.jsonl fit, the first checkpoint (weights and AdamW's two
    moments, about 9.5 MB) does not. It used to end in torch's `unexpected pos` traceback."""
    mount = tmp_path / "disk"
    config = sft_config(mount / "out", max_steps=3, checkpoint_every=1)
    result = on_tmpfs(mount, "8m", f"{sys.executable} -m components.sft --config {config}; rc=$?; "
                                   f"ls -a {mount}/out/checkpoints; exit $rc")
    line = one_line(result)
    match = re.search(r"checkpoints/step-00000001: no space left on the device to write a checkpoint: it needs "
                      r"about (\d+) bytes", line)
    assert match and int(match.group(1)) > 8 << 20, line
    assert ".tmp" not in result.stdout  # the half-written checkpoint was removed


@needs_mounts
def test_the_writability_check_fails_on_a_full_disk(sft_config, tmp_path):
    """An empty file fits on a full disk, so a check that only creates one used to pass."""
    mount = tmp_path / "disk"
    config = sft_config(mount / "out", max_steps=1)
    line = one_line(on_tmpfs(mount, "2m", f"dd if=/dev/zero of={mount}/fill bs=64k 2>/dev/null; "
                                          f"exec {sys.executable} -m components.sft --config {config}"))
    assert f"output_dir {mount}/out: no space left on the device" in line, line


def _copy(model_dir, to):
    shutil.copytree(model_dir, to)
    return to


def test_a_truncated_weights_file_is_named_on_the_command_line(tiny_model_dir, sft_config, tmp_path):
    model = _copy(tiny_model_dir, tmp_path / "cut")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    config = yaml.safe_load(Path(sft_config(tmp_path / "out", max_steps=1)).read_text())
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump({**config, "model": str(model)}))
    result = subprocess.run([sys.executable, "-m", "components.sft", "--config", str(tmp_path / "cut.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert f"{weights}: truncated (" in one_line(result)


def test_broken_model_files_are_user_errors_naming_the_file(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from components.models import build_char_tokenizer, load_model, tiny_config

    bad_json = _copy(tiny_model_dir, tmp_path / "json")
    (bad_json / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(UserError, match=rf"{re.escape(str(bad_json / 'config.json'))}: not valid JSON \(.* line 1"):
        load_model(bad_json)
    # config.json's vocab_size is not the weights'
    resized = _copy(tiny_model_dir, tmp_path / "resized")
    config = json.loads((resized / "config.json").read_text())
    (resized / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 20}))
    with pytest.raises(UserError, match=r"resized: the shapes of its \*\.safetensors weights differ"):
        load_model(resized)
    # a tokenizer with more tokens than the model embeds: used to fail mid-training (index out of range)
    small = tmp_path / "small"
    tokenizer = build_char_tokenizer()
    AutoModelForCausalLM.from_config(tiny_config(50)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.raises(UserError, match=rf"small: its tokenizer has {len(tokenizer)} tokens and the model embeds 50"):
        load_model(small)


def test_samples_jsonl_holds_each_round_once_after_a_resume(tmp_path):
    """The samples writer of grpo and ppo: a resume redoes the rounds after its checkpoint, and a fresh run in the
    same directory starts again at round 1; neither repeats a round, and a line cut by a kill is dropped."""
    from components.training.rl import write_samples

    def write(index):
        rollout = SimpleNamespace(index=index, examples=[0, 1], rows=[{"prompt": "p"}] * 2,
                                  completions=[f"round {index + 1}"] * 2)
        write_samples(path, rollout, 2, lambda sample: {"reward": 1.0})

    def rounds():
        return [json.loads(line)["round"] for line in path.read_text().splitlines()]

    path = tmp_path / "samples.jsonl"
    for index in range(3):
        write(index)
    with path.open("a") as f:
        f.write('{"round": 4, "prom')  # killed in round 4
    for index in (1, 2, 3):  # resumed from the checkpoint after round 1
        write(index)
    assert rounds() == [1, 1, 2, 2, 3, 3, 4, 4]
    write(0)
    assert rounds() == [1, 1]
