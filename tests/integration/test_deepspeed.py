"""DeepSpeed: a 2-process CPU run (ZeRO-2, and ZeRO-3 with every parameter partitioned; gloo) trains the tiny
model, and its per-step losses match the single-process run.

Both runs are the real SFT stage (`python -m components.sft`, and the same under `torch.distributed.run`
with 2 processes) on the same data, seed and config. The loop's loss is a token-mean over the whole
optimizer step whatever the sharding (each rank takes half the step's sequences; the loss is divided by
the global token count and multiplied by the world size because DeepSpeed averages gradients), so in
fp32 the two runs do the same arithmetic up to the order of the sums: different packing of the
micro-batches and the gradient reduction. token_budget=32 packs a rank's 8 sequences (9-13 tokens) into
3-4 micro-batches, unevenly across ranks in most steps, so gradient accumulation over several
micro-batches, the accumulation boundary and the empty padding micro-batches are all exercised.

Tolerance: measured on CPU (fp32, 6 steps) the largest relative difference of the loss is < 1e-7 (under
one ulp; abs < 3e-7; often exactly 0), of the gradient norm < 5e-7, and the saved weights differ by
< 5e-6 (absolute; they are O(1)). The test allows rel 1e-5 on losses and gradient norms (~100x the
rounding measured, room for other BLAS builds and thread counts) and 1e-4 on weights. Real faults are far
outside: DeepSpeed's bf16 mode casting the model moved the first loss by 1.6e-4; ZeRO-3 dropping all but
the last micro-batch's gradients gave a gradient norm of 1.09 instead of 9.04; a wrong world-size factor
doubles or halves the gradient norm (Adam hides the gradient scale from the losses, so the gradient norm
is compared too).

DeepSpeed's first start on a machine JIT-builds a shared-memory comm op (~80 s, cached in
~/.cache/torch_extensions); after that the module takes ~45 s (2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from components.datasets import write_jsonl
from components.models import build_tiny_model, check_model_dir, load_model
from components.tasks import get_task

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
REL_TOL = 1e-5       # losses and gradient norms, relative
WEIGHT_ATOL = 1e-4   # final weights, absolute (they are O(1))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], timeout: int) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-8000:]}")


OBJECTIVE_KEYS = ("method", "updates_per_batch")


def _stage_config(path: Path, model: Path, data: Path, out: Path, **extra) -> Path:
    """An sft stage config; `extra` keys go to `objective` (method, updates_per_batch) or else to `train`."""
    objective = {"method": "sft", **{k: v for k, v in extra.items() if k in OBJECTIVE_KEYS}}
    train = {"max_steps": STEPS, "batch_size": 16, "token_budget": 32, "lr": 1e-3, "precision": "fp32",
             "seed": 0, "log_every": 1, **{k: v for k, v in extra.items() if k not in OBJECTIVE_KEYS}}
    path.write_text(yaml.safe_dump({
        "model": str(model), "train_data": str(data), "output_dir": str(out), "objective": objective, "train": train,
    }))
    return path


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The tiny model, the data and the single-process run every 2-process run is compared with."""
    root = tmp_path_factory.mktemp("deepspeed")
    model_dir = build_tiny_model(root / "tiny")
    data = root / "train.jsonl"
    write_jsonl(data, get_task("arithmetic").generate(512, seed=0))
    out = root / "single"
    _run([sys.executable, "-m", "components.sft", "--config",
          str(_stage_config(root / "single.yaml", model_dir, data, out))], timeout=300)
    return root, model_dir, data, out


@pytest.mark.parametrize("zero_stage", [2, 3, "3-chunked"])
def test_two_ranks_match_single_process(single_run, zero_stage):
    root, model_dir, data, out1 = single_run
    out2 = root / f"zero{zero_stage}"
    # ZeRO-3 with every parameter partitioned (a large model's matrices are; the tiny model's would all stay whole
    # under DeepSpeed's default persistence threshold), the model partitioned as it loads. 3-chunked: the head in
    # chunks of 3 trained tokens, so the ranks' micro-batches need different numbers of chunks, and every chunk
    # gathers the partitioned head with the other rank (a rank calling it fewer times is a collective mismatch)
    zero = {"zero_stage": 3, "zero3_param_persistence_threshold": 0} if zero_stage != 2 else {"zero_stage": 2}
    if zero_stage == "3-chunked":
        zero["loss_chunk_size"] = 3
    cfg2 = _stage_config(root / f"zero{zero_stage}.yaml", model_dir, data, out2, **zero)
    # the first DeepSpeed start on a machine JIT-builds a comm op (~80 s): a generous limit
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(_free_port()), "-m", "components.sft", "--config", str(cfg2)], timeout=900)

    m1, m2 = _metrics(out1), _metrics(out2)
    # the same sequences and token counts in every step, the same schedule
    assert [r["trained_tokens"] for r in m1] == [r["trained_tokens"] for r in m2]
    assert [r["lr"] for r in m1] == pytest.approx([r["lr"] for r in m2], rel=1e-12)

    loss_rel = max(_rel(a["loss"], b["loss"]) for a, b in zip(m1, m2))
    loss_abs = max(abs(a["loss"] - b["loss"]) for a, b in zip(m1, m2))
    norm_rel = max(_rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(m1, m2))
    print(f"loss max abs diff {loss_abs:.3e}, max rel diff {loss_rel:.3e}; grad_norm max rel diff {norm_rel:.3e}")
    assert loss_rel <= REL_TOL, ([a["loss"] for a in m1], [b["loss"] for b in m2])
    assert norm_rel <= REL_TOL, ([a["grad_norm"] for a in m1], [b["grad_norm"] for b in m2])

    for m in (m1, m2):  # it trains
        losses = [r["loss"] for r in m]
        assert losses[-1] < 0.9 * losses[0], losses

    # each run saved a loadable safetensors model holding the trained (and the same) weights
    initial = load_model(model_dir).state_dict()
    weights = []
    for out in (out1, out2):
        path = check_model_dir(out / "model")
        assert list(path.glob("*.safetensors"))
        weights.append(load_model(path).state_dict())
    w1, w2 = weights
    assert w1.keys() == w2.keys() == initial.keys()
    assert all(w.dtype == torch.float32 for w in w2.values())
    assert max((w2[k] - initial[k]).abs().max().item() for k in w2) > 1e-3  # trained, not the initial weights
    weight_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"final weights max abs diff {weight_diff:.3e}")
    assert weight_diff <= WEIGHT_ATOL


def test_two_rank_psft_resumes_with_each_ranks_own_state(single_run):
    """PSFT's π_old log-probs and the RNG states are per rank: a resumed rank must get its own back (ZeRO-2
    keeps DeepSpeed's client_state only in rank 0's file, so they are saved per rank)."""
    root, model_dir, data, _ = single_run
    out = root / "psft2"
    # a checkpoint at step 4, inside a π_old block of 3 steps (4-6): step 5 reuses the cached log-probs
    cfg = _stage_config(root / "psft2.yaml", model_dir, data, out, method="psft", updates_per_batch=3,
                        checkpoint_every=4, max_steps=5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "components.sft", "--config", str(cfg)]
    _run(cmd, timeout=900)
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000004").glob("client-rank*.pt")) == [
        "client-rank00000.pt", "client-rank00001.pt"]
    cmd[cmd.index("--master-port") + 1] = str(_free_port())
    _run(cmd, timeout=900)  # resumes at step 5
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]
    assert again[4]["loss"] == pytest.approx(first[4]["loss"], rel=REL_TOL)
    assert again[4]["clip_ratio/high_mean"] == pytest.approx(first[4]["clip_ratio/high_mean"], abs=1e-9)
