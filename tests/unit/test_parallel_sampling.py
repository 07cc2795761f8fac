"""Sampling on several processes without a model: the prompt shards, the gather back into prompt order (real gloo
process groups), and the tensor-parallel settings and where they are refused (the per-sample seeds of the hf sampler:
tests/unit/test_rollout.py)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from components.config import ConfigError, UserError, from_mapping
from components.training.config import RolloutEngine
from components.training.engines import llm_arguments
from components.training.parallel import SamplingWorld, init_sampling, shard_range


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_shards_are_contiguous_balanced_and_cover_every_prompt_once(parts):
    for n in range(0, 23):
        shards = [shard_range(n, parts, p) for p in range(parts)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)  # the larger first
    with pytest.raises(ValueError):
        shard_range(5, 2, 2)


def test_ranks_group_by_tensor_parallel_size():
    """vLLM's external launcher puts tensor parallelism innermost: ranks g·k … g·k+k−1 are group g."""
    worlds = [SamplingWorld(rank=r, world=8, tensor_parallel=4) for r in range(8)]
    assert [w.shards for w in worlds] == [2] * 8
    assert [w.shard_index for w in worlds] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [w.leader for w in worlds] == [True, False, False, False, True, False, False, False]
    assert [w.writes for w in worlds] == [True] + [False] * 7
    assert [list(w.shard(5)) for w in worlds] == [[0, 1, 2]] * 4 + [[3, 4]] * 4
    one = SamplingWorld()
    assert one.shards == 1 and list(one.shard(3)) == [0, 1, 2] and one.gather("x") == ["x"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, tensor_parallel: int, port: int, n: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sampling = init_sampling(tensor_parallel)
    try:
        shard = sampling.shard(n)
        # what a group's ranks compute is the same; a non-leader's part must not count, so make it visibly wrong
        part = [("prompt", i, sampling.shard_index) for i in shard] if sampling.leader else ["not counted"]
        first = sampling.gather(part)
        second = sampling.gather(len(shard))  # a second gather lines up with the first on every rank
        queue.put((rank, first, second))
    finally:
        sampling.close()


@pytest.mark.parametrize("world, tensor_parallel, n", [(2, 1, 7), (4, 2, 5), (3, 1, 2)])
def test_rank_0_gathers_the_shards_back_in_prompt_order(world, tensor_parallel, n):
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, world, tensor_parallel, port, n, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, first, second = queue.get()
        results[rank] = (first, second)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    first, second = results[0]
    groups = world // tensor_parallel
    assert [i for part in first for (_, i, _) in part] == list(range(n))  # an empty shard is an empty part
    assert [g for part in first for (_, _, g) in part] == [g for g in range(groups) for _ in shard_range(n, groups, g)]
    assert sum(second) == n
    assert all(results[r] == (None, None) for r in range(1, world))  # only rank 0 gets them


def test_a_tensor_parallel_size_that_does_not_divide_the_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"^rollout.tensor_parallel_size=2 is invalid: a divisor of the stage's "
                                        r"processes \(3: one per accelerator"):
        init_sampling(2)


def test_the_tensor_parallel_setting_is_checked():
    assert from_mapping(RolloutEngine, {"engine": "vllm", "tensor_parallel_size": 4}).tensor_parallel_size == 4
    with pytest.raises(ConfigError, match="tensor_parallel_size: 2 is invalid: 1 with engine hf .*needs engine: vllm"):
        from_mapping(RolloutEngine, {"tensor_parallel_size": 2})
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="tensor_parallel_size: .* is invalid: (a positive integer|an integer)"):
            from_mapping(RolloutEngine, {"engine": "vllm", "tensor_parallel_size": bad})


def test_grpo_refuses_tensor_parallelism():
    from components.grpo.config import GRPOConfig

    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size: 2 is invalid: 1 in grpo"):
        from_mapping(GRPOConfig, {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"},
                                  "rollout": {"engine": "vllm", "tensor_parallel_size": 2}})


def test_what_the_vllm_engine_is_started_with(tmp_path):
    settings = from_mapping(RolloutEngine, {"engine": "vllm", "tensor_parallel_size": 2,
                                            "gpu_memory_utilization": 0.85})
    one = llm_arguments(from_mapping(RolloutEngine, {"engine": "vllm"}), tmp_path, seed=3, max_num_seqs=16,
                        world_size=1, device_type="cpu")
    assert one["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in one  # in-process, uni
    assert one["dtype"] == "float32" and one["seed"] == 3 and one["max_num_seqs"] == 16
    several = llm_arguments(settings, tmp_path, seed=0, max_num_seqs=64, world_size=8, device_type="cuda")
    assert several["distributed_executor_backend"] == "external_launcher"  # in each torchrun process
    assert several["tensor_parallel_size"] == 2 and several["gpu_memory_utilization"] == 0.85
    assert several["dtype"] == "bfloat16" and several["model"] == several["tokenizer"] == str(tmp_path)
    with pytest.raises(UserError, match="rollout.tensor_parallel_size=2 is invalid: the stage runs one process"):
        llm_arguments(settings, tmp_path, seed=0, max_num_seqs=64, world_size=1, device_type="cuda")


def test_the_step_refuses_tensor_parallelism_before_torchrun_starts(tmp_path, monkeypatch):
    from components.step import Step

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = '{"rollout": {"engine": "vllm", "tensor_parallel_size": 4}}'
    step = Step("scoring", settings, output_dir=str(tmp_path / "out"), nproc=6, launch='{"max_nproc": 8}')
    with pytest.raises(UserError, match=r"stage scoring: rollout.tensor_parallel_size=4 is invalid: a divisor of the "
                                        r"stage's processes \(6"):
        step.run("reward_scoring", model=str(tmp_path), prompts={"task": "arithmetic"}, rewards=[{"name": "task"}])


def test_evaluate_merges_shards_in_prompt_order():
    from components.evaluation.scoring import merge_scored

    parts = [({"accuracy": np.array([1.0, 0.0])}, [{"i": 0}, {"i": 1}]), None, ({"accuracy": np.array([0.5])},
                                                                           [{"i": 2}])]
    per_prompt, samples = merge_scored(parts)
    assert per_prompt["accuracy"].tolist() == [1.0, 0.0, 0.5] and [s["i"] for s in samples] == [0, 1, 2]


def test_reward_scoring_merges_shards_in_prompt_order():
    from components.reward_scoring.main import merge_shards

    a = {"texts": ["a0", "a1"], "lengths": [1, 2], "totals": [0.0, 1.0], "per_fn": {"task": [0.0, 1.0]}}
    b = {"texts": ["b0"], "lengths": [3], "totals": [0.5], "per_fn": {"task": [0.5]}}
    assert merge_shards([a, None, b]) == {"texts": ["a0", "a1", "b0"], "lengths": [1, 2, 3],
                                          "totals": [0.0, 1.0, 0.5], "per_fn": {"task": [0.0, 1.0, 0.5]}}
