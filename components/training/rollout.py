"""Rollout: sample n completions per prompt in large batches, with the sampling policy's per-token log-probs.

Generation runs through Hugging Face `generate` (prefill + KV-cached decode; a static cache, which
`generate` compiles, on a GPU), but sampling is done here, in a logits processor with its own seeded
`torch.Generator`: temperature, top-p, and the log-probability of every chosen token under
softmax(logits / temperature), gathered one step later when the chosen token is known. So

- the same seed gives the same samples whatever else used the global RNG;
- log-probs are computed once, while sampling, and equal a teacher-forced forward of the same tokens
  (tested to 1e-4 in fp32): GRPO uses them as log π_old without another pass;
- only one [batch, vocab] row of log-probs exists at a time, never logits for the whole completion.

temperature 0 is greedy decoding (log-probs then under temperature 1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from components.config import positive_ints, require
from components.training.batching import render_prompt
from components.training.loop import is_lora


@dataclass(kw_only=True)
class Sampling:
    """How completions are sampled: the `sampling` part of the stages that sample to train on or to score
    (reward_scoring, grpo, ppo)."""

    temperature: float = 1.0
    """Sampling temperature (the log-probs are those of softmax(logits / temperature))."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 64
    """Most tokens per completion."""
    generation_batch_size: int = 256
    """Sequences decoded together by the rollout."""

    def __post_init__(self):
        require(math.isfinite(self.temperature) and self.temperature > 0, "temperature", self.temperature,
                "a positive number (the stage samples)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        positive_ints(self, "max_new_tokens", "generation_batch_size")

    def sample(self, engine, prompts: list, *, n: int, seed: int) -> Rollout:
        """`n` completions per prompt with these settings from a rollout engine (components/training/engines.py)."""
        return engine.generate(prompts, n=n, temperature=self.temperature, top_p=self.top_p,
                               max_new_tokens=self.max_new_tokens, seed=seed, batch_size=self.generation_batch_size)


@dataclass
class Rollout:
    """Samples in prompt order: sample i answers prompts[prompt_index[i]]; a prompt's n samples are contiguous."""
    prompt_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    """Generated tokens up to and including the first EOS (no padding)."""
    logprobs: list[Tensor] = field(default_factory=list)
    """fp32 log π(token) of each completion token under the sampling distribution (before top-p)."""
    texts: list[str] = field(default_factory=list)
    """Decoded completions, special tokens removed."""
    finished: list[bool] = field(default_factory=list)
    """True where the completion ended with EOS, False where max_new_tokens cut it."""

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def __len__(self) -> int:
        return len(self.texts)


class _Sampler(LogitsProcessor):
    """Chooses the next token (temperature, top-p, seeded) and records the log-prob of the previous choice."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.prev: Tensor | None = None  # log-probs [B, V] of the last step
        self.chosen_logp: list[Tensor] = []

    def record(self, tokens: Tensor) -> None:
        if self.prev is not None:
            self.chosen_logp.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.record(input_ids[:, -1])
        logits = scores.float()
        if self.temperature > 0:
            logits = logits / self.temperature
        logp = torch.log_softmax(logits, dim=-1)
        self.prev = logp
        if self.temperature == 0:
            choice = logp.argmax(-1)
        else:
            probs = logp.exp()
            if self.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest prefix reaching top_p
                probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            choice = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        # hand `generate` (greedy) a distribution that can only pick the chosen token
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, choice[:, None], 0.0)


@contextmanager
def _blank_generation_config(model):
    """`generate` fills every setting it is not given from the checkpoint's generation_config.json, whose
    repetition_penalty, no_repeat_ngram_size, bad_words_ids, ... would change the scores before `_Sampler`
    sees them: the samples would not come from π_θ and their log-probs would not match a forward pass."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, cache: str = "auto") -> Rollout:
    """Sample `n` completions for each prompt (a string or chat messages, rendered by the chat template).

    batch_size: sequences decoded together (prompts × n are split into batches of this size).
    cache: "static" (a fixed-size KV cache that `generate` compiles), "dynamic", or "auto" (static on a GPU).
    """
    if temperature < 0 or not 0 < top_p <= 1 or n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"invalid sampling settings: temperature={temperature} (≥ 0), top_p={top_p} (in (0, 1]), "
                         f"n={n}, max_new_tokens={max_new_tokens}, batch_size={batch_size} (≥ 1)")
    if is_lora(model):  # generate with the Hugging Face model inside, whose layers hold the adapters
        model = model.get_base_model()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = [i for i in range(len(prompts)) for _ in range(n)]
    generator = torch.Generator(device=device).manual_seed(seed)
    use_static = cache == "static" or (cache == "auto" and device.type == "cuda")
    out = Rollout()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row's last prompt token is at the same column
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[r, width - len(encoded[i]):] = 1
        sampler = _Sampler(temperature, top_p, generator)
        with _blank_generation_config(model):
            seq = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([sampler]),
                                 pad_token_id=pad, eos_token_id=eos,
                                 cache_implementation="static" if use_static else None)
        new = seq[:, width:]
        sampler.record(new[:, -1])
        logps = torch.stack(sampler.chosen_logp, dim=1).float().cpu() if sampler.chosen_logp else None
        new = new.cpu()
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            end = toks.index(eos) + 1 if eos in toks else len(toks)
            out.prompt_index.append(i)
            out.prompt_ids.append(encoded[i])
            out.completion_ids.append(toks[:end])
            out.logprobs.append(logps[r, :end].clone())
            out.finished.append(eos in toks)
    out.texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    model.train(was_training)
    return out
