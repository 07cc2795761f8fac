"""The `loading` part of a stage's config, light: a spec check builds it without importing torch (the loading
itself is components.models', imported when a model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.config import require

ATTENTION_KERNELS = ("auto", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager")


@dataclass(kw_only=True)
class ModelLoading:
    """How a stage loads models: the `loading` part of the config of every stage that loads one."""

    trust_remote_code: bool = False
    """Allow model code from the model directory (only for models you trust)."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (flash_attention_2 on a GPU with flash-attn installed, else sdpa), sdpa,
    flash_attention_2, flash_attention_3, flex_attention or eager."""

    def __post_init__(self):
        # no Hub kernels: nothing is fetched at run time
        require(self.attn_implementation in ATTENTION_KERNELS, "attn_implementation", self.attn_implementation,
                f"one of {', '.join(ATTENTION_KERNELS)}")

    def load_model(self, path: str | Path, **kw):
        from components.models import load_model

        return load_model(path, trust_remote_code=self.trust_remote_code,
                          attn_implementation=self.attn_implementation, **kw)

    def load_scalar_model(self, path: str | Path, pad_token_id: int):
        """A one-label sequence-classification model (components.models.load_scalar_model)."""
        from components.models import load_scalar_model

        return load_scalar_model(path, pad_token_id, trust_remote_code=self.trust_remote_code,
                                 attn_implementation=self.attn_implementation)

    def load_tokenizer(self, path: str | Path):
        from components.models import load_tokenizer

        return load_tokenizer(path, self.trust_remote_code)
