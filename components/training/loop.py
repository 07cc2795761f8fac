"""The training engine's loop: `Session`, what every training stage shares (the objectives' loops are the stages':
SFT, PSFT and SFT-KL in components/sft/loop.py, DPO, GRPO, PPO and the reward model in their stages).

One optimizer step takes `batch_size` sequences (split across ranks), packs them into micro-batches of at
most `token_budget` tokens, and accumulates gradients over them; the loss is the token-mean over the
whole step, so the result does not depend on how the sequences were packed or sharded.

- Checkpoints (every `checkpoint_every` steps) hold model, optimizer, scheduler, RNG states and what the stage's
  loop adds (PSFT: its cached π_old log-probs); the data order is a function of (seed, step), so a resumed run
  repeats the uninterrupted one step by step. Each records the sha256 of its files and of the data files its
  config names: a corrupt latest checkpoint gives way to the previous intact one, and changed data under the same
  path is refused like a changed config (cached log-probs and the data order belong to the old bytes).
- Finite or stop: a step whose loss or gradient norm is not finite is not applied (one device) and counted;
  more than `max_nonfinite_steps` of them stop the stage, and weights that are not finite are never saved.
- With WORLD_SIZE > 1 (torchrun) the model runs under DeepSpeed ZeRO (stage 2 or 3, optional CPU
  offload); on a single device it is plain torch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from components.config import UserError
from components.storage import sha256_file
from components.threads import ThreadPolicy
from components.training import distributed
from components.training.batching import Example, PackedBatch, micro_batches
from components.training.config import TrainConfig, bf16_autocast
from components.training.flops import peak_flops, training_flops
from components.training.logprobs import token_logprobs
from components.training.lora import is_lora

log = logging.getLogger(__name__)

TRASH = ".pruned-"
"""The prefix a checkpoint is renamed to before it is deleted."""


# ----------------------------------------------------------------------------------------------------
# Data order: a function of (seed, step), so resuming needs nothing but the step.

def step_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the sequences of optimizer step `step`: consecutive slices of per-epoch shuffles."""
    indices = []
    start = step * batch_size
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_examples)
        indices.append(_epoch_order(num_examples, seed, epoch)[offset])
    return indices


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    key = (num_examples, seed, epoch)
    if key not in _ORDER_CACHE:
        order = list(range(num_examples))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------------------------------
# Forward: hidden states of a packed row, then chunked log-probs through the head.


def forward_logprobs(model, batch: PackedBatch, chunk_size: int, autocast: bool, temperature: float = 1.0,
                     chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(target) and entropy for a packed micro-batch (attention masked by position ids), shaped
    like its targets. Only the trained positions (loss mask > 0) go through the language-model head: prompts and
    padding cost no head and no log-softmax, and both values are 0 there. `chunks`: token_logprobs'."""
    causal_lm = model.get_base_model() if is_lora(model) else model  # a LoRA policy: its adapters are inside
    keep = batch.loss_mask > 0
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = causal_lm.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                      use_cache=False).last_hidden_state
        logprobs, entropy = token_logprobs(model.get_output_embeddings(), hidden[keep], batch.targets[keep],
                                           chunk_size=chunk_size, temperature=temperature, chunks=chunks)
    zeros = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
    return zeros.masked_scatter(keep, logprobs), zeros.masked_scatter(keep, entropy)


def to_device(model, device: torch.device) -> None:
    """Move `model` to `device`, leaving ZeRO-3 partitioned weights (built under deepspeed.zero.Init, as
    sharded_loading does) where DeepSpeed placed their shards: only the rest moves (LoRA adapters, buffers)."""
    if not distributed.is_partitioned(model):
        model.to(device)
        return
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if not hasattr(param, "ds_id"):
                    param.data = param.data.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)


# ----------------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    """What one optimizer step (`Session.optimize`) gives back; `Session.record` reduces and logs it."""

    loss: float
    """The loss summed over this rank's micro-batches."""
    sums: dict[str, float]
    """Each metric summed over this rank's micro-batches (record divides them by the step's token count)."""
    grad_norm: float
    """The global gradient norm before clipping."""
    lr: float
    """The learning rate the step was taken with."""
    extra: dict[str, float] = field(default_factory=dict)
    """Metrics already reduced over ranks that the loop reports as they are (GRPO's
    sampling/sampling_logp_difference/*)."""


class Session:
    """What every training loop shares: device and precision, the engine (plain or DeepSpeed), resume from
    the latest checkpoint, one optimizer step over packed micro-batches, and the per-step metrics record.

    The loops differ only in where a step's micro-batches come from and in the loss of each (SFT/PSFT/SFT-KL
    below; DPO and GRPO in their stages).
    """

    def __init__(self, cfg: TrainConfig, model, output_dir: str | Path,
                 on_metrics: Callable[[dict], None] | None = None, run_config: dict | None = None,
                 companions: dict[str, tuple[torch.nn.Module, TrainConfig]] | None = None):
        """`run_config`: the whole stage's config (default: `cfg`'s), stored in each checkpoint; a resume under
        another config is refused unless cfg.allow_config_change.

        `companions`: other trained models of the stage (PPO's critic), by name, each with its own engine and
        optimizer (`self.engines[name]`, built from its TrainConfig: lr, betas, clip; the schedule's shape is
        `cfg`'s). Each checkpoint holds them in `<name>-step-N` beside `step-N`, written before it: `step-N`'s
        COMPLETE marker, written last, vouches for both."""
        self.cfg, self.model, self.out, self.on_metrics = cfg, model, Path(output_dir), on_metrics
        self.run_config = run_config if run_config is not None else asdict(cfg)
        self.dist = dist = distributed.init()
        self.device = dist.device
        self.autocast = bf16_autocast(cfg, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        to_device(model, self.device)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: a shard's full size
        self.threads = ThreadPolicy(params, self.device.type)
        model.config.use_cache = False
        model.train()
        self.engine = distributed.make_engine(model, cfg, lr_lambda(cfg), dist)
        self.engines, self.companions = {}, {name: companion for name, (companion, _) in (companions or {}).items()}
        for name, (companion, companion_cfg) in (companions or {}).items():
            companion.to(self.device)
            companion.config.use_cache = False
            companion.train()
            self.engines[name] = distributed.make_engine(companion, companion_cfg, lr_lambda(cfg), dist)
        self.varlen = model.config._attn_implementation in ("flash_attention_2", "flash_attention_3")
        self.ckpt_root = self.out / "checkpoints"
        if dist.rank == 0:  # what a process killed while pruning left: renamed ones, companions of a removed step
            for trash in self.ckpt_root.glob(f"{TRASH}*"):
                shutil.rmtree(trash, ignore_errors=True)
            for name in self.engines:
                for orphan in self.ckpt_root.glob(f"{name}-step-*"):
                    if not (self.ckpt_root / orphan.name[len(name) + 1:]).exists():
                        shutil.rmtree(orphan, ignore_errors=True)
        self.exported: dict = {}
        self.start_step, self.resumed = 0, {}
        self.data = dist.all_gather(data_fingerprint(self.run_config) if dist.rank == 0 else None)[0]
        latest = self._intact_checkpoint()
        if latest is not None:
            distributed.check_topology(latest, dist)
            state = self.engine.load(latest)
            saved = state.get("config")
            current = self.run_config
            if saved is not None and "data_files" in state:  # (one from before data fingerprints: config only)
                saved, current = {**saved, "data_files": state["data_files"]}, {**current, "data_files": self.data}
            check_resumable(saved, current, latest, cfg.allow_config_change)
            for name, engine in self.engines.items():
                engine.load(latest.with_name(f"{name}-{latest.name}"))
            self.start_step, self.resumed = state["step"], state
            random.setstate(_to_pystate(state["py_rng"]))
            torch.set_rng_state(state["torch_rng"])
            log.info("resumed from %s at step %d", latest, self.start_step)
        self.peak = peak_flops(self.device)
        self.metrics_path = self.out / "metrics.jsonl"
        self.history: list[dict] = []  # every step's record; after a resume, rank 0's starts with the kept ones
        if dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.metrics_path.exists():  # keep the lines of the steps resumed from, drop any after them
                kept = [(line, record) for line, record in read_metrics_lines(self.metrics_path)
                        if record["step"] <= self.start_step]
                self.metrics_path.write_text("".join(line + "\n" for line, _ in kept))
                self.history = [record for _, record in kept]
        # the tolerance of non-finite steps counts those before a resume too
        self.nonfinite = int(dist.all_reduce_max(sum(not _finite_step(record) for record in self.history)))
        self.collapse_warned = False
        self.evaluator: Callable[[int], dict] | None = None
        """Set by a stage that evaluates during training: called by `record` on every rank with the number of
        steps done, after the step; the metrics it returns (reduced over ranks, {} when no evaluation is due) join
        that step's record."""

    def _intact_checkpoint(self) -> Path | None:
        """The newest complete checkpoint whose files (its companions' too) match their checksums, chosen by
        rank 0 for every rank; a corrupt newer one is named in one warning line."""
        choice, corrupt = None, []
        if self.dist.rank == 0:
            for path in distributed.complete_checkpoints(self.ckpt_root):
                problem = self._problem(path)
                if problem is None:
                    choice = path
                    break
                corrupt.append(problem)
            if corrupt and choice is not None:
                log.warning("%s: checkpoint %s is corrupt; resuming from the previous one, %s",
                            self.ckpt_root, corrupt[0], choice.name)
        choice, corrupt = self.dist.all_gather((choice, corrupt))[0]
        if corrupt and choice is None:
            raise UserError(f"{self.ckpt_root}: no intact checkpoint ({'; '.join(corrupt)}); delete {self.ckpt_root} "
                            "to start the stage over")
        return choice

    def _problem(self, path: Path) -> str | None:
        """Why checkpoint `path` (with its companions') must not be loaded; None if it is intact."""
        for part in [path, *(path.with_name(f"{name}-{path.name}") for name in self.engines)]:
            if not part.is_dir():
                return f"{part.name}: missing"
            if (problem := distributed.checkpoint_problem(part)) is not None:
                return f"{part.name}: {problem}"
        return None

    def forward(self, model, micro_batch: PackedBatch, temperature: float = 1.0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = 1
        if self.dist.world > 1 and distributed.is_partitioned(model):  # every rank calls the head as often
            trained = int((micro_batch.loss_mask > 0).sum())
            chunks = self.dist.all_reduce_max(-(-trained // self.cfg.loss_chunk_size))
        return forward_logprobs(model, micro_batch, self.cfg.loss_chunk_size, self.autocast, temperature, chunks)

    def micro_batches(self, examples: list[Example], pad_id: int, groups: list[list[int]] | None = None,
                      ) -> list[PackedBatch]:
        """This rank's micro-batches on the device; every rank gets the same count (collectives must match)."""
        batches = micro_batches(examples, self.cfg.token_budget, pad_id, single_row=self.varlen, groups=groups)
        for _ in range(self.dist.all_reduce_max(len(batches)) - len(batches)):
            batches.append(micro_batches([Example([pad_id] * 8, 8)], 8, pad_id)[0])
        return [batch.to(self.device) for batch in batches]

    def optimize(self, batches: list[PackedBatch], loss_fn, engine: str | None = None) -> StepResult:
        """Backward `loss_fn(index, micro_batch) -> (loss, metric sums)` over every micro-batch, then one
        optimizer step of the model (`engine`: of the companion of that name). The loss and sums of the result
        are local to this rank.
        """
        engine = self.engines[engine] if engine is not None else self.engine
        sums: dict[str, float] = {}
        loss_total = 0.0
        for index, micro_batch in enumerate(batches):
            loss, metrics = loss_fn(index, micro_batch)
            engine.backward(loss * self.dist.world, last=index == len(batches) - 1)
            loss_total += float(loss.detach())
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        lr = engine.lr()
        grad_norm = engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return StepResult(loss=loss_total, sums=sums, grad_norm=grad_norm, lr=lr)

    def record(self, step: int, result: StepResult, normalizer: float, lengths: list[int], seconds: float,
               extra: dict | None = None) -> dict:
        """Reduce a step's numbers over ranks, write its metrics line (rank 0) and return it.

        `result.sums` are divided by `normalizer` (the step's trained-token count); `extra` is reported as is.
        """
        dist = self.dist
        # union: a rank with no sample to train in this step (grpo's filter_zero_std kept none of its groups) has
        # none of the loss's metric sums that the other ranks have
        totals = dist.all_reduce_sums({"loss": result.loss, **result.sums}, union=True)
        tokens = dist.all_reduce_sum(float(sum(lengths)))
        flops = dist.all_reduce_sum(training_flops(self.model, lengths))
        record = {"step": step + 1, "loss": totals.pop("loss"),
                  **{name: value / max(normalizer, 1.0) for name, value in totals.items()}, **(extra or {}),
                  "grad_norm": result.grad_norm, "lr": result.lr, "tokens": tokens, "trained_tokens": normalizer,
                  "flops": flops, "tokens_per_s": tokens / seconds,
                  "mfu": flops / seconds / (self.peak * dist.world) if self.peak else None, "step_time_s": seconds}
        if self.evaluator is not None:
            record.update(self.evaluator(step + 1))
        self.history.append(record)
        if dist.rank == 0:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.on_metrics:
                self.on_metrics(record)
        self._guard(step, record)
        if dist.rank == 0 and ((step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.max_steps):
            shown = " ".join(f"{key} {record[key]:.4g}" for key in (
                "loss", "nll", "entropy", "reward", "rewards/accuracies", "grad_norm", "lr", "tokens_per_s")
                if record.get(key) is not None)
            log.info("step %d/%d %s", step + 1, self.cfg.max_steps, shown)
        return record

    def _guard(self, step: int, record: dict) -> None:
        """Finite or stop: count a step whose loss or gradient norm is not finite, and stop the stage (one line
        naming the step) past train.max_nonfinite_steps. Warn once when training looks collapsed: the loss has
        not moved, or the gradient norm was 0, for train.collapse_steps steps in a row."""
        cfg = self.cfg
        if not _finite_step(record):
            self.nonfinite += 1
            if self.nonfinite > cfg.max_nonfinite_steps:
                raise TrainingDivergedError(
                    f"{self.out}: step {step + 1}/{cfg.max_steps}: loss {record['loss']} and gradient norm "
                    f"{record['grad_norm']}: training diverged ({self.nonfinite} non-finite step(s), "
                    f"train.max_nonfinite_steps {cfg.max_nonfinite_steps}); nothing more is saved: lower train.lr "
                    f"(now {cfg.lr:g}) or check the data")
            log.warning("step %d: loss %s, gradient norm %s: the update is skipped (%d of train.max_nonfinite_steps "
                        "%d)", step + 1, record["loss"], record["grad_norm"], self.nonfinite, cfg.max_nonfinite_steps)
            return
        window = self.history[-cfg.collapse_steps:] if cfg.collapse_steps else []
        if self.collapse_warned or self.dist.rank != 0 or len(window) < cfg.collapse_steps:
            return
        losses = [entry["loss"] for entry in window]
        if all(entry["grad_norm"] == 0 for entry in window) or max(losses) - min(losses) <= 1e-6 * max(
                1.0, abs(losses[-1])):
            self.collapse_warned = True
            log.warning("step %d: training looks collapsed: for the last %d steps (train.collapse_steps) the loss "
                        "did not move (now %.6g) or the gradient norm was 0 (now %.3g); check train.lr (now %g) and "
                        "the data",
                        step + 1, cfg.collapse_steps, losses[-1], window[-1]["grad_norm"], cfg.lr)

    def check_finite_weights(self, what: str) -> None:
        """Refuse to save weights that are not finite (the model's and its companions' trained ones)."""
        bad = [f"{prefix}{name}" for prefix, model in [("", self.model), *((f"{n}.", m) for n, m in
                                                                          self.companions.items())]
               for name in nonfinite_parameters(model)]
        if self.dist.all_reduce_sum(float(len(bad))):
            raise TrainingDivergedError(f"{self.out}: {what}: trained weights are not finite ({len(bad)} tensor(s) on "
                                    f"rank {self.dist.rank}{', first ' + bad[0] if bad else ''}); nothing is saved: "
                                    f"lower train.lr (now {self.cfg.lr:g}) or check the data")

    def maybe_checkpoint(self, step: int, state: dict | None = None) -> None:
        """After optimizer step `step` (0-based): save a resumable checkpoint when one is due."""
        cfg = self.cfg
        if not (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps):
            return
        self.check_finite_weights(f"checkpoint at step {step + 1}")
        path = self.ckpt_root / f"step-{step + 1:08d}"
        from components.diskspace import disk_space, training_state_bytes  # a full disk: one line, not a traceback

        record = self.history[-1] if self.history and self.history[-1]["step"] == step + 1 else {}
        if cfg.keep_top_k or cfg.export == "best":
            if cfg.checkpoint_metric not in record:
                raise UserError(f"{self.out}: step {step + 1}: train.checkpoint_metric {cfg.checkpoint_metric} is not "
                                f"in the step's metrics ({', '.join(sorted(record)) or 'none'}): the stage's eval part "
                                "must evaluate at every checkpoint step (eval.every dividing train.checkpoint_every)")
            if not _finite_number(record[cfg.checkpoint_metric]):
                log.warning("step %d: %s is %s: its checkpoint is kept unranked", step + 1, cfg.checkpoint_metric,
                            record[cfg.checkpoint_metric])
        trained = [(self.model, self.engine), *((self.companions[name], e) for name, e in self.engines.items())]
        with disk_space(path, lambda: sum(training_state_bytes(model, e.optimizer) for model, e in trained),
                        checkpoints=[path, *(path.with_name(f"{name}-{path.name}") for name in self.engines)]):
            for name, engine in self.engines.items():  # before step-N, whose COMPLETE marker is written last
                engine.save(path.with_name(f"{name}-{path.name}"), {})
            self.engine.save(path, {
                "step": step + 1, "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                "config": self.run_config, "data_files": self.data, **(state or {})},
                meta={"step": step + 1, "metrics": record})
        if self.dist.rank == 0:
            self._prune()

    def _ranked(self) -> list[tuple[float, int, Path]]:
        """The complete checkpoints that recorded train.checkpoint_metric, best first: (value, step, path); a tie
        goes to the later step."""
        cfg, out = self.cfg, []
        for path in distributed.complete_checkpoints(self.ckpt_root):
            meta = distributed.read_meta(path)
            value = meta.get("metrics", {}).get(cfg.checkpoint_metric)
            if _finite_number(value):
                out.append((float(value), int(meta["step"]), path))
        sign = 1.0 if cfg.checkpoint_mode == "max" else -1.0
        return sorted(out, key=lambda entry: (sign * entry[0], entry[1]), reverse=True)

    def _prune(self) -> None:
        """Keep the train.keep_checkpoints latest checkpoints and the train.keep_top_k best; remove the rest.

        A checkpoint (then its companions') is first renamed out of the step-* names and then deleted, so a process
        killed while pruning leaves every kept checkpoint whole and no half-deleted one that looks like a
        checkpoint; Session removes the renamed leftovers, and companions whose step-N is gone, when it starts."""
        cfg = self.cfg
        names = sorted(p.name for p in self.ckpt_root.glob("step-*"))
        keep = set(names[-cfg.keep_checkpoints:])
        if cfg.keep_top_k:
            keep |= {path.name for _, _, path in self._ranked()[:cfg.keep_top_k]}
        for name in names:
            if name in keep:
                continue
            for prefix in ["", *(f"{companion}-" for companion in self.engines)]:  # step-N first (it vouches)
                old = self.ckpt_root / f"{prefix}{name}"
                if old.exists():
                    trash = self.ckpt_root / f"{TRASH}{prefix}{name}"
                    shutil.rmtree(trash, ignore_errors=True)
                    old.rename(trash)
                    shutil.rmtree(trash, ignore_errors=True)

    def _export_best(self) -> dict:
        """With train.export best: load the best kept checkpoint's weights into the model when it beats the last
        step (a tie keeps the last). What was exported: {"export_step", "export_metric", "export_value"}."""
        cfg, last = self.cfg, self.history[-1] if self.history else {}
        choice = None
        if self.dist.rank == 0:  # the best intact one (a corrupt one is named and passed over)
            for entry in self._ranked():
                if (problem := self._problem(entry[2])) is None:
                    choice = entry
                    break
                log.warning("export best: checkpoint %s is not used: %s", entry[2].name, problem)
        choice = self.dist.all_gather(choice)[0]
        value = last.get(cfg.checkpoint_metric)
        sign = 1.0 if cfg.checkpoint_mode == "max" else -1.0
        if choice is not None and (not _finite_number(value) or sign * choice[0] > sign * float(value)):
            best, step, path = choice
            self.engine.load(path)
            for name, engine in self.engines.items():  # PPO's critic: the one trained beside that actor
                engine.load(path.with_name(f"{name}-{path.name}"))
            log.info("export best: step %d (%s %.6g), not the last step %s (%s)", step, cfg.checkpoint_metric, best,
                     last.get("step"), value)
            value = best
        else:
            step = last.get("step", self.start_step)
            log.info("export best: the last step %s (%s %s)", step, cfg.checkpoint_metric, value)
        exported = {"export_step": step, "export_metric": cfg.checkpoint_metric, "export_value": value}
        if self.dist.rank == 0 and self.on_metrics:  # on the MLflow run too, at the last step
            self.on_metrics({"step": last.get("step", step), "export/step": step,
                             **({"export/value": value} if _finite_number(value) else {})})
        return exported

    def finish(self) -> list[dict]:
        """The end of training: with train.export best the best checkpoint's weights are loaded (`self.exported`
        says which step; the stage's summary.json records it), and the weights are checked finite (every stage
        saves its model after this)."""
        self.exported = self._export_best() if self.cfg.export == "best" else {}
        self.check_finite_weights("final model")
        self.model.eval()
        for companion in self.companions.values():
            companion.eval()
        return self.history


# keys that change neither the data nor the math of a run: they may differ on resume
RESUME_NEUTRAL = {"train.log_every", "train.keep_checkpoints", "train.checkpoint_every", "train.allow_config_change",
                  "train.max_nonfinite_steps", "train.collapse_steps", "train.keep_top_k", "train.checkpoint_metric",
                  "train.checkpoint_mode", "train.export", "rollout.sync_timeout_s", "rollout.sleep_while_training",
                  "output_dir"}
RESUME_NEUTRAL_PARTS = ("eval.",)
"""Parts whose keys are all resume-neutral: evaluation during training samples from generators of its own."""


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict | None, current: dict, checkpoint: Path, allow_change: bool) -> None:
    """Refuse to resume `checkpoint` (written under config `saved`) with another config: a changed method, lr or
    data would silently continue the old run. The error names every key that differs."""
    if saved is None:
        return
    old = _flat(json.loads(json.dumps(saved, default=str)))
    new = _flat(json.loads(json.dumps(current, default=str)))
    changed = sorted(k for k in old.keys() | new.keys() if k not in RESUME_NEUTRAL
                     and not k.startswith(RESUME_NEUTRAL_PARTS) and old.get(k) != new.get(k))
    if not changed:
        return
    diff = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed)
    if allow_change:
        log.warning("resuming %s under a changed config (train.allow_config_change): %s", checkpoint, diff)
        return
    raise ConfigChanged(f"{checkpoint.parent.parent}: holds a checkpoint of another config or data ({diff}); use "
                        "another output_dir, delete its checkpoints/, or set train.allow_config_change: true to resume "
                        "anyway")


class ConfigChanged(UserError):
    """A stage was rerun into an output_dir whose checkpoint was written under another config."""


class TrainingDivergedError(UserError):
    """Training diverged: a loss, gradient norm or weight is NaN or infinite."""


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_step(record: dict) -> bool:
    return all(isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
               for key in ("loss", "grad_norm"))


def nonfinite_parameters(model) -> list[str]:
    """Names of the trained parameters holding a NaN or an infinity (a ZeRO-3 partitioned one: this rank's
    shard)."""
    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = getattr(param, "ds_tensor", param)
            if param.requires_grad and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


def data_fingerprint(config: dict) -> dict[str, str]:
    """sha256 of every local data file the stage's config names (a key whose value is a file path), by key:
    a path's size and mtime say nothing about its bytes. Directories (models) are left to the config check."""
    out = {}
    for key, value in sorted(_flat(json.loads(json.dumps(config, default=str))).items()):
        if key in RESUME_NEUTRAL or not isinstance(value, str) or "://" in value or len(value) > 4096:
            continue
        try:
            if Path(value).is_file():
                out[key] = "sha256:" + sha256_file(value)
        except OSError:  # (a value that is no path: too long a name, no permission)
            continue
    return out


def read_metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's lines and records. A torn last line (a write cut by a full disk or a killed process) is
    dropped with a warning, so a resume can go on; a bad line before the last is an error naming it."""
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({e}); only the last line may be torn") from None
            log.warning("%s: dropped its torn last line %d (%d bytes)", path, number, len(line))
    return out


def _to_pystate(state):
    """random.setstate needs tuples; a checkpoint may hand back lists."""
    return (state[0], tuple(state[1]), state[2]) if isinstance(state, (list, tuple)) else state
