"""The sft stage's config (sft, psft and sft_kl), light: `python -m pipelines.spec check` builds it without
importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.config import positive_ints, require
from components.datasets import check_max_bad_fraction
from components.evaluation.suites import TrainingEval
from components.models.config import ModelLoading
from components.training.config import Adapter, TrainConfig, check_clip_range, check_ranking

METHODS = ("sft", "psft", "sft_kl")


@dataclass(kw_only=True)
class SFTObjective:
    """What `train` optimizes on dataset tokens: the `objective` part of the sft stage's config."""

    method: str = "sft"
    """sft (negative log-likelihood), psft (clipped ratio against a frozen π_old), sft_kl (SFT + β·KL)."""
    updates_per_batch: int = 1
    """PSFT: optimizer steps per π_old snapshot (reference setting: batch 64, minibatch 8 → 8)."""
    epsilon_low: float = 0.2
    """PSFT: lower clip range ε_low."""
    epsilon_high: float = 0.28
    """PSFT: upper clip range ε_high."""
    sft_warmup_steps: int = 0
    """PSFT: plain SFT for this many steps before the clipped objective starts."""
    beta: float = 0.1
    """SFT-KL: weight of the KL penalty to the reference model."""

    def __post_init__(self):
        require(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        positive_ints(self, "updates_per_batch")
        require(isinstance(self.sft_warmup_steps, int) and self.sft_warmup_steps >= 0, "sft_warmup_steps",
                self.sft_warmup_steps, "an integer ≥ 0")
        check_clip_range(self.epsilon_low, self.epsilon_high)
        require(math.isfinite(self.beta) and self.beta >= 0, "beta", self.beta, "a number ≥ 0")


@dataclass(kw_only=True)
class SFTConfig:
    """An SFT stage: where the model and data are, the objective, and its parts `train` and `loading`."""

    model: str
    """Base model: a Hugging Face directory with safetensors weights."""
    train_data: str
    """SFT JSONL: {"prompt", "completion"} or {"messages"} rows."""
    output_dir: str
    """Where model/, metrics.jsonl, summary.json and checkpoints/ go."""
    objective: SFTObjective = field(default_factory=SFTObjective)
    """The method (sft, psft, sft_kl) and its settings (components/README.md)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch, learning rate, checkpoints, precision, ZeRO (components/README.md)."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the model is loaded (components/README.md)."""
    lora: Adapter = field(default_factory=Adapter)
    """LoRA/QLoRA adapters instead of full fine-tuning (off by default; components/README.md)."""
    eval: TrainingEval = field(default_factory=TrainingEval)
    """Evaluation by generation every `eval.every` optimizer steps: suites, sampling, pass@k (off by default;
    components/README.md)."""
    ref_model: str | None = None
    """SFT-KL: the reference model (default: the base model; with LoRA, the base with the adapter disabled)."""
    max_length: int = 1024
    """Longest sequence in tokens (prompt + completion)."""
    overlong: str = "drop"
    """What to do with a longer row: drop or truncate (both counted)."""
    max_bad_fraction: float = 0.0
    """Share of unusable rows (bad JSON, missing fields, empty completions) tolerated; each is logged and counted."""

    def __post_init__(self):
        require(self.max_length >= 2, "max_length", self.max_length, "an integer ≥ 2")
        require(self.overlong in ("drop", "truncate"), "overlong", self.overlong, "drop or truncate")
        require(self.ref_model is None or self.objective.method == "sft_kl", "ref_model", self.ref_model,
                f"unset with method {self.objective.method}: only sft_kl reads it")
        check_max_bad_fraction(self.max_bad_fraction)
        check_ranking(self.train, self.eval.every, self.eval.ranked_metrics())
