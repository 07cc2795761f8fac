"""The RL loop's parts (components/training/rl_loop.py; grpo, ppo): the reference model, samples.jsonl, the
rollout's seed, a round's minibatches, and a per-completion-token pass of a model over a round's sequences (the
reference's log-probs, the critic's values)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from components.training.batching import Example, PackedBatch
from components.training.loop import Session


def reference_model(cfg, policy, device, kl_coef: float):
    """The model a KL term compares the policy with, or None when kl_coef is 0: cfg.ref_model, else the starting
    policy (cfg.model) loaded again, frozen; a LoRA policy with no ref_model is its own reference (its base, the
    adapter disabled), so no second model is loaded."""
    if kl_coef <= 0:
        return None
    if cfg.lora.enabled and not cfg.ref_model:
        return policy
    return cfg.loading.load_model(cfg.ref_model or cfg.model).to(device).eval().requires_grad_(False)


def write_samples(path: Path, rollout, count: int, fields: Callable[[int], dict]) -> None:
    """Append `count` of a round's scored completions, evenly spaced, to samples.jsonl: the round, prompt,
    completion and answer of each, and `fields(sample)` (the stage's own: reward and advantage, score and value).

    The file keeps only the rounds before this one: a run resumed from a checkpoint redoes the rounds after it,
    and a fresh run in the same output_dir starts at round 1, so their old lines are dropped (as metrics.jsonl
    drops the steps after the checkpoint), never repeated."""
    size = len(rollout.examples)
    _keep_rounds_before(path, rollout.index + 1)
    with path.open("a") as f:
        for sample in range(0, size, max(1, size // max(count, 1)))[:count]:
            row = rollout.rows[sample]
            f.write(json.dumps({"round": rollout.index + 1, "prompt": row["prompt"],
                                "completion": rollout.completions[sample], "answer": row.get("answer"),
                                **fields(sample)}) + "\n")


def _last_line(path: Path, chunk: int = 1 << 16) -> tuple[bytes, bool]:
    """The file's last line (without its newline), read from the end, and whether a newline ends it."""
    with path.open("rb") as f:
        end = f.seek(0, 2)
        tail = b""
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            tail = f.read(end - start) + tail
            end = start
            if b"\n" in tail[:-1]:
                break
    return tail.rstrip(b"\n").rsplit(b"\n", 1)[-1], tail.endswith(b"\n")


def _round_of(line: bytes | str) -> int | None:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill or a full disk


def _keep_rounds_before(path: Path, round_number: int) -> None:
    """Drop the lines of rounds `round_number` and later (and a torn line) from samples.jsonl. The rounds are
    written in order, so the file is rewritten only when its last line is not of an earlier round: a resume."""
    if not path.exists() or path.stat().st_size == 0:
        return
    last, whole = _last_line(path)
    if whole and (_round_of(last) or round_number) < round_number:
        return
    lines = path.read_bytes().split(b"\n")[:-1]  # (what follows the last newline is a torn line)
    path.write_bytes(b"".join(line + b"\n" for line in lines if (_round_of(line) or round_number) < round_number))


def rollout_seed(seed: int, round_index: int) -> int:
    """The sampling seed of round `round_index` (0-based); sample j of the prompt at place p of the round is drawn
    from (this seed, p, j) (rollout.sample_seed), so the round samples the same completions on any number of ranks.

    Built from the stage's seed and the round, and nothing else:
    - distinct for every round, so no round repeats another's random draws;
    - a function of the round index alone, so a run resumed at a round boundary samples exactly what the
      uninterrupted run sampled (the rollout draws from a generator of its own, not from the global RNG);
    - independent of the data order: the prompts of a round come from step_indices' shuffles (seeded with
      seed × 100_003 + epoch), which this seed neither feeds nor reads, so changing the sampling settings
      does not change which prompts a round takes.
    """
    return seed * 1_000_003 + round_index * 97


def minibatches(kept: list[int], num_iterations: int, num_steps: int, shuffle: tuple[int, int] | None = None,
                ) -> list[list[int]]:
    """The samples of each optimizer step of a round: `num_iterations` passes over the kept samples, cut into
    `num_steps` consecutive minibatches of one size (the last takes the rest). With nothing kept every step
    gets an empty minibatch: the steps are still taken, so the step count and the ranks' collectives match.

    shuffle (seed, round index): each pass takes the kept samples in an order of its own (TRL's PPOTrainer draws
    a permutation per epoch) and is cut into num_steps / num_iterations minibatches of its own, so a pass's
    minibatches are not the previous pass's again and none holds a sample twice. The order is a function
    of (seed, round, pass) alone, drawn from a generator of its own: a resumed run cuts the round as the
    uninterrupted one did, and the global RNG is left alone."""
    if shuffle is None:
        return _cut(kept * num_iterations, num_steps)
    if num_steps % num_iterations:
        raise ValueError(f"{num_steps} steps do not divide into {num_iterations} shuffled passes")
    seed, round_index = shuffle
    # each pass cut on its own: a minibatch never spans two passes, so it never holds a sample twice
    passes = [random.Random(f"minibatches/{seed}/{round_index}/{epoch}").sample(kept, len(kept))
              for epoch in range(num_iterations)]
    return [minibatch for order in passes for minibatch in _cut(order, num_steps // num_iterations)]


def _cut(order: list[int], num_steps: int) -> list[list[int]]:
    """`order` in `num_steps` consecutive minibatches of one size (the last takes the rest)."""
    size = max(1, len(order) // num_steps) if order else 0
    return [order[index * size:(index + 1) * size] if index < num_steps - 1 else order[index * size:]
            for index in range(num_steps)]


@torch.no_grad()
def per_completion_token(session: Session, examples: list[Example], pad_id: int,
                         forward: Callable[[PackedBatch], torch.Tensor]) -> list[torch.Tensor]:
    """`forward(micro_batch)` (a value per position, shaped like its targets) at each example's completion tokens,
    in one pass over the examples: out[i][j] is the value at the position that predicts completion token j."""
    out: list[torch.Tensor | None] = [None] * len(examples)
    for micro_batch in session.micro_batches(examples, pad_id):
        values = forward(micro_batch)
        for sequence in micro_batch.seq_index.unique().tolist():
            if sequence >= 0:
                selected = (micro_batch.seq_index == sequence) & (micro_batch.loss_mask > 0)
                if selected.any():  # (a rank's filler micro-batch has no trained tokens)
                    out[sequence] = values[selected].float().cpu()
    return out


def completion_logprobs(session: Session, model, examples: list[Example], pad_id: int, temperature: float,
                        ) -> list[torch.Tensor]:
    """Per-completion-token log-probs of `model` (the reference, or the policy: π_old) for every example."""
    return per_completion_token(session, examples, pad_id,
                                lambda micro_batch: session.forward(model, micro_batch, temperature)[0])
