"""The training loop: `Session` (shared by every objective) and `train` for dataset tokens (SFT, PSFT, SFT-KL).

One optimizer step takes `batch_size` sequences (split across ranks), packs them into micro-batches of at
most `token_budget` tokens, and accumulates gradients over them; the loss is the token-mean over the
whole step, so the result does not depend on how the sequences were packed or sharded.

- PSFT freezes π_old for `updates_per_batch` optimizer steps: at the first step of each block its
  log-probs for the block's sequences are computed once, then every step of the block trains against them.
- SFT-KL computes the reference model's log-probs for each micro-batch without gradients.
- Checkpoints (every `checkpoint_every` steps) hold model, optimizer, scheduler, RNG states and the cached
  π_old log-probs; the data order is a function of (seed, step), so a resumed run repeats the
  uninterrupted one step by step.
- With WORLD_SIZE > 1 (torchrun) the model runs under DeepSpeed ZeRO (stage 2 or 3, optional CPU
  offload); on a single device it is plain torch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar

import torch

from components.training import distributed
from components.training.batching import Example, PackedBatch, micro_batches
from components.training.flops import peak_flops, training_flops
from components.training.logprobs import token_logprobs
from components.training.objectives import psft_loss, sft_kl_loss, sft_loss

log = logging.getLogger(__name__)

METHODS = ("sft", "psft", "sft_kl")


@dataclass(kw_only=True)
class TrainConfig:
    """How to train; the same fields appear in a stage's YAML config."""

    method: str = "sft"
    """Objective: sft (negative log-likelihood), psft (clipped ratio against a frozen π_old), sft_kl (SFT + β·KL)."""
    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step, over all ranks."""
    token_budget: int = 4096
    """Most tokens in one packed micro-batch; gradients accumulate over the micro-batches of a step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr × min_lr_ratio at max_steps."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to norms and biases)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (β1, β2)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed of the data order (and of every other random choice of the stage)."""
    updates_per_batch: int = 1
    """PSFT: optimizer steps per π_old snapshot (reference setting: batch 64, minibatch 8 → 8)."""
    epsilon_low: float = 0.2
    """PSFT and GRPO: lower clip range ε_low."""
    epsilon_high: float = 0.28
    """PSFT and GRPO: upper clip range ε_high."""
    sft_warmup_steps: int = 0
    """PSFT: plain SFT for this many steps before the clipped objective starts."""
    beta: float = 0.1
    """SFT-KL: weight of the KL penalty to the reference model."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: none; the stage saves the final model either way)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    precision: str = "auto"
    """fp32 | bf16-mixed (bf16 autocast, fp32 weights and optimizer) | auto (bf16-mixed on GPU, fp32 on CPU)."""
    loss_chunk_size: int = 2048
    """Tokens per chunk of the language-model head, log-softmax and entropy."""
    log_every: int = 10
    """Log a metrics line every N steps (every step is written to metrics.jsonl)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (2 or 3) when WORLD_SIZE > 1."""
    offload: bool = False
    """DeepSpeed: offload optimizer states (and with stage 3, parameters) to CPU."""

    unused_fields: ClassVar[tuple[str, ...]] = ()
    """Fields of the training settings that a stage extending them does not read: any value but the default is
    refused, so a setting never silently does nothing."""

    def training(self) -> "TrainConfig":
        """The training settings alone, from a stage's config that extends them."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")
        if self.method not in METHODS:
            bad("method", f"one of {', '.join(METHODS)}")
        for name in ("max_steps", "batch_size", "token_budget", "updates_per_batch", "loss_chunk_size", "log_every",
                     "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        for name in ("warmup_steps", "sft_warmup_steps", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "an integer ≥ 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "a number in [0, 1]")
        if not 0 < self.epsilon_low < 1:
            bad("epsilon_low", "a number in (0, 1)")
        if not (math.isfinite(self.epsilon_high) and self.epsilon_high > 0):
            bad("epsilon_high", "a positive number")
        for name in ("beta", "weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a number ≥ 0")
        if self.precision not in ("auto", "fp32", "bf16-mixed"):
            bad("precision", "auto, fp32 or bf16-mixed")
        if self.zero_stage not in (2, 3):
            bad("zero_stage", "2 or 3")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            bad("adam_betas", "two numbers in [0, 1): (β1, β2)")
        self.adam_betas = betas
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for name in self.unused_fields:
            if getattr(self, name) != defaults[name]:
                bad(name, "not used by this stage (the sft stage's methods read it); remove it")


# ----------------------------------------------------------------------------------------------------
# Data order: a function of (seed, step), so resuming needs nothing but the step.

def step_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the sequences of optimizer step `step`: consecutive slices of per-epoch shuffles."""
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, num_examples)
        out.append(_epoch_order(num_examples, seed, epoch)[i])
    return out


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------------------------------
# Forward: hidden states of a packed row, then chunked log-probs through the head.

def forward_logprobs(model, batch: PackedBatch, chunk_size: int, autocast: bool, temperature: float = 1.0,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(target) and entropy for a packed micro-batch (attention masked by position ids)."""
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                  use_cache=False).last_hidden_state
        return token_logprobs(model.get_output_embeddings(), hidden, batch.targets, chunk_size=chunk_size,
                              temperature=temperature)


# ----------------------------------------------------------------------------------------------------

class Session:
    """What every training loop shares: device and precision, the engine (plain or DeepSpeed), resume from
    the latest checkpoint, one optimizer step over packed micro-batches, and the per-step metrics record.

    The loops differ only in where a step's micro-batches come from and in the loss of each (SFT/PSFT/SFT-KL
    below; DPO and GRPO in their stages).
    """

    def __init__(self, cfg: TrainConfig, model, output_dir: str | Path,
                 on_metrics: Callable[[dict], None] | None = None):
        self.cfg, self.model, self.out, self.on_metrics = cfg, model, Path(output_dir), on_metrics
        self.dist = dist = distributed.init()
        self.device = dist.device
        self.autocast = cfg.precision == "bf16-mixed" or (cfg.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model.to(self.device)
        model.config.use_cache = False
        model.train()
        self.engine = distributed.make_engine(model, cfg, lr_lambda(cfg), dist)
        self.varlen = model.config._attn_implementation in ("flash_attention_2", "flash_attention_3")
        self.ckpt_root = self.out / "checkpoints"
        self.start_step, self.resumed = 0, {}
        latest = distributed.latest_checkpoint(self.ckpt_root)
        if latest is not None:
            state = self.engine.load(latest)
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
                lines = self.metrics_path.read_text().splitlines()
                kept = [(ln, rec) for ln, rec in zip(lines, map(json.loads, lines)) if rec["step"] <= self.start_step]
                self.metrics_path.write_text("".join(ln + "\n" for ln, _ in kept))
                self.history = [rec for _, rec in kept]

    def forward(self, model, mb: PackedBatch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_logprobs(model, mb, self.cfg.loss_chunk_size, self.autocast, temperature)

    def micro_batches(self, examples: list[Example], pad_id: int, groups: list[list[int]] | None = None,
                      ) -> list[PackedBatch]:
        """This rank's micro-batches on the device; every rank gets the same count (collectives must match)."""
        mbs = micro_batches(examples, self.cfg.token_budget, pad_id, single_row=self.varlen, groups=groups)
        for _ in range(self.dist.all_reduce_max(len(mbs)) - len(mbs)):
            mbs.append(micro_batches([Example([pad_id] * 8, 8)], 8, pad_id)[0])
        return [mb.to(self.device) for mb in mbs]

    def optimize(self, batches: list[PackedBatch], loss_fn) -> tuple[float, dict[str, float], float, float]:
        """Backward `loss_fn(i, mb) -> (loss, metric sums)` over every micro-batch, then one optimizer step.

        Returns (summed loss, summed metrics, grad norm, the step's learning rate); sums are local to this rank.
        """
        sums: dict[str, float] = {}
        loss_total = 0.0
        for i, mb in enumerate(batches):
            loss, m = loss_fn(i, mb)
            self.engine.backward(loss * self.dist.world, last=i == len(batches) - 1)
            loss_total += float(loss.detach())
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        lr = self.engine.lr()
        grad_norm = self.engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss_total, sums, grad_norm, lr

    def record(self, step: int, loss: float, sums: dict[str, float], normalizer: float, grad_norm: float, lr: float,
               lengths: list[int], seconds: float, extra: dict | None = None) -> dict:
        """Reduce a step's numbers over ranks, write its metrics line (rank 0) and return it.

        `sums` are divided by `normalizer` (the step's trained-token count); `extra` is reported as is.
        """
        dist = self.dist
        totals = dist.all_reduce_sums({"loss": loss, **sums})
        tokens = dist.all_reduce_sum(float(sum(lengths)))
        flops = dist.all_reduce_sum(training_flops(self.model, lengths))
        rec = {"step": step + 1, "loss": totals.pop("loss"),
               **{k: v / max(normalizer, 1.0) for k, v in totals.items()}, **(extra or {}),
               "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "trained_tokens": normalizer, "flops": flops,
               "tokens_per_s": tokens / seconds, "mfu": flops / seconds / (self.peak * dist.world) if self.peak else None,
               "step_time_s": seconds}
        self.history.append(rec)
        if dist.rank == 0:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.on_metrics:
                self.on_metrics(rec)
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.max_steps:
                shown = " ".join(f"{k} {rec[k]:.4g}" for k in ("loss", "nll", "entropy", "reward", "rewards/accuracies",
                                                              "grad_norm", "lr", "tokens_per_s") if rec.get(k) is not None)
                log.info("step %d/%d %s", step + 1, self.cfg.max_steps, shown)
        return rec

    def maybe_checkpoint(self, step: int, state: dict | None = None) -> None:
        """After optimizer step `step` (0-based): save a resumable checkpoint when one is due."""
        cfg = self.cfg
        if not (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps):
            return
        self.engine.save(self.ckpt_root / f"step-{step + 1:08d}", {
            "step": step + 1, "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
            "config": asdict(cfg), **(state or {})})
        if self.dist.rank == 0:
            for old in sorted(self.ckpt_root.glob("step-*"))[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def finish(self) -> list[dict]:
        self.model.eval()
        return self.history


def train(cfg: TrainConfig, model, examples: list[Example], output_dir: str | Path, *, pad_id: int,
          ref_model=None, on_metrics: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place on `examples` with SFT, PSFT or SFT-KL; returns the per-step metrics (also in
    output_dir/metrics.jsonl). Resumes from the latest checkpoint in output_dir/checkpoints when there is one.
    """
    if cfg.method == "sft_kl" and ref_model is None:
        raise ValueError("method sft_kl needs a reference model")
    sess = Session(cfg, model, output_dir, on_metrics)
    if ref_model is not None:
        ref_model.to(sess.device).eval().requires_grad_(False)
    old_cache = sess.resumed.get("old_logp", {})

    def step_batches(step: int) -> tuple[list[PackedBatch], list[int]]:
        idx = step_indices(len(examples), cfg.batch_size, step, cfg.seed)[sess.dist.rank::sess.dist.world]
        local = [examples[i] for i in idx]
        return sess.micro_batches(local, pad_id), [len(e) for e in local]

    for step in range(sess.start_step, cfg.max_steps):
        t0 = time.perf_counter()
        batches, lengths = step_batches(step)
        use_clip = cfg.method == "psft" and step >= cfg.sft_warmup_steps
        if use_clip and step not in old_cache:
            # a new π_old snapshot: log-probs of the next `updates_per_batch` steps' sequences, computed now
            old_cache = {}
            model.eval()
            with torch.no_grad():
                for s in range(step, min(step + cfg.updates_per_batch, cfg.max_steps)):
                    mbs = batches if s == step else step_batches(s)[0]
                    old_cache[s] = [sess.forward(model, mb)[0].cpu() for mb in mbs]
            model.train()
        normalizer = sess.dist.all_reduce_sum(sum(float(mb.loss_mask.sum()) for mb in batches))

        def loss_fn(i: int, mb: PackedBatch):
            logp, entropy = sess.forward(model, mb)
            mask = mb.loss_mask
            if use_clip:
                loss, m = psft_loss(logp, old_cache[step][i].to(sess.device), mask, normalizer,
                                    epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high)
            elif cfg.method == "sft_kl":
                with torch.no_grad():
                    ref_logp = sess.forward(ref_model, mb)[0]
                loss, m = sft_kl_loss(logp, ref_logp, mask, normalizer, beta=cfg.beta)
            else:
                loss, m = sft_loss(logp, mask, normalizer)
            m["entropy"] = (entropy * mask).sum()
            return loss, m

        loss, sums, grad_norm, lr = sess.optimize(batches, loss_fn)
        sess.record(step, loss, sums, normalizer, grad_norm, lr, lengths, time.perf_counter() - t0)
        sess.maybe_checkpoint(step, {"old_logp": {s: v for s, v in old_cache.items() if s > step}})
    return sess.finish()


def _to_pystate(s):
    """random.setstate needs tuples; a checkpoint may hand back lists."""
    return (s[0], tuple(s[1]), s[2]) if isinstance(s, (list, tuple)) else s
