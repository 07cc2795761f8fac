"""The benchmark's workloads: the random-init model shapes, the SFT rows, DPO pairs and GRPO prompts drawn for
them, how each side (our stages, the TRL peer) is given them, and the reward both score GRPO with.

How they are drawn, and why each side is given them the way it is: docs/bench.md.
"""

from __future__ import annotations

import random

import torch
import yaml

from components.models import TINY_CONFIG

# The reference workload's model shapes, random-init Qwen2 (the Qwen2/Qwen2.5 0.5B and 1.5B shapes, and a tiny one),
# and "small": 24.4M parameters over the tiny vocabulary, where a CPU's rollout cost is no longer per-step overhead.
_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512),
    # the demo's model: components/models/tiny.yaml over the character tokenizer's 103 tokens (qwen2_config builds
    # it with tiny_config); its SFT rows are the demo's arithmetic problems (demo_examples), the other objectives'
    # the random words below
    "demo": {**{k: v for k, v in yaml.safe_load(TINY_CONFIG.read_text()).items() if k in _SHAPE}, "vocab_size": 103},
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}
UNK_ID, PAD_ID, EOS_ID = 0, 1, 2  # "t0", "t1", "t2": the reference workload's unk / pad / eos

# A reward with variance inside groups, the same function for us and TRL: 1 when the completion's first word
# ends in 0-4, else 0 (the reference GRPO workload's len(c) % 7 plays that role; what the reward is does not
# change the cost).
BENCH_REWARDS = [{"name": "format", "pattern": r"\s*t\d*[0-4]\b.*"}]


def qwen2_config(size: str):
    """The size's model config; the demo's is the demo model's (components.models.tiny_config), the same in every
    field."""
    from transformers import Qwen2Config

    if size == "demo":
        from components.models import tiny_config

        return tiny_config(SIZES["demo"]["vocab_size"])
    return Qwen2Config(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6,
                       attn_implementation="sdpa", use_cache=True)


def build_model(size: str, dtype: torch.dtype = torch.float32):
    """The reference workload's random-init model (seed 0), on the CPU; the trainers move it."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(qwen2_config(size)).to(dtype=dtype)


def size_params(size: str) -> int:
    """The size's parameter count, from a model built on the meta device (no memory, no initialization)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen2_config(size))
    return sum(p.numel() for p in model.parameters())


def text(n: int, vocab: int, rng: random.Random) -> str:
    """The reference workload's text: n words "t<id>", id uniform in [3, vocab)."""
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


def workload_rows(vocab: int, num_rows: int, min_len: int, max_len: int) -> list[dict]:
    """The reference SFT rows: random.Random(0), per row n ~ uniform[min_len, max_len], then n // 4 prompt words,
    then the other n - n // 4 completion words, drawn in that order (prefix-stable in num_rows)."""
    rng = random.Random(0)
    rows = []
    for _ in range(num_rows):
        n = rng.randint(min_len, max_len)
        p = n // 4
        rows.append({"prompt": text(p, vocab, rng), "completion": text(n - p, vocab, rng)})
    return rows


DEMO_FLAGS = {"--batch-size": "128", "--token-budget": "512", "--updates-per-batch": "4"}
"""`--size demo`'s defaults: the demo's PSFT step (pipelines/specs/demo.yaml), 128 arithmetic problems (≈1.5k tokens)
in micro-batches of 512 tokens, π_old refreshed every 4 steps."""


def demo_examples(num_rows: int):
    """The demo's SFT rows: arithmetic problems (seed 0, as data_prep draws them), through the character tokenizer."""
    from components.models import build_char_tokenizer
    from components.tasks import get_task
    from components.training.batching import encode_example

    tokenizer = build_char_tokenizer()
    return [encode_example(tokenizer, r["prompt"], r["completion"]) for r in get_task("arithmetic").generate(
        num_rows, seed=0)]


def row_example(row: dict):
    """A row as our Example: prompt ids, completion ids, EOS; the loss covers completion and EOS."""
    from components.training.batching import Example

    prompt = [int(w[1:]) for w in row["prompt"].split()]
    completion = [int(w[1:]) for w in row["completion"].split()]
    return Example(input_ids=prompt + completion + [EOS_ID], completion_start=len(prompt))


def peer_row(row: dict) -> dict:
    """The row as TRL gets it: separated so that no words merge, EOS given (TRL then appends none)."""
    return {"prompt": row["prompt"], "completion": " " + row["completion"] + " t2"}


def dpo_rows(vocab: int, num_rows: int, max_len: int) -> list[dict]:
    """The reference DPO rows: random.Random(0), prompt, chosen and rejected of max_len // 4 words each."""
    rng = random.Random(0)
    n = max_len // 4
    return [{"prompt": text(n, vocab, rng), "chosen": text(n, vocab, rng), "rejected": text(n, vocab, rng)}
            for _ in range(num_rows)]


def grpo_prompts(vocab: int, num_rows: int, prompt_len: int) -> list[dict]:
    """The reference GRPO prompts: random.Random(0), prompt_len words each."""
    rng = random.Random(0)
    return [{"prompt": text(prompt_len, vocab, rng)} for _ in range(num_rows)]


def pair_ids(row: dict) -> tuple[list[int], list[int], list[int]]:
    """A DPO row as token ids: prompt, chosen + EOS, rejected + EOS."""
    ids = lambda s: [int(w[1:]) for w in s.split()]  # noqa: E731
    return ids(row["prompt"]), ids(row["chosen"]) + [EOS_ID], ids(row["rejected"]) + [EOS_ID]


def stage_pair_row(row: dict) -> dict:
    """The row as our DPO stage reads it: it appends the EOS text to each completion, so a space first."""
    return {"prompt": row["prompt"], "chosen": row["chosen"] + " ", "rejected": row["rejected"] + " "}


def peer_pair_row(row: dict) -> dict:
    """The row as TRL's DPOTrainer gets it: it tokenizes prompt + completion as one string and appends EOS
    only when the completion does not end with it, so both are separated and end with " t2"."""
    return {"prompt": row["prompt"], "chosen": " " + row["chosen"] + " t2", "rejected": " " + row["rejected"] + " t2"}


def rm_pair_row(row: dict) -> dict:
    """The row as our reward_model stage and TRL's RewardTrainer read it: both score prompt + completion as one
    string (no chat template) and neither appends EOS to a completion that ends with it, so each completion is
    separated from the prompt and ends with " t2": prompt ids + completion ids + EOS, scored at the EOS."""
    return peer_pair_row(row)


def save_model(size: str, path: str) -> str:
    """The random-init model and the peer tokenizer as a Hugging Face directory (what stages load)."""
    model = build_model(size)
    model.save_pretrained(path, safe_serialization=True)
    peer_tokenizer(SIZES[size]["vocab_size"]).save_pretrained(path)
    del model
    return path


def peer_tokenizer(vocab: int):
    """The reference workload's WordLevel tokenizer, with t0/t1/t2 as single-word special tokens (why:
    docs/bench.md, "The TRL peer's tokens")."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = lambda s: AddedToken(s, single_word=True, special=True)  # noqa: E731
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=special("t0"), pad_token=special("t1"),
                                   eos_token=special("t2"))
