"""The SFT loop: `train` on dataset tokens with SFT, PSFT or SFT-KL, on the engine's `Session`.

- PSFT freezes π_old for `updates_per_batch` optimizer steps: at the first step of each block its log-probs for the
  block's sequences are computed once, then every step of the block trains against them; a checkpoint keeps the
  cached log-probs of the steps after it. At the block's first step π_old is the policy being trained, so that step
  takes π_old's log-probs from its own forward (detached) instead of a second pass, unless the model has dropout
  (its training forward is then not π_old's).
- SFT-KL computes the reference model's log-probs for each micro-batch without gradients (a LoRA policy's
  reference: its base, the adapter disabled).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from components.sft.config import SFTObjective
from components.training.batching import Example, PackedBatch
from components.training.config import TrainConfig
from components.training.loop import Session, step_indices
from components.training.lora import base_reference
from components.training.objectives import psft_loss, sft_kl_loss, sft_loss


def train(cfg: TrainConfig, model, examples: list[Example], output_dir: str | Path, *, pad_id: int,
          objective: SFTObjective | None = None, ref_model=None, on_metrics: Callable[[dict], None] | None = None,
          run_config: dict | None = None, setup: Callable[[Session], None] | None = None) -> list[dict]:
    """Train `model` in place on `examples` with SFT, PSFT or SFT-KL; returns the per-step metrics (also in
    output_dir/metrics.jsonl). Resumes from the latest checkpoint in output_dir/checkpoints when there is one
    (and `run_config`, the stage's whole config, is the one it was written under). A `ref_model` that is `model`
    itself (a LoRA policy) means its base, the adapter disabled. `setup` is called with the Session before the
    first step (the stage hands it its evaluator there).
    """
    objective = objective or SFTObjective()
    if objective.method == "sft_kl" and ref_model is None:
        raise ValueError("method sft_kl needs a reference model")
    session = Session(cfg, model, output_dir, on_metrics, run_config)
    if setup is not None:
        setup(session)
    if ref_model is not None and ref_model is not model:  # (the policy itself: a LoRA policy's base is the reference)
        ref_model.to(session.device).eval().requires_grad_(False)
    old_cache = session.resumed.get("old_logp", {})  # step -> π_old log-probs of its micro-batches (None: its own)
    own_first = objective.method == "psft" and not has_dropout(model)  # a block's first step: π_old from its forward

    def step_batches(step: int) -> tuple[list[PackedBatch], list[int]]:
        indices = step_indices(len(examples), cfg.batch_size, step, cfg.seed)[session.dist.rank::session.dist.world]
        local = [examples[index] for index in indices]
        return session.micro_batches(local, pad_id), [len(example) for example in local]

    for step in range(session.start_step, cfg.max_steps):
        started = time.perf_counter()
        batches, lengths = step_batches(step)
        use_clip = objective.method == "psft" and step >= objective.sft_warmup_steps
        if use_clip and step not in old_cache:
            end = min(step + objective.updates_per_batch, cfg.max_steps)
            old_cache = _old_logprobs_block(session, model, step_batches, step, batches, end, itself=own_first)
        normalizer = session.dist.all_reduce_sum(sum(float(batch.loss_mask.sum()) for batch in batches))
        loss_fn = _sft_loss_fn(session, model, objective, normalizer, ref_model,
                               clip=use_clip, old_logprobs=old_cache.get(step))
        result = session.optimize(batches, loss_fn)
        session.record(step, result, normalizer, lengths, time.perf_counter() - started)
        session.maybe_checkpoint(step, {"old_logp": {later: logprobs for later, logprobs in old_cache.items()
                                                     if later > step}})
    return session.finish()


RANDOM_IN_TRAINING = ("dropout", "pdrop", "layerdrop", "jitter")
"""Parts of config keys whose value > 0 makes a model's training forward random: dropout called as a function (OPT,
Falcon and BLOOM call F.dropout), attention dropout, dropped layers, a router's jitter (PhiMoE, Mixtral)."""


def has_dropout(model) -> bool:
    """Whether the model's training forward is random (a dropout layer such as a LoRA adapter's, or a config value
    of RANDOM_IN_TRAINING above 0, sub-configs included), so that it differs from the same weights' forward in eval
    mode."""
    if any(isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0 for module in model.modules()):
        return True
    config = getattr(model, "config", None)
    return _random_settings(config.to_dict() if hasattr(config, "to_dict") else {})


def _random_settings(settings: dict) -> bool:
    for key, value in settings.items():
        if isinstance(value, dict):
            if _random_settings(value):
                return True
        elif (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
              and any(part in key for part in RANDOM_IN_TRAINING)):
            return True
    return False


def _old_logprobs_block(session: Session, model, step_batches, first: int, first_batches: list[PackedBatch],
                        end: int, itself: bool) -> dict[int, list[torch.Tensor] | None]:
    """A new π_old snapshot (PSFT): the log-probs of the sequences of steps first..end-1, computed now; with
    `itself`, step `first`'s are None: its training forward, which runs π_old's weights, gives them."""
    cache: dict[int, list[torch.Tensor] | None] = {first: None} if itself else {}
    model.eval()
    with torch.no_grad():
        for step in range(first + int(itself), end):
            batches = first_batches if step == first else step_batches(step)[0]
            cache[step] = [session.forward(model, batch)[0].cpu() for batch in batches]
    model.train()
    return cache


def _sft_loss_fn(session: Session, model, objective: SFTObjective, normalizer: float, ref_model, *, clip: bool,
                 old_logprobs: list[torch.Tensor] | None):
    """The loss of one micro-batch of a step: with `clip`, PSFT's clipped ratio against `old_logprobs`, π_old's
    log-probs of the step's micro-batches (None: π_old is the model as it is, its own forward gives them); else
    SFT-KL or SFT."""
    def loss_fn(index: int, micro_batch: PackedBatch):
        logprobs, entropy = session.forward(model, micro_batch)
        mask = micro_batch.loss_mask
        if clip:
            old = logprobs.detach() if old_logprobs is None else old_logprobs[index].to(session.device)
            loss, metrics = psft_loss(logprobs, old, mask, normalizer,
                                      epsilon_low=objective.epsilon_low, epsilon_high=objective.epsilon_high)
        elif objective.method == "sft_kl":
            with torch.no_grad(), base_reference(model) if ref_model is model else nullcontext():
                ref_logprobs = session.forward(ref_model, micro_batch)[0]
            loss, metrics = sft_kl_loss(logprobs, ref_logprobs, mask, normalizer, beta=objective.beta)
        else:
            loss, metrics = sft_loss(logprobs, mask, normalizer)
        metrics["entropy"] = (entropy * mask).sum()
        return loss, metrics
    return loss_fn
