"""DPO stage: direct preference optimization on {"prompt", "chosen", "rejected"} pairs.

Single device:   python -m components.dpo --config dpo.yaml      (or: posttrain stage dpo --config dpo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.dpo --config dpo.yaml   (DeepSpeed ZeRO)

The reference model's log-probs of every chosen and rejected completion are computed once, in a pass before
training, and the reference model is then dropped: it is never in memory while the policy trains (with no
`ref_model` the reference is the starting policy itself, so no second model is ever loaded). Chosen and
rejected share a packed row, so one forward gives both; the loss of a step is the mean over its pairs of
sigmoid, ipo, hinge or robust DPO (components/training/objectives.py).

Outputs in `output_dir`: model/ (Hugging Face, safetensors), metrics.jsonl (rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins per step), summary.json, checkpoints/.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.datasets import load_rows, preference_row
from components.models import ModelLoading
from components.sft.main import save_model
from components.training.batching import Example, encode_example, sequence_sums, trained_sequences
from components.training.loop import Session, TrainConfig, step_indices
from components.training.objectives import DPO_LOSSES, dpo_loss

log = logging.getLogger("components.dpo")

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll")


@dataclass(kw_only=True)
class DPOConfig(TrainConfig, ModelLoading):
    """A DPO stage: the training settings plus the pairs, the reference and the loss."""

    unused_fields = ("method", "updates_per_batch", "epsilon_low", "epsilon_high", "sft_warmup_steps")

    model: str
    """Policy to start from: a Hugging Face directory with safetensors weights."""
    train_data: str
    """Preference JSONL: {"prompt", "chosen", "rejected"} rows (reward_scoring's pairs.jsonl)."""
    output_dir: str
    """Where model/, metrics.jsonl, summary.json and checkpoints/ go."""
    ref_model: str | None = None
    """Reference model (default: the starting policy)."""
    beta: float = 0.1
    """β: strength of the implicit KL constraint to the reference."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo, hinge or robust."""
    label_smoothing: float = 0.0
    """ε: assumed share of flipped labels (sigmoid and robust losses)."""
    rpo_alpha: float = 0.0
    """α > 0 adds α × the chosen completion's per-token NLL to each pair's loss (RPO): DPO alone may push the
    chosen answer down along with the rejected one, moving probability to neither."""
    batch_size: int = 32
    """Pairs per optimizer step, over all ranks."""
    max_length: int = 1024
    """Longest sequence (prompt + completion) in tokens; a longer pair is dropped and counted."""
    max_bad_fraction: float = 0.0
    """Share of unusable rows tolerated (chosen == rejected, empty prompt, ...); each is reported by line."""

    def __post_init__(self):
        super().__post_init__()
        ModelLoading.__post_init__(self)
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r} is invalid: one of {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} is invalid: a positive number")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha={self.rpo_alpha} is invalid: a number ≥ 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} is invalid: a number in [0, 0.5)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} is invalid: an integer ≥ 2")


def encode_pairs(rows: list[dict], tokenizer, max_length: int, where: str) -> tuple[list[tuple[Example, Example]], int]:
    """Tokenize pairs; returns (pairs, number dropped for exceeding max_length)."""
    pairs, dropped = [], 0
    for i, r in enumerate(rows):
        c = encode_example(tokenizer, r["prompt"], r["chosen"], source=f"{where} pair {i + 1}")
        j = encode_example(tokenizer, r["prompt"], r["rejected"], source=f"{where} pair {i + 1}")
        if max(len(c), len(j)) > max_length:
            dropped += 1
            log.info("%s: dropped, %d tokens > max_length=%d", c.source, max(len(c), len(j)), max_length)
            continue
        pairs.append((c, j))
    if not pairs:
        raise ValueError(f"{where}: no pair fits in max_length={max_length}")
    return pairs, dropped


def _pair_logps(sess: Session, model, examples: list[Example], pad_id: int, average: bool) -> torch.Tensor:
    """Σ (or mean, for ipo) of completion-token log-probs per example; examples come in (chosen, rejected) order."""
    groups = [[k, k + 1] for k in range(0, len(examples), 2)]
    out = torch.zeros(len(examples), dtype=torch.float64)
    for mb in sess.micro_batches(examples, pad_id, groups=groups):
        logp, _ = sess.forward(model, mb)
        sums = sequence_sums(logp.float(), mb, len(examples))
        present = trained_sequences(mb, len(examples))
        out[present.cpu()] = sums[present].double().cpu()
    if average:
        out /= torch.tensor([len(e) - e.completion_start for e in examples], dtype=torch.float64)
    return out


def run(cfg: DPOConfig) -> dict:
    with tracking.stage_run("dpo", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def _run(cfg: DPOConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    tokenizer = cfg.load_tokenizer(cfg.model)
    rows = load_rows(cfg.train_data, preference_row, max_bad_fraction=cfg.max_bad_fraction)
    pairs, dropped = encode_pairs(rows, tokenizer, cfg.max_length, cfg.train_data)
    flat = [e for pair in pairs for e in pair]
    model = cfg.load_model(cfg.model)
    sess = Session(cfg.training(), model, out, on_metrics=tracked.log_metrics)
    pad, dist, ipo = tokenizer.pad_token_id, sess.dist, cfg.loss_type == "ipo"

    # the reference pass: every pair once, then the reference is gone (with no ref_model: the policy before training;
    # a resumed run's policy holds the checkpoint's weights, so that reference is loaded again from cfg.model)
    t0 = time.perf_counter()
    ref_path = cfg.ref_model or (cfg.model if sess.start_step > 0 else None)
    ref_model = cfg.load_model(ref_path).to(sess.device) if ref_path else model
    was_training = model.training
    ref_model.eval()
    with torch.no_grad():
        ref = _pair_logps(sess, ref_model, flat, pad, ipo)
    model.train(was_training)
    del ref_model
    ref_seconds = time.perf_counter() - t0
    log.info("reference log-probs of %d pairs in %.1fs", len(pairs), ref_seconds)

    for step in range(sess.start_step, cfg.max_steps):
        t1 = time.perf_counter()
        pair_idx = step_indices(len(pairs), cfg.batch_size, step, cfg.seed)[dist.rank::dist.world]
        examples = [e for p in pair_idx for e in pairs[p]]
        ref_step = torch.stack([ref[2 * p + k] for p in pair_idx for k in (0, 1)]).to(sess.device)
        groups = [[k, k + 1] for k in range(0, len(examples), 2)]
        batches = sess.micro_batches(examples, pad, groups=groups)
        n_pairs = dist.all_reduce_sum(float(len(pair_idx)))
        tokens = dist.all_reduce_sum(sum(float(mb.loss_mask.sum()) for mb in batches))
        lengths = torch.tensor([len(e) - e.completion_start for e in examples], dtype=torch.float32,
                               device=sess.device)

        def loss_fn(i, mb):
            logp, entropy = sess.forward(model, mb)
            seq = sequence_sums(logp, mb, len(examples))
            if ipo:
                seq = seq / lengths
            present = trained_sequences(mb, len(examples))
            chosen = present[0::2] & present[1::2]
            losses, m = dpo_loss(seq[0::2][chosen], seq[1::2][chosen], ref_step[0::2][chosen].to(seq.dtype),
                                 ref_step[1::2][chosen].to(seq.dtype), beta=cfg.beta, loss_type=cfg.loss_type,
                                 label_smoothing=cfg.label_smoothing)
            if cfg.rpo_alpha > 0:
                nll = -seq[0::2][chosen] if ipo else -seq[0::2][chosen] / lengths[0::2][chosen]
                m["nll"] = nll.detach()
                losses = losses + cfg.rpo_alpha * nll
            sums = {k: v.sum() for k, v in m.items()}
            sums["entropy"] = (entropy * mb.loss_mask).sum()
            return losses.sum() / n_pairs, sums

        loss, sums, grad_norm, lr = sess.optimize(batches, loss_fn)
        keys = [k for k in REWARD_KEYS if k != "nll" or cfg.rpo_alpha > 0]
        reduced = dist.all_reduce_sums({k: sums.pop(k, 0.0) for k in keys})
        extra = {k: v / n_pairs for k, v in reduced.items()}
        sess.record(step, loss, sums, tokens, grad_norm, lr, [len(e) for e in examples],
                    time.perf_counter() - t1, extra=extra)
        sess.maybe_checkpoint(step)

    history = sess.finish()
    summary = {"pairs": len(pairs), "dropped_overlong": dropped, "steps": len(history),
               "reference_pass_s": ref_seconds,
               "final": history[-1] if history else None,
               "first": history[0] if history else None}
    save_model(model, tokenizer, out / "model", dist)
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


CONFIG = DPOConfig


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, DPOConfig, run, argv)


if __name__ == "__main__":
    main()
