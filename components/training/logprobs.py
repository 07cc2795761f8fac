"""Per-token log-probabilities and entropies, computed in chunks.

A forward over a packed micro-batch yields hidden states [T, H]; the language-model head maps them to
[T, V] logits. For V ≈ 150k and T ≈ 8k, fp32 logits alone would take 5 GB, and autograd would keep
them for the backward pass. Here the head, the log-softmax, the gather of the target token and the
entropy run on `chunk_size` tokens at a time inside an activation checkpoint: only one chunk's logits
ever exist, in the forward and again when the backward recomputes them. A chunk whose fp32 logits are small
(≤ CHECKPOINT_ABOVE_BYTES: a small vocabulary) keeps them for the backward instead, since recomputing them would
cost time to save little memory.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHECKPOINT_ABOVE_BYTES = 64 * 2**20


def _chunk_logp_entropy(head: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float,
                        ) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        probs = torch.exp(logits - lse.unsqueeze(-1))
        entropy = lse - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(head: torch.nn.Module, hidden: Tensor, targets: Tensor, *, chunk_size: int = 2048,
                   temperature: float = 1.0, chunks: int = 1) -> tuple[Tensor, Tensor]:
    """log π(targets[t] | hidden[t]) and the entropy of π(· | hidden[t]) for every position t.

    With a temperature, π is softmax(logits / temperature): the distribution a rollout sampled from.

    hidden: [..., H]; targets: [...] token ids (use any valid id where the position is masked out).
    Returns two fp32 tensors shaped like `targets`; the log-probs carry gradients, the entropies do not.

    `chunks`: run the head at least this many times (the ones past the positions on no position): under ZeRO-3
    every call gathers the head's weight with all ranks, so every rank must make as many calls as the others.
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    grad = torch.is_grad_enabled() and h.requires_grad
    recompute = grad and min(chunk_size, h.shape[0]) * head.weight.shape[0] * 4 > CHECKPOINT_ABOVE_BYTES
    logps, ents = [], []
    for index in range(max(-(-h.shape[0] // chunk_size), chunks, 1)):  # no position (a padding micro-batch): the
        # head still runs
        hc, yc = h[index * chunk_size:(index + 1) * chunk_size], y[index * chunk_size:(index + 1) * chunk_size]
        if recompute:
            lp, en = checkpoint(_chunk_logp_entropy, head, hc, yc, temperature, use_reentrant=False)
        else:
            lp, en = _chunk_logp_entropy(head, hc, yc, temperature)
        logps.append(lp)
        ents.append(en)
    return torch.cat(logps).reshape(shape), torch.cat(ents).reshape(shape)
