"""Sampling on several processes: data-parallel shards of the prompts, tensor-parallel groups of a vLLM engine.

A sampling stage (evaluate, reward_scoring) started under torchrun with N processes (one per accelerator; gloo on
CPU) splits its prompts into contiguous shards, one per data-parallel group; each group samples and scores its
shard, and rank 0 gathers the shards, puts them back in prompt order and writes the outputs as one process would.
The other ranks write nothing. The samples do not depend on N: the stages seed each prompt's samples from (seed,
prompt index, sample number) (components/training/rollout.py, sample_seed), not from a stream the batch shares.

With the vllm engine and `rollout.tensor_parallel_size` k, the N processes form N/k groups of k consecutive ranks
(g·k … g·k+k−1), as vLLM's external launcher lays them out (its "external data parallel" dimension): each group
is one vLLM engine whose weights are split over its k accelerators, every rank of the group runs the same
requests, and only the group's first rank sends its results to rank 0. With the hf engine k is 1: each process
samples its own shard with a whole copy of the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from components.config import UserError

GATHER_TIMEOUT = timedelta(hours=2)
"""How long a rank waits for the others at a gather (the slowest shard, and rank 0's teacher-forced passes)."""


def shard_range(n: int, parts: int, part: int) -> range:
    """The contiguous share `part` (0-based) of `n` items split into `parts`: sizes differ by at most one, the
    first n % parts shares are the larger; the shares in order cover 0 … n−1 once."""
    if not (parts >= 1 and 0 <= part < parts and n >= 0):
        raise ValueError(f"shard {part} of {parts} of {n} items")
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return range(start, start + size + (part < extra))


@dataclass(frozen=True)
class SamplingWorld:
    """The processes of a sampling stage: this rank, how many, and how they group for tensor parallelism."""

    rank: int = 0
    world: int = 1
    tensor_parallel: int = 1
    group: object | None = None
    """The process group of the gathers (gloo, so pickled results stay in host memory); None: the default one."""
    owns_group: bool = False
    """init_sampling started the default process group (and close() ends it)."""

    @property
    def shards(self) -> int:
        """Data-parallel groups: the prompts are split into this many shards."""
        return self.world // self.tensor_parallel

    @property
    def shard_index(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def leader(self) -> bool:
        """The first rank of its tensor-parallel group: the one whose results count."""
        return self.rank % self.tensor_parallel == 0

    @property
    def writes(self) -> bool:
        """Rank 0 writes the outputs."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's share of `n` prompts (its group's)."""
        return shard_range(n, self.shards, self.shard_index)

    def gather(self, part) -> list | None:
        """Every group's `part` (picklable), in shard order, on rank 0; None on the other ranks. Every rank calls
        it the same number of times. One process: [part]."""
        if self.world == 1:
            return [part]
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(part if self.leader else None, out, dst=0, group=self.group)
        return None if out is None else [out[g * self.tensor_parallel] for g in range(self.shards)]

    def close(self) -> None:
        """End the process group this stage started (vLLM's shutdown may have ended it already)."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> SamplingWorld:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_tensor_parallel(tensor_parallel: int, world: int, where: str = "rollout.tensor_parallel_size") -> None:
    """tensor_parallel must divide the stage's processes (each group takes k whole accelerators)."""
    if world % tensor_parallel:
        raise UserError(f"{where}={tensor_parallel} is invalid: a divisor of the stage's processes ({world}: one per "
                        "accelerator, the run parameter <stage>_gpus_per_node or torchrun's --nproc-per-node)")


def init_sampling(tensor_parallel: int = 1, where: str = "rollout.tensor_parallel_size") -> SamplingWorld:
    """The sampling world of this process from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): one
    process without it. Several: the default process group (nccl on GPUs, gloo on CPU), each rank on its
    accelerator, and a gloo group for the gathers. A tensor_parallel that does not divide them is refused on
    every rank before anything loads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_tensor_parallel(tensor_parallel, world, where)
    if world == 1:
        return SamplingWorld()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=GATHER_TIMEOUT)
    gloo = torch.distributed.get_backend() == "gloo"
    group = None if gloo else torch.distributed.new_group(backend="gloo", timeout=GATHER_TIMEOUT)
    return SamplingWorld(rank=torch.distributed.get_rank(), world=world, tensor_parallel=tensor_parallel, group=group,
                         owns_group=owns)
