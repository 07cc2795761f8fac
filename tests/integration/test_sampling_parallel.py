"""evaluate and reward_scoring on several processes: the real stages under torchrun (2 processes on CPU, gloo)
on the tiny models, against the same stage run as one process. Each prompt's samples are seeded by (seed, prompt
index, sample number), so the 2-process run must write exactly what the 1-process run writes: the same samples,
the same eval.json and metrics, the same pairs (only reward_scoring's timings differ). The vllm cases run real
vLLM on CPU: two engines (data parallel) and one engine split over both processes (tensor_parallel_size 2,
vLLM's external launcher). Both runs of a comparison are subprocesses with the same environment (one thread
each), so the arithmetic is the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.datasets import write_jsonl
from components.models import build_tiny_model
from components.training.engines import SHM_SUFFIX
from tests.torchrun import free_port, rank_env

REPO = Path(__file__).resolve().parents[2]
TIMING = ("rollout_s", "tokens_per_s")


def run_stage(module: str, settings: dict, out: Path, nproc: int, timeout: float = 240) -> Path:
    """`python -m components.<module>` (one process) or the same under torchrun with `nproc` processes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
    stage = ["-m", f"components.{module}", "--config", str(config)]
    cmd = [sys.executable, *stage] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), *stage]
    env = rank_env(tracking=False, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_model(root / "base", seed=0), build_tiny_model(root / "other", seed=1)


@pytest.fixture(scope="module")
def data_suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "mine.jsonl"
    write_jsonl(path, [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "task": "arithmetic"} for a in range(5)])
    return path


def eval_settings(models, data_suite, **overrides) -> dict:
    base, other = models
    # 7 and 5 prompts: shards of unequal size; batch_size 4: the batches of one process are not those of two
    return {"model": str(other), "name": "cand", "baselines": {"base": str(base)}, "base_model": str(base),
            "suites": [{"task": "arithmetic", "split": "id", "n_prompts": 7, "seed": 5},
                       {"name": "mine", "data": str(data_suite)}],
            "samples": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 6, "k": [1, 3], "seed": 3,
            "batch_size": 4, "bootstrap_samples": 200, **overrides}


def scoring_settings(models, **overrides) -> dict:
    return {"model": str(models[0]), "prompts": {"task": "arithmetic", "task_rows": 9}, "num_samples": 3,
            "sampling": {"max_new_tokens": 6, "temperature": 1.5, "generation_batch_size": 4}, "seed": 1,
            "rewards": [{"name": "task"}, {"name": "length", "max_length": 6, "cache": 6}], **overrides}


def eval_outputs(out: Path) -> dict:
    doc = json.loads((out / "eval.json").read_text())
    doc["config"].pop("output_dir")
    assert (out / "report.html").stat().st_size > 0
    return {"eval": doc, "metrics": (out / "metrics.json").read_text(), "samples": (out / "samples.jsonl").read_text()}


def scoring_outputs(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    assert all(stats.pop(k) > 0 for k in TIMING)
    return {"stats": stats, "scored": (out / "scored.jsonl").read_text(), "pairs": (out / "pairs.jsonl").read_text()}


def test_evaluate_on_two_processes_writes_what_one_writes(tmp_path, models, data_suite):
    settings = eval_settings(models, data_suite)
    one = eval_outputs(run_stage("evaluate", settings, tmp_path / "one", nproc=1))
    two_dir = run_stage("evaluate", settings, tmp_path / "two", nproc=2)
    two = eval_outputs(two_dir)
    assert two == one
    assert sorted(p.name for p in two_dir.iterdir()) == ["eval.json", "metrics.json", "report.html", "samples.jsonl"]
    samples = [json.loads(line) for line in one["samples"].splitlines()]
    assert len(samples) == 2 * (7 + 5) * 3 and len({s["completion"] for s in samples}) > 1
    assert "arithmetic-id/kl_to_base" in one["eval"]["metrics"]  # measured on rank 0


def test_reward_scoring_on_two_processes_writes_what_one_writes(tmp_path, models):
    settings = scoring_settings(models)
    one = scoring_outputs(run_stage("reward_scoring", settings, tmp_path / "one", nproc=1))
    two = scoring_outputs(run_stage("reward_scoring", settings, tmp_path / "two", nproc=2))
    assert two == one
    assert one["stats"]["samples"] == 27 and one["stats"]["pairs"] >= 1


def test_vllm_reward_scoring_on_two_engines(tmp_path, models):
    """Data parallel with the vllm engine: two engines (vLLM's external launcher, one per process), each half of
    the prompts, each sample its own request with its own seed. The one-engine run scores every sample and pairs a
    prompt's better sample with a worse one."""
    settings = scoring_settings(models, rollout={"engine": "vllm"})
    one = scoring_outputs(run_stage("reward_scoring", settings, tmp_path / "one", nproc=1))
    scored, pairs = (list(map(json.loads, one[key].splitlines())) for key in ("scored", "pairs"))
    assert len(scored) == one["stats"]["samples"] == 27 and one["stats"]["pairs"] == len(pairs) >= 1
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"] and p["chosen"] != p["rejected"]
    assert scoring_outputs(run_stage("reward_scoring", settings, tmp_path / "two", nproc=2)) == one


def test_vllm_evaluate_on_one_engine_split_over_two_processes(tmp_path, models, data_suite):
    """Tensor parallel: one engine with its weights split over both processes, moved from the candidate to the
    base by reloading them from the base's directory; teacher_forced off, so no process loads a Hugging Face
    copy of a model."""
    settings = eval_settings(models, data_suite, rollout={"engine": "vllm"}, teacher_forced=False)
    one = eval_outputs(run_stage("evaluate", settings, tmp_path / "one", nproc=1))
    # what a run killed while its engine started leaves: the segment vLLM creates with O_EXCL under this same name
    # (components/training/engines.py, SHM_SUFFIX); the engine removes it as no process maps it
    group = f"-tp:0-[0-1]{SHM_SUFFIX}"
    stale = Path("/dev/shm") / f"{group}0"
    with contextlib.suppress(FileExistsError):  # one there already is left as it is
        with open(stale, "xb") as f:
            f.write(bytes(4096))
        os.utime(stale, (time.time() - 60, time.time() - 60))
    tp = eval_outputs(run_stage("evaluate", {**settings, "rollout": {"engine": "vllm", "tensor_parallel_size": 2}},
                                tmp_path / "tp2", nproc=2))
    left = [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(group)]
    assert not left, f"the engine's exit left its shared memory names behind: {left}"
    assert tp["eval"]["config"]["rollout"].pop("tensor_parallel_size") == 2
    assert one["eval"]["config"]["rollout"].pop("tensor_parallel_size") == 1
    assert tp == one
    assert not any(m.endswith(("/entropy", "/kl_to_base")) for m in one["eval"]["metrics"])
    # the reload took: the base model's samples are its own, not the candidate's (the seeds are the same)
    samples = [json.loads(x) for x in one["samples"].splitlines()]
    assert ([s["completion"] for s in samples if s["model"] == "cand"]
            != [s["completion"] for s in samples if s["model"] == "base"])
