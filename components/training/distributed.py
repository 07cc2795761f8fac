"""One device with plain torch, or several ranks under DeepSpeed ZeRO, behind the same small interface.

`init()` reads the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK). With one rank the engine is
plain torch: AdamW, gradient-norm clipping, a LambdaLR schedule. With more, DeepSpeed ZeRO stage 2 or 3
(optimizer states, and with stage 3 parameters, partitioned across ranks; optional CPU offload) wraps the
same model, optimizer and schedule. The loop only calls backward / step / lr / save / load.

Checkpoints are directories `step-NNNNNNNN` holding a COMPLETE marker written last: a checkpoint
interrupted while being written is never resumed from. They live where every node sees them (the run's
workspace): DeepSpeed writes each rank's optimizer shard from that rank and the model states from global rank 0
only; rank 0 writes topology.json (nodes × processes per node) and the marker after a barrier. A checkpoint
resumes only on the topology that wrote it (check_topology): the ranks' data shares, π_old caches and shards
belong to that split. Before the marker, checksums.json records the sha256 of every file of the checkpoint;
`checkpoint_problem` verifies them, so a resume never loads a corrupted or truncated file.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from components.storage import sha256_file

COMPLETE = "COMPLETE"
TOPOLOGY = "topology.json"
CHECKSUMS = "checksums.json"
META = "meta.json"
"""What a checkpoint's step recorded (its metrics: what ranks it for keep_top_k), covered by its checksums."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    nodes: int = 1
    """Nodes of the run: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE."""

    @property
    def topology(self) -> dict:
        return {"nodes": self.nodes, "nproc_per_node": self.world // self.nodes, "world": self.world}

    def _reduce(self, values: list[float], op) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def all_reduce_sum(self, x: float) -> float:
        return self._reduce([x], torch.distributed.ReduceOp.SUM if self.world > 1 else None)[0]

    def all_reduce_max(self, x: int) -> int:
        return int(self.all_reduce_max_float(float(x)))

    def all_reduce_max_float(self, x: float) -> float:
        return self._reduce([x], torch.distributed.ReduceOp.MAX if self.world > 1 else None)[0]

    def all_reduce_sums(self, d: dict[str, float], *, union: bool = False) -> dict[str, float]:
        """Each key's sum over the ranks. Every rank must pass the same keys, or with `union` any: the keys are
        then gathered first (one more collective) and a rank's missing ones count 0."""
        keys = sorted(d)
        if union and self.world > 1:
            keys = sorted(set().union(*self.all_gather(keys)))
            d = {key: d.get(key, 0.0) for key in keys}
        vals = self._reduce([d[k] for k in keys], torch.distributed.ReduceOp.SUM if self.world > 1 else None)
        return dict(zip(keys, vals))

    def all_gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order; one process: [obj]."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def init() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank = torch.distributed.get_rank() if world > 1 else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, nodes=max(1, world // local_world))


def write_topology(path: Path, dist: Dist) -> None:
    (path / TOPOLOGY).write_text(json.dumps(dist.topology))


def checkpoint_topology(path: Path) -> dict | None:
    """The topology a checkpoint was written by; None for one written before topologies were recorded."""
    file = Path(path) / TOPOLOGY
    return json.loads(file.read_text()) if file.exists() else None


def topology_problem(path: Path, nodes: int, nproc_per_node: int) -> str | None:
    """Why a run of `nodes` × `nproc_per_node` may not resume from the checkpoint at `path`, None if it may."""
    wrote = checkpoint_topology(path)
    if wrote is None or (wrote["nodes"], wrote["nproc_per_node"]) == (nodes, nproc_per_node):
        return None
    return (f"{path} was written by {wrote['nodes']} node(s) × {wrote['nproc_per_node']} process(es), and this run "
            f"has {nodes} × {nproc_per_node}: resume on the topology that wrote it (the run parameters "
            f"<stage>_nodes={wrote['nodes']} and <stage>_gpus_per_node={wrote['nproc_per_node']}), or delete "
            f"{Path(path).parent} to start the stage over (each rank's data share, π_old log-probs and optimizer "
            "shard belong to that split)")


def check_topology(path: Path, dist: Dist) -> None:
    topology = dist.topology
    if (problem := topology_problem(path, topology["nodes"], topology["nproc_per_node"])) is not None:
        raise RuntimeError(problem)


def _param_groups(model, cfg) -> list[dict]:
    """Weight decay on matrices only, not on norms and biases. An empty group is left out (LoRA trains matrices
    only): ZeRO-3's optimizer drops empty groups, and the schedule would then step one group more than it has."""
    decay = [p for p in model.parameters() if p.requires_grad and _ndim(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and _ndim(p) < 2]
    return [group for group in ({"params": decay, "weight_decay": cfg.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if group["params"]]


def _ndim(param) -> int:
    """A parameter's dimensions; a ZeRO-3 partitioned one is an empty placeholder whose full shape is ds_shape."""
    return len(param.ds_shape) if hasattr(param, "ds_shape") else param.ndim


def _optimizer(model, cfg):
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=cfg.adam_betas, fused=cuda)


def make_engine(model, cfg, lr_lambda, dist: Dist):
    if dist.world == 1:
        return PlainEngine(model, cfg, lr_lambda)
    return DeepSpeedEngine(model, cfg, lr_lambda, dist)


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[0] if done else None


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` whose COMPLETE marker was written, newest first."""
    return sorted((p for p in Path(root).glob("step-*") if (p / COMPLETE).exists()), reverse=True)


def _checkpoint_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (COMPLETE, CHECKSUMS))


def write_meta(path: Path, meta: dict | None) -> None:
    if meta is not None:
        (path / META).write_text(json.dumps(meta, indent=1))


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json ({} when it has none or it is unreadable)."""
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}


def write_checksums(path: Path) -> None:
    """Record the sha256 of every file of the checkpoint at `path` (before its COMPLETE marker)."""
    sums = {str(file.relative_to(path)): sha256_file(file) for file in _checkpoint_files(path)}
    (path / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` must not be resumed (a file missing, changed or added since its checksums
    were written), None if it is intact. A checkpoint written before checksums were recorded is taken as is."""
    path = Path(path)
    if not (path / CHECKSUMS).exists():
        return None
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} unreadable ({e})"
    present = {str(file.relative_to(path)) for file in _checkpoint_files(path)}
    if missing := sorted(set(recorded) - present):
        return f"{missing[0]} missing"
    if extra := sorted(present - set(recorded)):
        return f"{extra[0]} not in its {CHECKSUMS}"
    for name, digest in sorted(recorded.items()):
        if sha256_file(path / name) != digest:
            return f"{name} does not match its sha256"
    return None


class PlainEngine:
    def __init__(self, model, cfg, lr_lambda):
        self.model, self.cfg = model, cfg
        self.optimizer = _optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def backward(self, loss, last: bool):
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        if torch.isfinite(norm):  # a non-finite gradient is not applied (Session counts and limits such steps)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, client_state: dict, meta: dict | None = None):
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), **client_state}, tmp / "state.pt")
        write_meta(tmp, meta)
        write_topology(tmp, Dist())
        write_checksums(tmp)
        (tmp / COMPLETE).touch()
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    def load(self, path: Path) -> dict:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state


def deepspeed_config(cfg, dist: Dist, params_dtype: torch.dtype = torch.float32) -> dict:
    """The DeepSpeed config of a training engine (`cfg`: the stage's TrainConfig).

    `params_dtype` only matters while a model is built under it (`sharded_loading`): deepspeed.zero.Init casts
    the weights it partitions to the dtype the config's bf16 section names. The engine itself always gets
    bf16 off: bf16-mixed means bf16 autocast (applied by the loop) over fp32 weights, gradients and optimizer,
    as on one device, while DeepSpeed's own bf16 mode would cast the trained weights to bf16 (fp32 only in the
    optimizer's master copy), so forward, gradient reduction and the saved model would differ."""
    offload = {"device": "cpu", "pin_memory": dist.device.type == "cuda"}
    zero = {"stage": cfg.zero_stage, "overlap_comm": dist.device.type == "cuda", "contiguous_gradients": True}
    if cfg.zero_stage == 3:
        # parameters up to this size stay whole on every rank; 0 partitions them all, as a 7B model's are
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
    if cfg.offload:
        zero["offload_optimizer"] = offload
        if cfg.zero_stage == 3:
            zero["offload_param"] = offload
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip, "zero_optimization": zero,
        "bf16": {"enabled": params_dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


def zero3(cfg, dist: Dist) -> bool:
    """Whether this run partitions the parameters themselves (ZeRO-3 on several ranks)."""
    return dist.world > 1 and cfg.zero_stage == 3


@contextmanager
def sharded_loading(cfg, dist: Dist, params_dtype: torch.dtype):
    """Within it, under ZeRO-3 on several ranks, Hugging Face `from_pretrained` builds the model inside
    deepspeed.zero.Init: each weight is partitioned as it is created and then filled module by module from
    the checkpoint, so a rank keeps only its share of the model (a 70B base would otherwise be whole, in fp32,
    on every rank). transformers only looks for a live HfDeepSpeedConfig (a weak reference), so one lives for
    the duration and is dropped after: models loaded later (a frozen reference, the merge on rank 0) load
    whole, as they are not trained by an engine. Elsewhere nothing changes."""
    if not zero3(cfg, dist):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(deepspeed_config(cfg, dist, params_dtype))
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del live


def is_partitioned(model) -> bool:
    """Whether `model`'s weights are ZeRO-3 partitioned (each rank holds a shard; a forward gathers them, a
    collective every rank must join)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


class DeepSpeedEngine:
    """DeepSpeed ZeRO with gradient accumulation over a variable number of micro-batches per step."""

    def __init__(self, model, cfg, lr_lambda, dist: Dist):
        import deepspeed

        self.dist = dist
        ds_config = deepspeed_config(cfg, dist)
        if cfg.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(_param_groups(model, cfg), lr=cfg.lr, betas=cfg.adam_betas)
        else:
            optimizer = _optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def backward(self, loss, last: bool):
        # The loop runs the wrapped model directly, not `engine(...)`, so do what engine.forward does at the
        # start of every micro-batch: tell the ZeRO optimizer a new micro-batch begins. Without it ZeRO-3
        # never advances its micro-step counter and each micro-batch's gradients overwrite the previous
        # ones instead of accumulating (ZeRO-2 skips its per-micro-batch reset). Nothing reads this state
        # between the forward and the backward, so calling it here is the same.
        self.engine.optimizer.clear_backward_seen_flag()
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # Each rank's own state (its RNG, its share of PSFT's π_old log-probs) goes to a file of its own: DeepSpeed
    # keeps client_state only in the model-states file, which ZeRO-2 writes on rank 0 alone, so every rank
    # would resume with rank 0's.
    def _client_file(self, path: Path) -> Path:
        return path / f"client-rank{self.dist.rank:05d}.pt"

    def save(self, path: Path, client_state: dict, meta: dict | None = None):
        self.engine.save_checkpoint(str(path.parent), tag=path.name)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({**client_state, "world": self.dist.world}, self._client_file(path))
        self.dist.barrier()
        if self.dist.rank == 0:
            write_meta(path, meta)
            write_topology(path, self.dist)
            write_checksums(path)
            (path / COMPLETE).touch()
        self.dist.barrier()

    def load(self, path: Path) -> dict:
        own = self._client_file(path)
        state = torch.load(own, map_location="cpu", weights_only=True) if own.exists() else {}
        if state.get("world") != self.dist.world:
            raise RuntimeError(f"{path} was written by {state.get('world', 'another number of')} ranks, and this "
                               f"run has {self.dist.world}: resume with the world size that wrote it (each rank's "
                               "data share and cached π_old log-probs belong to that split)")
        load_path, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {path}")
        return state


def save_model(model, tokenizer, path: Path, dist) -> None:
    """Save a Hugging Face directory (safetensors) from rank 0; ZeRO-3 shards are gathered first. A full disk is
    one line naming the directory and the bytes the weights need."""
    from components.diskspace import disk_space, tensor_bytes

    with disk_space(path, lambda: sum(tensor_bytes(param) for param in model.parameters()), "the model"):
        if dist.world > 1:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                if dist.rank == 0:
                    model.save_pretrained(path, safe_serialization=True)
        else:
            model.save_pretrained(path, safe_serialization=True)
        if dist.rank == 0:
            tokenizer.save_pretrained(path)
    dist.barrier()
