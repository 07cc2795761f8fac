"""Rollout: sample n completions per prompt in large batches, with the sampling policy's per-token log-probs.

Generation is a prefill, then a KV-cached decode loop over the Hugging Face model's forward (a dynamic cache;
on a GPU, Hugging Face `generate` with a static cache, which it compiles). Sampling is done here, with its own
seeded `torch.Generator`: temperature, top-p, and the log-probability of every chosen token under
softmax(logits / temperature). So

- the same seed gives the same samples whatever else used the global RNG, on either path;
- log-probs are computed once, while sampling, and equal a teacher-forced forward of the same tokens
  (tested to 1e-4 in fp32): GRPO uses them as log π_old without another pass;
- only one [batch, vocab] row of log-probs exists at a time, never logits for the whole completion;
- a token is drawn by inverting the CDF with one uniform number (torch.multinomial draws one per vocabulary
  entry, which on a CPU costs more than the tiny model's forward);
- every sequence draws its uniform numbers from a generator of its own, seeded from (seed, its prompt's index,
  its sample number) (`sample_seed`): a sample does not depend on which other prompts share its batch, its call
  or its process, so evaluate and reward_scoring can split their prompts over processes and get what one
  process gets.

temperature 0 is greedy decoding (log-probs then under temperature 1).

Under ZeRO-3 on several ranks (weights partitioned: every forward all-gathers them, a collective), the ranks
decode in lockstep: each runs as many batches as the rank with the most, and every decode step ends with an
all-reduce of "still decoding" so that a rank whose rows are done keeps running forwards until every rank's are
(as transformers' `synced_gpus`). Otherwise a rank that stops early leaves the others in an all-gather it never
joins: gloo aborts with a collective mismatch, NCCL hangs until its timeout. This path always uses the decode
loop here (no static cache, which Hugging Face compiles), and its samples are the same as one process's.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList

from components.templates import render_prompt
from components.training.distributed import is_partitioned
from components.training.lora import is_lora


def sample_seed(seed: int, index: int, sample: int) -> int:
    """The seed of sample `sample` of the prompt at `index` (of the whole prompt set) for the call's `seed`: a
    63-bit hash, so neighbouring prompts and samples get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{index}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


def _choose(scores: Tensor, temperature: float, top_p: float, uniform: Tensor) -> tuple[Tensor, Tensor]:
    """The next token of each row of `scores` [B, V], drawn with `uniform` [B] (numbers in [0, 1)), and the
    log-probs [B, V] it was drawn from (under softmax(scores / temperature); temperature 0: greedy, log-probs under
    temperature 1)."""
    logits = scores.float()
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        return logp.argmax(-1), logp
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # inverse CDF: the first token whose cumulative mass exceeds u·total (a zero-mass token never does)
    cdf = probs.double().cumsum(-1)
    target = uniform.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return choice.squeeze(-1), logp


def _uniforms(seeds: list[int], steps: int, device) -> Tensor:
    """[len(seeds), steps] numbers in [0, 1): row r is the stream of a generator seeded with seeds[r]."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device)


class _Sampler(LogitsProcessor):
    """`_choose` inside Hugging Face `generate`, step t with uniforms[:, t]; records the log-prob of the previous
    choice."""

    def __init__(self, temperature: float, top_p: float, uniforms: Tensor):
        self.temperature, self.top_p, self.uniforms = temperature, top_p, uniforms
        self.prev: Tensor | None = None  # log-probs [B, V] of the last step
        self.chosen_logp: list[Tensor] = []

    def record(self, tokens: Tensor) -> None:
        if self.prev is not None:
            self.chosen_logp.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.record(input_ids[:, -1])
        choice, self.prev = _choose(scores, self.temperature, self.top_p, self.uniforms[:, len(self.chosen_logp)])
        # hand `generate` (greedy) a distribution that can only pick the chosen token
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, choice[:, None], 0.0)


def _lockstep(model) -> bool:
    """Whether this process's forwards of `model` are collectives of several ranks (ZeRO-3 partitioned weights)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1 and is_partitioned(model))


def _all_done(done: bool, device) -> bool:
    """Whether every rank is done decoding (each rank calls it once per decode step: an all-reduce)."""
    decoding = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(decoding)
    return float(decoding) == 0.0


def _decode(model, ids: Tensor, attn: Tensor, *, max_new_tokens: int, temperature: float, top_p: float,
            uniforms: Tensor, eos: int, pad: int, lockstep: bool = False, idle: bool = False,
            ) -> tuple[Tensor, Tensor]:
    """Prefill the left-padded prompts `ids`, then decode one token per step with a dynamic KV cache until every
    row has its EOS or max_new_tokens: the new tokens [B, T] (pad after a row's EOS) and their log-probs [B, T].

    lockstep: every rank decodes until every rank's rows are done (`_all_done` after each step); idle: the rows
    are a stand-in (a rank with fewer batches than another), done from the start, there only to join the
    forwards."""
    cache = DynamicCache(config=model.config)
    padded = not bool(attn.all())  # without left padding, no mask at all: plain causal attention
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn if padded else None, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    done = torch.full((ids.shape[0],), idle, dtype=torch.bool, device=ids.device)
    position = positions[:, -1:]
    tokens, logps = [], []
    for step in range(max_new_tokens):
        choice, logp = _choose(logits, temperature, top_p, uniforms[:, step])
        choice = choice.masked_fill(done, pad)
        tokens.append(choice)
        logps.append(logp.gather(-1, choice[:, None]).squeeze(-1))
        done |= choice == eos
        finished = bool(done.all())
        if lockstep:
            finished = _all_done(finished, ids.device)
        if len(tokens) == max_new_tokens or finished:
            break
        position = position + 1
        if padded:
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        logits = model(input_ids=choice[:, None], attention_mask=attn if padded else None, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


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
             max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, cache: str = "auto",
             indices: list[int] | None = None) -> Rollout:
    """Sample `n` completions for each prompt (a string or chat messages, rendered by the chat template).

    batch_size: sequences decoded together (prompts × n are split into batches of this size).
    cache: "static" (Hugging Face `generate` with a fixed-size KV cache, which it compiles), "dynamic" (the decode
    loop here), or "auto" (static on a GPU). ZeRO-3 partitioned weights on several ranks always take the decode
    loop here, in lockstep with the other ranks (module docstring).
    indices: each prompt's index in the whole prompt set (default: its place in `prompts`); sample j of prompt i
    draws from a generator seeded with sample_seed(seed, indices[i], j).
    """
    if temperature < 0 or not 0 < top_p <= 1 or n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"invalid sampling settings: temperature={temperature} (≥ 0), top_p={top_p} (in (0, 1]), "
                         f"n={n}, max_new_tokens={max_new_tokens}, batch_size={batch_size} (≥ 1)")
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"indices: {len(indices)} given for {len(prompts)} prompts (one per prompt)")
    if is_lora(model):  # generate with the Hugging Face model inside, whose layers hold the adapters
        model = model.get_base_model()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = [i for i in range(len(prompts)) for _ in range(n)]
    lockstep = _lockstep(model)
    use_static = not lockstep and (cache == "static" or (cache == "auto" and device.type == "cuda"))
    starts = list(range(0, len(order), batch_size))
    if lockstep:  # as many batches as the rank with the most: the others decode a stand-in row
        batches = torch.tensor([float(len(starts))], device=device)
        torch.distributed.all_reduce(batches, op=torch.distributed.ReduceOp.MAX)
        for _ in range(int(batches) - len(starts)):
            stand_in = torch.full((1, 1), pad, dtype=torch.long, device=device)
            _decode(model, stand_in, torch.ones_like(stand_in), max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, uniforms=torch.zeros(1, max_new_tokens, device=device),
                    eos=eos, pad=pad, lockstep=True, idle=True)
    out = Rollout()
    for s in starts:
        idx = order[s:s + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row's last prompt token is at the same column
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[r, width - len(encoded[i]):] = 1
        uniforms = _uniforms([sample_seed(seed, indices[i], (s + r) % n) for r, i in enumerate(idx)],
                             max_new_tokens, device)
        if use_static:
            sampler = _Sampler(temperature, top_p, uniforms)
            with _blank_generation_config(model):
                seq = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([sampler]),
                                     pad_token_id=pad, eos_token_id=eos, cache_implementation="static")
            new = seq[:, width:]
            sampler.record(new[:, -1])
            logps = torch.stack(sampler.chosen_logp, dim=1).float().cpu()
        else:
            new, logps = _decode(model, ids.to(device), attn.to(device), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, uniforms=uniforms, eos=eos, pad=pad,
                                 lockstep=lockstep)
            logps = logps.float().cpu()
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
