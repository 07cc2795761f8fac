"""Reward-model stage: a scalar head on a causal LM, trained on preference pairs with a Bradley–Terry loss.

Single device:   python -m components.reward_model --config rm.yaml    (or: posttrain stage reward_model --config ...)
N ranks:         torchrun --nproc-per-node N -m components.reward_model --config rm.yaml   (DeepSpeed ZeRO)

The model starts from the policy's (or the SFT model's) weights, and `head` says how it scores a sequence:

- scalar: AutoModelForSequenceClassification with num_labels=1, the transformer as trained and a new linear score
  head; the score is the head's output at the sequence's last non-pad token, as the sequence-classification
  model gives it.
- logprob: the causal LM itself; the score is β·Σ log π(token | what precedes it) over the completion's tokens (its
  closing EOS included), the model's own next-token predictions (the implicit reward of reference-free preference
  optimization). A small model that cannot yet carry "is this answer right" in one hidden state still compares
  each answer token with what it would have predicted there.

A pair's chosen and rejected sequences are rendered and tokenized exactly as the `reward_model` reward reads them
(components/rewards/reward_model.py: chat template, left truncation) and share a micro-batch. Loss per pair:
−log σ(r_c − r_r − margin) + center_rewards_coefficient·(r_c + r_r)², the mean over a step's pairs.

A share of the pairs (`eval_fraction`, by a hash of the prompt: every pair of a prompt falls on the same side) is
held out; on it the stage reports eval/accuracy, eval/margin, eval/mean_reward, eval/std_reward and eval/loss at
the end (and every `eval_every` steps).

Outputs in `output_dir`: model/ (Hugging Face, safetensors, with the tokenizer: what the `reward_model` reward
loads; its config.json says `reward_head` and, for head logprob, `reward_beta`, so the reward scores the same
way),
metrics.jsonl, summary.json, checkpoints/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from components import tracking
from components.config import require, stage_main
from components.datasets import load_rows, preference_row, prompt_key, read_jsonl
from components.reward_model.config import RewardModelConfig
from components.rewards.reward_model import encode as encode_scored
from components.rewards.reward_model import render
from components.training.batching import Example, PackedBatch, pair_groups, sequence_sums, trained_sequences
from components.training.distributed import save_model
from components.training.loop import Session, StepResult, step_indices
from components.training.objectives import bradley_terry_loss

log = logging.getLogger("components.reward_model")

PAIR_KEYS = ("accuracy", "margin", "mean_reward")


def held_out(prompt, fraction: float) -> bool:
    """Whether a pair of this prompt is held out: a hash of the prompt, so the split is the same in every run."""
    digest = hashlib.sha256(("reward_model:" + prompt_key(prompt)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def encode(tokenizer, prompt, completion: str, max_length: int, head: str = "scalar") -> Example:
    """The tokens the reward reads for (prompt, completion). `completion_start` marks what is scored: head scalar,
    the last non-pad token (where the sequence-classification model reads its score); head logprob, the
    completion's first token (every token from it on is scored)."""
    if head == "logprob":
        return Example(*encode_scored(tokenizer, prompt, completion, max_length))
    ids = tokenizer(render(tokenizer, prompt, completion), truncation=True, max_length=max_length,
                    add_special_tokens=not tokenizer.chat_template)["input_ids"]
    scored = max((i for i, token in enumerate(ids) if token != tokenizer.pad_token_id), default=len(ids) - 1)
    return Example(ids, scored)


def load_reward_model(cfg: RewardModelConfig, pad_token_id: int):
    """The model to train: the scalar-head model (`load_scalar_model`) or, for head logprob, the causal LM."""
    if cfg.head == "logprob":
        return cfg.loading.load_model(cfg.model)
    return cfg.loading.load_scalar_model(cfg.model, pad_token_id)


def scores(session: Session, model, batch: PackedBatch, examples: list[Example], head: str = "scalar",
           beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The score of each example in the packed micro-batch (head scalar: its head output at its scored token; head
    logprob: β times the sum of its completion tokens' log-probs) and a mask of the examples present in it."""
    if head == "logprob":
        logprobs, _ = session.forward(model, batch)
        sums = sequence_sums(logprobs.float(), batch, len(examples))
        return beta * sums, trained_sequences(batch, len(examples))
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=session.autocast):
        hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                  use_cache=False).last_hidden_state
        seq = batch.seq_index
        scored = torch.tensor([example.completion_start for example in examples], device=seq.device)
        hit = (seq >= 0) & (batch.position_ids == scored[seq.clamp(min=0)])
        values = model.score(hidden[hit]).float().reshape(-1)
    out = torch.zeros(len(examples), dtype=values.dtype, device=values.device).index_put((seq[hit],), values)
    present = torch.zeros(len(examples), dtype=torch.bool, device=seq.device)
    present[seq[hit]] = True
    return out, present


def run(cfg: RewardModelConfig) -> dict:
    with tracking.stage_run("reward_model", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        return _run(cfg, tracked)


def _run(cfg: RewardModelConfig, tracked) -> dict:
    out = Path(cfg.output_dir)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    tokenizer.truncation_side = "left"
    rows = load_rows(cfg.train_data, preference_row, max_bad_fraction=cfg.max_bad_fraction)
    rejected_rows = sum(1 for _ in read_jsonl(cfg.train_data)) - len(rows)
    pairs = {"train": [], "eval": []}
    for row in rows:
        pair = (encode(tokenizer, row["prompt"], row["chosen"], cfg.max_length, cfg.head),
                encode(tokenizer, row["prompt"], row["rejected"], cfg.max_length, cfg.head))
        pairs["eval" if held_out(row["prompt"], cfg.eval_fraction) else "train"].append(pair)
    train_pairs, eval_pairs = pairs["train"], pairs["eval"]
    require(len(train_pairs) > 0, "eval_fraction", cfg.eval_fraction, f"a share that leaves training pairs of "
            f"the {len(rows)} in {cfg.train_data}")
    log.info("%d pairs: %d to train on, %d held out; %d rows rejected", len(rows), len(train_pairs), len(eval_pairs),
             rejected_rows)
    torch.manual_seed(cfg.train.seed)  # the new score head's initialization
    model = load_reward_model(cfg, tokenizer.pad_token_id)
    session = Session(cfg.train, model, out, on_metrics=tracked.log_metrics, run_config=asdict(cfg))
    dist, pad_id = session.dist, tokenizer.pad_token_id

    for step in range(session.start_step, cfg.train.max_steps):
        started = time.perf_counter()
        indices = step_indices(len(train_pairs), cfg.train.batch_size, step, cfg.train.seed)[dist.rank::dist.world]
        examples = [example for index in indices for example in train_pairs[index]]
        result, tokens, pair_metrics = rm_step(cfg, session, model, examples, pad_id)
        extra = dict(pair_metrics)
        last = step + 1 == cfg.train.max_steps  # evaluated after training; in the record too when export best ranks it
        if eval_pairs and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and (
                not last or cfg.train.export == "best"):
            extra.update(evaluate(cfg, session, model, eval_pairs, pad_id))
        session.record(step, result, tokens, [len(example) for example in examples], time.perf_counter() - started,
                       extra=extra)
        session.maybe_checkpoint(step)

    history = session.finish()
    final_eval = evaluate(cfg, session, model, eval_pairs, pad_id) if eval_pairs else {}
    summary = {"pairs": len(rows), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
               "rejected_rows": rejected_rows, "steps": len(history), **final_eval,
               "final": {**(history[-1] if history else {}), **final_eval}, **session.exported}
    model.config.reward_head = cfg.head  # what the `reward_model` reward reads to score as trained
    if cfg.head == "logprob":
        model.config.reward_beta = cfg.beta
    save_model(model, tokenizer, out / "model", dist)
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s; %s", out / "model", " ".join(f"{k} {v:.4g}" for k, v in final_eval.items()))
    return summary


def rm_step(cfg: RewardModelConfig, session: Session, model, examples: list[Example], pad_id: int,
            ) -> tuple[StepResult, float, dict[str, float]]:
    """One optimizer step on this rank's pairs (`examples` in (chosen, rejected) order). Returns the step's
    result, its token count over all ranks, and the pair metrics (PAIR_KEYS) as means over all ranks' pairs."""
    dist = session.dist
    batches = session.micro_batches(examples, pad_id, groups=pair_groups(len(examples)))
    num_pairs = dist.all_reduce_sum(float(len(examples) // 2))
    tokens = dist.all_reduce_sum(float(sum(len(example) for example in examples)))

    def loss_fn(index, micro_batch):
        values, present = scores(session, model, micro_batch, examples, cfg.head, cfg.beta)
        complete = present[0::2] & present[1::2]
        losses, metrics = bradley_terry_loss(values[0::2][complete], values[1::2][complete], margin=cfg.margin,
                                             center_rewards_coefficient=cfg.center_rewards_coefficient)
        return losses.sum() / max(num_pairs, 1.0), {name: value.sum() for name, value in metrics.items()}

    result = session.optimize(batches, loss_fn)
    reduced = dist.all_reduce_sums({key: result.sums.pop(key, 0.0) for key in PAIR_KEYS})
    return result, tokens, {key: value / max(num_pairs, 1.0) for key, value in reduced.items()}


@torch.no_grad()
def evaluate(cfg: RewardModelConfig, session: Session, model, eval_pairs: list[tuple[Example, Example]],
             pad_id: int) -> dict[str, float]:
    """eval/accuracy, eval/margin, eval/mean_reward, eval/std_reward (of all scores) and eval/loss on the held-out
    pairs, each rank scoring its share."""
    dist = session.dist
    mine = eval_pairs[dist.rank::dist.world]
    examples = [example for pair in mine for example in pair]
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    for batch in session.micro_batches(examples, pad_id, groups=pair_groups(len(examples))):
        values, present = scores(session, model, batch, examples, cfg.head, cfg.beta)
        complete = (present[0::2] & present[1::2]).nonzero().reshape(-1)
        chosen += [(int(i), float(values[2 * i])) for i in complete]
        rejected += [(int(i), float(values[2 * i + 1])) for i in complete]
    model.train(was_training)
    gathered = dist.all_gather((sorted(chosen), sorted(rejected)))
    r_c = torch.tensor([v for c, _ in gathered for _, v in c], dtype=torch.float64)
    r_r = torch.tensor([v for _, r in gathered for _, v in r], dtype=torch.float64)
    losses, metrics = bradley_terry_loss(r_c, r_r, margin=cfg.margin,
                                         center_rewards_coefficient=cfg.center_rewards_coefficient)
    both = torch.cat([r_c, r_r])
    return {"eval/accuracy": float(metrics["accuracy"].mean()), "eval/margin": float(metrics["margin"].mean()),
            "eval/mean_reward": float(both.mean()), "eval/std_reward": float(both.std()) if len(both) > 1 else 0.0,
            "eval/loss": float(losses.mean())}


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, RewardModelConfig, run, argv)


if __name__ == "__main__":
    main()
