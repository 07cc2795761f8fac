"""`reward_model`: a sequence-classification model (num_labels=1) scores each prompt + completion.

The directory is a Hugging Face one (local or s3://) with safetensors weights; a directory with only pickle
weights (pytorch_model.bin) is refused, never loaded. Prompt and completion are rendered as a user turn and
an assistant turn with the tokenizer's chat template when it has one (else concatenated), truncated from
the left so that the end of the completion is always scored, padded on the right; the score is the logit
of the last real token, as the model was trained to give it.
"""

from __future__ import annotations

from pathlib import Path


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


class RewardModel:
    """Batch scorer: `RewardModel(uri)(prompts, completions, answers, tasks) -> list[float]`."""

    def __init__(self, uri: str, *, batch_size: int, max_length: int):
        import torch
        from transformers import AutoModelForSequenceClassification

        from components.models import load_tokenizer

        path = check_weights(local_dir(uri))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
        if info["missing_keys"]:  # e.g. a causal LM: transformers would score with a random new head
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{path}: not a reward model: its weights have no scalar head ({', '.join(missing[:3])} "
                             "missing); train one with the reward_model stage")
        self.model = self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels=1, this one has {self.model.config.num_labels}")
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        if self.model.config.pad_token_id is None:  # the model finds each row's last real token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def render(self, prompt: str | list[dict], completion: str) -> str:
        """The text the model reads: a chat (user prompt, assistant completion) or prompt + completion."""
        return render(self.tokenizer, prompt, completion)

    def __call__(self, prompts, completions, answers=None, tasks=None) -> list[float]:
        import torch

        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt", return_token_type_ids=False,
                                       add_special_tokens=not self.tokenizer.chat_template).to(self.device)
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores
