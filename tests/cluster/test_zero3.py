"""ZeRO-3 as a large model runs it, on the tiny model, on two torchrun "nodes".

DeepSpeed keeps a parameter of at most `stage3_param_persistence_threshold` elements (default 100 000) whole on
every rank, so every weight of the tiny model (the largest has 49 152 elements) would stay replicated under ZeRO-3
and none of a 7B model's behaviour would show. These runs set train.zero3_param_persistence_threshold: 0: every
parameter is partitioned, every forward all-gathers, as with a 7B model's matrices. The two nodes are started as
Kubeflow Trainer's torch plugin starts one per pod: torchrun with its PET_* environment (2 nodes × 1 process, the
node rank, node 0 as master; here on 127.0.0.1), gloo on CPU.

- LoRA on a frozen base trained in bf16 (shaped like the 70B LoRA spec): the base loads in bf16 and partitioned
  as it loads (each rank holds half of its bytes), every parameter stays partitioned under the engine, the
  adapters train, the ranks sample in lockstep with different numbers of prompts each, and the merged model is
  written in bf16 and equals the base plus the adapters.
- GRPO and PPO: each rank samples its own prompts, and their completions end at different decode steps on the two
  ranks. Unless the ranks decode in lockstep, the rank that finishes first leaves its decode loop while the other
  still all-gathers weights for its next forward: gloo aborts ("Received data size doesn't match expected size. Is
  there a distributed collective mismatch in your code?"; NCCL would hang). Each run is bounded by a timeout, so
  a hang fails the test instead of stalling it. The samples are those one process draws from the same weights.

Each run is one subprocess per node; this file is also the worker script of the LoRA run (`__main__` below).
DeepSpeed's first start on a machine JIT-builds a comm op (~80 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchrun import free_port, rank_env

REPO = Path(__file__).resolve().parents[2]
NODE_TIMEOUT = float(os.environ.get("POSTTRAIN_ZERO3_TIMEOUT", "300"))
"""Seconds a two-node run may take (the first DeepSpeed start on a machine builds a comm op, ~80 s)."""
LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}
LORA_TRAIN = {"max_steps": 6, "batch_size": 8, "token_budget": 256, "lr": 2e-2, "precision": "bf16-mixed",
              "seed": 0, "log_every": 1, "zero_stage": 3, "zero3_param_persistence_threshold": 0}
ZERO3 = {"token_budget": 256, "lr": 1e-3, "precision": "fp32", "log_every": 1, "max_steps": 2, "zero_stage": 3,
         "zero3_param_persistence_threshold": 0}
RL = {
    "grpo": {"prompts": {"task": "arithmetic", "task_rows": 16}, "prompts_per_round": 2, "num_generations": 2,
             "samples_logged": 2, "sampling": {"max_new_tokens": 16, "temperature": 1.0},
             "train": {**ZERO3, "batch_size": 4, "seed": 40}},
    "ppo": {"prompts": {"task": "arithmetic", "task_rows": 16}, "sampling": {"max_new_tokens": 16, "temperature": 1.0},
            "rewards": [{"name": "arithmetic"}], "critic_init": "policy", "ppo_epochs": 1, "num_minibatches": 1,
            "kl_coef": 0.1, "train": {**ZERO3, "batch_size": 2, "seed": 4}},
}
"""Two rounds of each stage, each rank sampling one prompt (grpo: two completions of it; ppo: one). The seeds are
the first whose first round ends rank 0's completions at another decode step than rank 1's (the test checks
it): grpo 40 (rank 0: 16 and 16 tokens, rank 1: 13 and 13), ppo 4 (rank 0: 4, rank 1: 12). A sample is seeded from
its prompt's place in the round (components/training/rl.py, rollout_seed), not from its rank."""
SAMPLED_PROMPTS = {0: 3, 1: 1}
"""Prompts each rank samples in the LoRA run (2 sequences per batch): rank 0 decodes two batches, rank 1 one."""


# ----------------------------------------------------------------------------------------------------
# the two nodes

def run_nodes(target: list[str], logs: Path, name: str, timeout: float = NODE_TIMEOUT) -> tuple[list[int], str]:
    """`target` (torchrun's script or `-m module` and its arguments) on two nodes; their exit codes and logs.
    A run past `timeout` is killed (each node is a process group) and fails the test."""
    port = free_port()
    nodes = []
    for node in range(2):
        # torchrun's arguments as Kubeflow Trainer's torch plugin passes them to each node's pod
        # (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK
        # from the Job's completion index, PET_MASTER_ADDR: node 0's pod, PET_MASTER_PORT)
        pet = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(node),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "torch.distributed.run", *target]
        log = open(logs / f"{name}-node{node}.log", "w")
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env(tracking=False, **pet), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    codes = []
    for proc in nodes:
        try:
            codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            # torchrun starts its workers in sessions of their own: kill every process under each node
            doomed = [pid for p in nodes for pid in (p.pid, *_descendants(p.pid))]
            for pid in doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in nodes:
                p.wait(30)
            text = _logs(logs, name)
            pytest.fail(f"{name}: the two nodes did not finish within {timeout:.0f} s (a hang):\n{text}")
    return codes, _logs(logs, name)


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def _logs(logs: Path, name: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in sorted(logs.glob(f"{name}-node*.log")))


# ----------------------------------------------------------------------------------------------------
# the LoRA worker: what each node runs

def _param_state(model) -> list[dict]:
    """Each parameter: its dtype, full size, the elements this rank holds, whether it is partitioned."""
    out = []
    for name, param in model.named_parameters():
        partitioned = hasattr(param, "ds_id")
        out.append({"name": name, "trainable": param.requires_grad, "dtype": str(param.dtype).removeprefix("torch."),
                    "full": int(param.ds_numel) if partitioned else param.numel(),
                    "local": int(param.ds_tensor.numel()) if partitioned else param.numel(),
                    "visible": param.numel(), "status": param.ds_status.name if partitioned else None,
                    "bytes": (int(param.ds_tensor.numel()) if partitioned else param.numel()) * param.element_size()})
    return out


def lora_worker(model_dir: str, data: str, out_dir: str) -> None:
    """The sft stage with LoRA (merged output), its policy's parameters looked at as they loaded and as the engine
    left them; then the trained policy samples (each rank a different number of prompts) and saves its adapter."""
    import components.sft.main as sft
    from components.config import from_mapping
    from components.models import load_tokenizer
    from components.models.config import ModelLoading
    from components.training import distributed
    from components.training.config import Adapter
    from components.training.lora import save_policy
    from components.training.rollout import generate

    out = Path(out_dir)
    loaded = {}
    stage_load_policy = sft.load_policy

    def load_policy(*args, **kwargs):
        loaded["model"] = model = stage_load_policy(*args, **kwargs)
        loaded["state"] = _param_state(model)
        return model

    sft.load_policy = load_policy
    sft.run(from_mapping(sft.SFTConfig, {"model": model_dir, "train_data": data, "output_dir": str(out / "sft"),
                                         "lora": LORA, "train": LORA_TRAIN}))
    model, dist, tokenizer = loaded["model"], distributed.init(), load_tokenizer(model_dir)
    engine = _param_state(model)
    prompts = [f"{a}+{a}=" for a in range(SAMPLED_PROMPTS[dist.rank])]
    sampled = generate(model, tokenizer, prompts, n=2, max_new_tokens=12, seed=dist.rank, batch_size=2)
    save_policy(model, tokenizer, out / "adapter", dist, Adapter(**{**LORA, "output": "adapter"}), model_dir,
                ModelLoading())
    (out / f"rank{dist.rank}.json").write_text(json.dumps({"loaded": loaded["state"], "engine": engine,
                                                           "sampled": sampled.lengths}))


# ----------------------------------------------------------------------------------------------------
# the tests

def _load_safetensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_lora_base_loads_sharded_in_bf16_trains_and_merges_in_bf16(tiny_model_dir, tmp_path):
    import torch

    from components.datasets import write_jsonl
    from components.tasks import get_task

    out = tmp_path / "lora"
    out.mkdir()
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"prompt": row["prompt"], "completion": row["completion"]}
                       for row in get_task("arithmetic").generate(64, seed=1)])
    codes, logs = run_nodes([str(Path(__file__)), "lora", str(tiny_model_dir), str(data), str(out)], tmp_path,
                            "lora")
    assert codes == [0, 0], logs
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    base = _load_safetensors(tiny_model_dir)
    base_elements = sum(t.numel() for name, t in base.items())

    # the frozen base, as it came out of from_pretrained: bf16, and every weight partitioned, half on each rank
    for rank in ranks:
        frozen = [p for p in rank["loaded"] if not p["trainable"]]
        assert {p["dtype"] for p in frozen} == {"bfloat16"}
        assert all(p["status"] == "NOT_AVAILABLE" and p["visible"] == 0 for p in frozen), frozen[:3]
        assert all(p["local"] == -(-p["full"] // 2) for p in frozen), [(p["name"], p["local"], p["full"])
                                                                      for p in frozen][:5]
        assert sum(p["full"] for p in frozen) == base_elements
        loaded_bytes = sum(p["bytes"] for p in frozen)
        # ≈ total / world in bf16: a quarter of the whole model in fp32 (padding: < 1 element per weight)
        assert abs(loaded_bytes - base_elements * 2 / 2) <= 2 * len(frozen), (loaded_bytes, base_elements)

    # under the engine every parameter (the adapters too) is partitioned: each rank holds its shard only
    for rank in ranks:
        assert all(p["status"] == "NOT_AVAILABLE" and p["visible"] == 0 and p["local"] == -(-p["full"] // 2)
                   for p in rank["engine"]), [p for p in rank["engine"] if p["status"] != "NOT_AVAILABLE"][:3]
        assert any(p["trainable"] for p in rank["engine"])

    # it trains; the ranks sampled in lockstep although rank 0 decoded two batches and rank 1 one
    losses = [json.loads(line)["loss"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == LORA_TRAIN["max_steps"] and losses[-1] < 0.9 * losses[0], losses
    assert [len(rank["sampled"]) for rank in ranks] == [2 * SAMPLED_PROMPTS[0], 2 * SAMPLED_PROMPTS[1]]

    # the merged model: bf16 on disk, equal to base + (alpha / r) · B·A within bf16 rounding
    merged_dir = out / "sft" / "model"
    with open(next(merged_dir.glob("*.safetensors")), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    merged = _load_safetensors(merged_dir)
    adapter = _load_safetensors(out / "adapter")
    scale = LORA["alpha"] / LORA["r"]
    adapted = 0
    for name, weight in base.items():
        key = "base_model.model." + name.removesuffix(".weight")
        delta = torch.zeros_like(weight, dtype=torch.float32)
        if f"{key}.lora_A.weight" in adapter:
            delta = adapter[f"{key}.lora_B.weight"].float() @ adapter[f"{key}.lora_A.weight"].float() * scale
            assert delta.abs().max() > 1e-3, name  # the adapter trained (B starts at zero)
            adapted += 1
        # bf16 rounds to 8 significant bits (unit roundoff 2^-8): the base, the update and their sum each once
        tolerance = 2.0 ** -7 * (weight.float().abs() + delta.abs()) + 1e-8
        assert ((merged[name].float() - (weight.float() + delta)).abs() <= tolerance).all(), name
    assert adapted == 4 * 7  # every linear layer of the 4 blocks (q, k, v, o, gate, up, down)


def _first_round(cfg, model, tokenizer, prompts_per_round: int, n: int) -> list:
    """What each rank samples in an RL stage's first round, computed here in one process from the same prompts,
    seeds and weights (the rollout's samples depend on nothing else)."""
    from components.training.engines import HFEngine
    from components.training.loop import step_indices
    from components.training.rl import rollout_seed

    rows = cfg.prompts.load_prompts(cfg.train.seed)
    indices = step_indices(len(rows), prompts_per_round, 0, cfg.train.seed)
    return [cfg.sampling.sample(HFEngine(model, tokenizer), [rows[i]["prompt"] for i in indices[rank::2]], n=n,
                                seed=rollout_seed(cfg.train.seed, 0), indices=list(range(rank, len(indices), 2)))
            for rank in (0, 1)]


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_ranks_whose_completions_end_at_different_steps_decode_in_lockstep(stage, tiny_model_dir, tmp_path):
    import yaml

    from components.config import from_mapping
    from components.grpo.config import GRPOConfig
    from components.models import load_model, load_tokenizer
    from components.ppo.config import PPOConfig

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    settings = {**RL[stage], "model": str(tiny_model_dir), "output_dir": str(tmp_path / stage)}
    if stage == "grpo":
        cfg = from_mapping(GRPOConfig, settings)
        expected = _first_round(cfg, model, tokenizer, cfg.prompts_per_round, cfg.num_generations)
    else:
        cfg = from_mapping(PPOConfig, settings)
        expected = _first_round(cfg, model, tokenizer, cfg.train.batch_size, 1)
    # the case that breaks: the two ranks' completions end at different decode steps
    assert max(expected[0].lengths) != max(expected[1].lengths), (
        f"with this tiny model both ranks' completions end at the same step: pick another {stage} train.seed",
        expected[0].lengths, expected[1].lengths)
    config = tmp_path / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(settings))

    codes, logs = run_nodes(["-m", f"components.{stage}", "--config", str(config)], tmp_path, stage)
    assert codes == [0, 0], logs
    assert "partitioned over the ranks as it loaded (ZeRO-3)" in logs  # the policy never whole on a rank
    out = tmp_path / stage
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2]
    # the first round sampled what one process samples from the same weights and seeds, on both ranks
    lengths = expected[0].lengths + expected[1].lengths
    assert metrics[0]["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-12)
    if stage == "grpo":
        assert (metrics[0]["completions/min_length"], metrics[0]["completions/max_length"]) == (min(lengths),
                                                                                                max(lengths))
    logged = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["completion"] for row in logged if row["round"] == 1] == expected[0].texts
    assert (out / "model" / "config.json").is_file()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"lora": lora_worker}[mode](*args)
