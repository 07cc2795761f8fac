"""A step's metric sums over ranks when a rank has none of them: grpo's filter_zero_std can leave a rank no group to
train in a step, and its loss then reports no metric sums while the other ranks report theirs. Session.record
reduces them with `all_reduce_sums(..., union=True)`: the keys are gathered first and a missing one counts 0, where
a reduce over each rank's own keys would pair different metrics (or hang on tensors of different lengths)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed
import torch.multiprocessing as mp

from components.training.distributed import Dist

SUMS = [{"loss": 1.0, "entropy": 2.0, "kl_old": 3.0}, {"loss": 4.0}]  # rank 1 trained nothing this step


def _rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out.put((rank, Dist(rank=rank, world=2).all_reduce_sums(SUMS[rank], union=True)))
    finally:
        torch.distributed.destroy_process_group()


def test_sums_over_ranks_with_different_keys_count_a_missing_key_as_zero():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, port, out)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert results[0] == results[1] == {"entropy": 2.0, "kl_old": 3.0, "loss": 5.0}
    assert Dist().all_reduce_sums({"b": 1.0, "a": 2.0}, union=True) == {"a": 2.0, "b": 1.0}  # one process: as given
