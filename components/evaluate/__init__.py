"""Held-out evaluation of a model on a task: greedy accuracy and mean token entropy.

- accuracy: the share of held-out prompts whose greedy completion the task's verifier accepts;
- entropy: the mean per-token entropy of π_θ over the held-out reference completions (teacher-forced,
  the same quantity the training loop reports as `entropy`), so SFT's entropy collapse and PSFT's
  preservation of it show on data the model never trained on.
"""

from __future__ import annotations

import torch

from components.training.batching import encode_example, micro_batches, render_prompt
from components.training.loop import forward_logprobs


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list, *, max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded text, special tokens removed) for chat or string prompts."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    model.eval()
    texts = []
    for s in range(0, len(prompts), batch_size):
        chunk = [render_prompt(tokenizer, p) for p in prompts[s:s + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def mean_entropy(model, tokenizer, rows: list[dict], *, token_budget: int = 4096) -> float:
    """Mean token entropy of the model over the completions of `rows` (teacher-forced)."""
    device = next(model.parameters()).device
    model.eval()
    examples = [encode_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    total, count = 0.0, 0.0
    for mb in micro_batches(examples, token_budget, tokenizer.pad_token_id):
        mb = mb.to(device)
        _, ent = forward_logprobs(model, mb, 2048, autocast=device.type == "cuda")
        total += float((ent * mb.loss_mask).sum())
        count += float(mb.loss_mask.sum())
    return total / max(count, 1.0)


def evaluate_task(model, tokenizer, task, *, n: int, seed: int, split: str, max_new_tokens: int = 32) -> dict:
    """Accuracy (greedy) and mean entropy on `n` held-out test prompts of `task`'s split ("id" or "ood")."""
    rows = task.generate(n, seed=seed, split=split, part="test")
    completions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    scores = [task.verify(r["prompt"], c, r["answer"]) for r, c in zip(rows, completions)]
    return {"accuracy": sum(scores) / len(scores), "entropy": mean_entropy(model, tokenizer, rows), "n": len(rows),
            "samples": [{"prompt": r["prompt"], "completion": c, "answer": r["answer"], "score": s}
                        for r, c, s in list(zip(rows, completions, scores))[:5]]}
