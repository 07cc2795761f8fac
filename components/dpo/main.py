"""DPO stage: direct preference optimization on {"prompt", "chosen", "rejected"} pairs.

Single device:   python -m components.dpo --config dpo.yaml      (or: posttrain stage dpo --config dpo.yaml)
N ranks:         torchrun --nproc-per-node N -m components.dpo --config dpo.yaml   (DeepSpeed ZeRO)

The reference model's log-probs of every chosen and rejected completion are computed once, in a pass before
training, and the reference model is then dropped: it is never in memory while the policy trains (with no
`ref_model` the reference is the starting policy itself, so no second model is ever loaded; with LoRA it is the
base model with the adapter disabled). Chosen and rejected share a micro-batch (each in a row of its own), so one
forward gives both; the loss of a step is the mean over its pairs of sigmoid, ipo, hinge or robust DPO
(components/training/objectives.py).

Outputs in `output_dir`: model/ (Hugging Face, safetensors), metrics.jsonl (rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins per step), summary.json, checkpoints/.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from components import tracking
from components.config import stage_main
from components.datasets import load_rows, preference_row
from components.dpo.config import DPOConfig
from components.evaluation.during_training import attach as attach_eval
from components.training.batching import Example, encode_example, pair_groups, sequence_sums, trained_sequences
from components.training.loop import Session, StepResult, step_indices
from components.training.lora import base_reference, is_lora, load_policy, save_policy
from components.training.objectives import dpo_loss

log = logging.getLogger("components.dpo")

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll")


def encode_pairs(rows: list[dict], tokenizer, max_length: int, where: str) -> tuple[list[tuple[Example, Example]], int]:
    """Tokenize pairs; returns (pairs, number dropped for exceeding max_length)."""
    pairs, dropped = [], 0
    for index, row in enumerate(rows):
        chosen = encode_example(tokenizer, row["prompt"], row["chosen"], source=f"{where} pair {index + 1}")
        rejected = encode_example(tokenizer, row["prompt"], row["rejected"], source=f"{where} pair {index + 1}")
        longest = max(len(chosen), len(rejected))
        if longest > max_length:
            dropped += 1
            log.info("%s: dropped, %d tokens > max_length=%d", chosen.source, longest, max_length)
            continue
        pairs.append((chosen, rejected))
    if not pairs:
        raise ValueError(f"{where}: no pair fits in max_length={max_length}")
    return pairs, dropped


def _pair_logprobs(session: Session, model, examples: list[Example], pad_id: int, average: bool) -> torch.Tensor:
    """Σ (or mean, for ipo) of completion-token log-probs per example; examples come in (chosen, rejected) order."""
    out = torch.zeros(len(examples), dtype=torch.float64)
    for micro_batch in session.micro_batches(examples, pad_id, groups=pair_groups(len(examples))):
        logprobs, _ = session.forward(model, micro_batch)
        sums = sequence_sums(logprobs.float(), micro_batch, len(examples))
        present = trained_sequences(micro_batch, len(examples))
        out[present.cpu()] = sums[present].double().cpu()
    if average:
        out /= torch.tensor([len(example) - example.completion_start for example in examples], dtype=torch.float64)
    return out


def reference_logprobs(cfg: DPOConfig, session: Session, model, examples: list[Example], pad_id: int,
                       ) -> torch.Tensor:
    """The reference pass: the reference model's `_pair_logprobs` of every example, once; the reference model
    is gone when this returns. With no ref_model the reference is the policy before training; a resumed run's
    policy holds the checkpoint's weights, so that reference is loaded again from cfg.model. A LoRA policy's
    reference is its own base, the adapter disabled, before training and after a resume alike."""
    lora = is_lora(model)
    ref_path = cfg.ref_model or (cfg.model if session.start_step > 0 and not lora else None)
    if ref_path is None and lora:
        with base_reference(model):
            return _pair_logprobs(session, model, examples, pad_id, cfg.loss_type == "ipo")
    ref_model = cfg.loading.load_model(ref_path).to(session.device) if ref_path else model
    was_training = model.training
    ref_model.eval()
    with torch.no_grad():
        logprobs = _pair_logprobs(session, ref_model, examples, pad_id, cfg.loss_type == "ipo")
    model.train(was_training)
    return logprobs


def run(cfg: DPOConfig) -> dict:
    with tracking.stage_run("dpo", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def _run(cfg: DPOConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    rows = load_rows(cfg.train_data, preference_row, max_bad_fraction=cfg.max_bad_fraction)
    pairs, dropped = encode_pairs(rows, tokenizer, cfg.max_length, cfg.train_data)
    model = load_policy(cfg.model, cfg.loading, cfg.lora, cfg.train.seed, cfg.train)
    session = Session(cfg.train, model, out, on_metrics=tracked.log_metrics, run_config=asdict(cfg))
    attach_eval(session, cfg.eval, model, tokenizer, tracked=tracked)  # eval.every: eval/<suite>/... in the records
    pad_id, dist = tokenizer.pad_token_id, session.dist

    started = time.perf_counter()
    reference = reference_logprobs(cfg, session, model, [example for pair in pairs for example in pair], pad_id)
    reference_seconds = time.perf_counter() - started
    log.info("reference log-probs of %d pairs in %.1fs", len(pairs), reference_seconds)

    for step in range(session.start_step, cfg.train.max_steps):
        started = time.perf_counter()
        pair_indices = step_indices(len(pairs), cfg.train.batch_size, step, cfg.train.seed)[dist.rank::dist.world]
        examples = [example for index in pair_indices for example in pairs[index]]
        step_reference = torch.stack([reference[2 * index + side] for index in pair_indices for side in (0, 1)])
        result, trained_tokens, pair_metrics = dpo_step(cfg, session, model, examples,
                                                        step_reference.to(session.device), pad_id)
        session.record(step, result, trained_tokens, [len(example) for example in examples],
                       time.perf_counter() - started, extra=pair_metrics)
        session.maybe_checkpoint(step)

    history = session.finish()
    summary = {"pairs": len(pairs), "dropped_overlong": dropped, "steps": len(history),
               "reference_pass_s": reference_seconds,
               "final": history[-1] if history else None,
               "first": history[0] if history else None, **session.exported}
    summary.update(save_policy(model, tokenizer, out / "model", dist, cfg.lora, cfg.model, cfg.loading))
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


def dpo_step(cfg: DPOConfig, session: Session, model, examples: list[Example], reference: torch.Tensor,
             pad_id: int) -> tuple[StepResult, float, dict[str, float]]:
    """One optimizer step on this rank's pairs (`examples` in (chosen, rejected) order, `reference` their
    reference log-probs). Returns the step's result (without the pair metrics), its trained-token count over
    all ranks, and the pair metrics (REWARD_KEYS) as means over all ranks' pairs."""
    dist, average = session.dist, cfg.loss_type == "ipo"
    batches = session.micro_batches(examples, pad_id, groups=pair_groups(len(examples)))
    num_pairs = dist.all_reduce_sum(float(len(examples) // 2))
    trained_tokens = dist.all_reduce_sum(sum(float(batch.loss_mask.sum()) for batch in batches))
    lengths = torch.tensor([len(example) - example.completion_start for example in examples], dtype=torch.float32,
                           device=session.device)

    def loss_fn(index, micro_batch):
        logprobs, entropy = session.forward(model, micro_batch)
        sequence = sequence_sums(logprobs, micro_batch, len(examples))
        if average:
            sequence = sequence / lengths
        present = trained_sequences(micro_batch, len(examples))
        complete_pairs = present[0::2] & present[1::2]  # the pairs of this micro-batch
        chosen, rejected = sequence[0::2][complete_pairs], sequence[1::2][complete_pairs]
        losses, metrics = dpo_loss(chosen, rejected, reference[0::2][complete_pairs].to(sequence.dtype),
                                   reference[1::2][complete_pairs].to(sequence.dtype), beta=cfg.beta,
                                   loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        if cfg.rpo_alpha > 0:
            nll = -chosen if average else -chosen / lengths[0::2][complete_pairs]
            metrics["nll"] = nll.detach()
            losses = losses + cfg.rpo_alpha * nll
        sums = {name: value.sum() for name, value in metrics.items()}
        sums["entropy"] = (entropy * micro_batch.loss_mask).sum()
        return losses.sum() / num_pairs, sums

    result = session.optimize(batches, loss_fn)
    keys = [key for key in REWARD_KEYS if key != "nll" or cfg.rpo_alpha > 0]
    reduced = dist.all_reduce_sums({key: result.sums.pop(key, 0.0) for key in keys})
    return result, trained_tokens, {key: value / num_pairs for key, value in reduced.items()}


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, DPOConfig, run, argv)


if __name__ == "__main__":
    main()
