"""`reward_model`: a reward model trained by the reward_model stage scores each prompt + completion.

The directory is a Hugging Face one (local or s3://) with safetensors weights; a directory with only pickle
weights (pytorch_model.bin) is refused, never loaded. Prompt and completion are rendered as a user turn and
an assistant turn with the tokenizer's chat template when it has one (else concatenated), truncated from
the left so that the end of the completion is always scored, padded on the right. The score is what the
model was trained to give, by its head (`reward_head` in its config.json, written by the stage):

- scalar (no `reward_head`): a sequence-classification model (num_labels=1); the logit of the last real token;
- logprob: a causal LM; β (`reward_beta`, default 1) times the sum of the log-probabilities of the completion's
  tokens (its closing EOS included) given the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

HEADS = ("scalar", "logprob")


def local_dir(uri: str) -> Path:
    """A local directory for `uri`; s3:// is downloaded (components.storage is imported only then). A local
    path must exist: transformers would take a missing one for a hub name, and nothing loads from a hub."""
    if uri.startswith("s3://"):
        from components.storage import localize

        return localize(uri)
    if not Path(uri).is_dir():
        raise ValueError(f"{uri}: no such directory")
    return Path(uri)


def check_weights(path: Path) -> Path:
    """`path` must hold config.json and *.safetensors weights; the message lists what it holds instead."""
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        files = ", ".join(sorted(f.name for f in path.iterdir())) or "none"
        raise ValueError(f"{path}: a reward model needs config.json and *.safetensors weights (pickle weights "
                         f"such as pytorch_model.bin are never loaded); files there: {files}")
    return path


def reward_head(path: Path) -> str:
    """How the reward model in `path` scores: its config's `reward_head` (the reward_model stage writes it for
    head logprob), scalar when absent."""
    head = json.loads((Path(path) / "config.json").read_text()).get("reward_head") or "scalar"
    if head not in HEADS:
        raise ValueError(f"{path}: config.json has reward_head={head!r}, not one of {', '.join(HEADS)}")
    return head


def _valid_text(text: str) -> str:
    """Lone surrogates (possible in JSON-decoded text) would break the tokenizer: replace them."""
    return text.encode("utf-8", "replace").decode("utf-8")


def render(tokenizer, prompt: str | list[dict], completion: str) -> str:
    """The text a reward model reads: a chat (user prompt, assistant completion) or prompt + completion (the
    reward_model stage trains on exactly this)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = [{**m, "content": _valid_text(m["content"])} for m in messages]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _valid_text(completion)}],
                                             tokenize=False)
    return "\n".join(m["content"] for m in messages) + _valid_text(completion)


def encode(tokenizer, prompt: str | list[dict], completion: str, max_length: int) -> tuple[list[int], int]:
    """The tokens a reward model reads for (prompt, completion) (`render`, cut from the left to `max_length`; the
    tokenizer's truncation_side must be "left") and the index of the completion's first token among them (0 when
    the cut reaches into the completion)."""
    special = not tokenizer.chat_template
    text = render(tokenizer, prompt, completion)
    ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=special)["input_ids"]
    full = tokenizer(text, add_special_tokens=special)["input_ids"]
    prefix = tokenizer(render(tokenizer, prompt, "") if not tokenizer.chat_template else
                       _generation_prompt(tokenizer, prompt), add_special_tokens=special)["input_ids"]
    shared = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(full), len(prefix)))
    return ids, max(len(ids) - (len(full) - shared), 0)


def _generation_prompt(tokenizer, prompt: str | list[dict]) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = [{**m, "content": _valid_text(m["content"])} for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def completion_logprob_sums(model, batch: list[tuple[list[int], int]], pad_id: int, device) -> list[float]:
    """Σ log π(token | everything before it) over each sequence's tokens from its completion start (the
    reward_model stage's head logprob): a padded batch, attention masked, one forward."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
    for row, (ids, start) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        scored[row, max(start - 1, 0):len(ids) - 1] = True  # position t predicts token t+1
    input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    logprobs = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logprobs * scored).sum(-1).tolist()


class RewardModel:
    """Batch scorer: `RewardModel(uri)(prompts, completions, answers, tasks) -> list[float]`."""

    def __init__(self, uri: str, *, batch_size: int, max_length: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from components.models import load_tokenizer

        path = check_weights(local_dir(uri))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.head = reward_head(path)
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        self.batch_size, self.max_length = batch_size, max_length
        if self.head == "logprob":
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                              trust_remote_code=False).to(self.device).eval()
            self.beta = float(getattr(self.model.config, "reward_beta", 1.0))
            return
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
        if info["missing_keys"]:  # e.g. a causal LM: transformers would score with a random new head
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{path}: not a reward model: its weights have no scalar head ({', '.join(missing[:3])} "
                             "missing); train one with the reward_model stage")
        self.model = self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels=1, this one has {self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:  # the model finds each row's last real token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def render(self, prompt: str | list[dict], completion: str) -> str:
        """The text the model reads: a chat (user prompt, assistant completion) or prompt + completion."""
        return render(self.tokenizer, prompt, completion)

    def __call__(self, prompts, completions, answers=None, tasks=None) -> list[float]:
        import torch

        if self.head == "logprob":
            encoded = [encode(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
            with torch.inference_mode():
                return [self.beta * score for i in range(0, len(encoded), self.batch_size)
                        for score in completion_logprob_sums(self.model, encoded[i:i + self.batch_size],
                                                             self.tokenizer.pad_token_id, self.device)]
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt", return_token_type_ids=False,
                                       add_special_tokens=not self.tokenizer.chat_template).to(self.device)
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores
