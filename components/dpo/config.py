"""The dpo stage's config, light: `python -m pipelines.spec check` builds it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import require
from components.evaluation.suites import TrainingEval
from components.models.config import ModelLoading
from components.training.config import DPO_LOSSES, Adapter, TrainConfig, check_ranking


@dataclass(kw_only=True)
class DPOConfig:
    """A DPO stage: the pairs, the reference and the loss, and the parts `train` and `loading`."""

    model: str
    """Policy to start from: a Hugging Face directory with safetensors weights."""
    train_data: str
    """Preference JSONL: {"prompt", "chosen", "rejected"} rows (reward_scoring's pairs.jsonl)."""
    output_dir: str
    """Where model/, metrics.jsonl, summary.json and checkpoints/ go."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch (pairs per optimizer step), learning rate, checkpoints, ... (components/README.md)."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the models are loaded (components/README.md)."""
    lora: Adapter = field(default_factory=Adapter)
    """LoRA/QLoRA adapters instead of full fine-tuning (off by default; components/README.md)."""
    eval: TrainingEval = field(default_factory=TrainingEval)
    """Evaluation by generation every `eval.every` optimizer steps: suites, sampling, pass@k (off by default;
    components/README.md)."""
    ref_model: str | None = None
    """Reference model (default: the starting policy; with LoRA, the base with the adapter disabled)."""
    beta: float = 0.1
    """β: strength of the implicit KL constraint to the reference."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo, hinge or robust."""
    label_smoothing: float = 0.0
    """ε: assumed share of flipped labels (sigmoid and robust losses)."""
    rpo_alpha: float = 0.0
    """α > 0 adds α × the chosen completion's per-token NLL to each pair's loss (RPO): DPO alone may push the
    chosen answer down along with the rejected one, moving probability to neither."""
    max_length: int = 1024
    """Longest sequence (prompt + completion) in tokens; a longer pair is dropped and counted."""
    max_bad_fraction: float = 0.0
    """Share of unusable rows tolerated (chosen == rejected, empty prompt, ...); each is reported by line."""

    def __post_init__(self):
        require(self.loss_type in DPO_LOSSES, "loss_type", self.loss_type, f"one of {', '.join(DPO_LOSSES)}")
        require(self.beta > 0, "beta", self.beta, "a positive number")
        require(self.rpo_alpha >= 0, "rpo_alpha", self.rpo_alpha, "a number ≥ 0")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        require(self.max_length >= 2, "max_length", self.max_length, "an integer ≥ 2")
        check_ranking(self.train, self.eval.every, self.eval.ranked_metrics())
