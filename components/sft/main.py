"""SFT stage: supervised fine-tuning with method sft, psft or sft_kl, on a JSONL dataset, by path.

Single device:   python -m components.sft --config sft.yaml      (or: posttrain stage sft --config sft.yaml)
N ranks:         torchrun --nproc-per-node N -m components.sft --config sft.yaml   (DeepSpeed ZeRO)

It differs from a plain fine-tuning script in three ways: only completion tokens are trained and they are
packed (no padding, no attention across sequences); PSFT trains against a π_old frozen for
`updates_per_batch` steps with a clipped ratio, which keeps entropy from collapsing; SFT-KL adds β·KL to
a reference model. Every row problem is reported by file and line before any training starts.

With `lora.enabled` only LoRA adapters on the frozen (QLoRA: quantized) base train (components/models/lora.py).

Outputs in `output_dir`: model/ (Hugging Face, safetensors; with LoRA the merged model or the adapter, by
`lora.output`), metrics.jsonl (one line per step), summary.json (data statistics, the final step's metrics, the
output kind and the trainable parameter count), checkpoints/ (resumable).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components import tracking
from components.config import require, stage_main
from components.datasets import check_max_bad_fraction, load_sft_examples
from components.models import ModelLoading
from components.models.lora import Adapter, load_policy, save_policy
from components.training import distributed
from components.training.loop import SFTObjective, TrainConfig, train

log = logging.getLogger("components.sft")


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



def run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    examples, stats = load_sft_examples(cfg.train_data, tokenizer, max_length=cfg.max_length,
                                        overlong=cfg.overlong, max_bad_fraction=cfg.max_bad_fraction)
    log.info("data %s: %s", cfg.train_data, stats.as_dict())

    model = load_policy(cfg.model, cfg.loading, cfg.lora, cfg.train.seed, cfg.train)
    ref_model = None
    if cfg.objective.method == "sft_kl" and cfg.lora.enabled and not cfg.ref_model:
        ref_model = model  # the policy's own base, the adapter disabled (components.training.loop.base_reference)
    elif cfg.objective.method == "sft_kl":
        ref_model = cfg.loading.load_model(cfg.ref_model or cfg.model)

    with tracking.stage_run("sft", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        history = train(cfg.train, model, examples, out, pad_id=tokenizer.pad_token_id, objective=cfg.objective,
                        ref_model=ref_model, on_metrics=tracked.log_metrics, run_config=asdict(cfg))

    dist = distributed.init()
    summary = {"method": cfg.objective.method, "data": stats.as_dict(), "steps": len(history),
               "final": history[-1] if history else None}
    summary.update(save_policy(model, tokenizer, out / "model", dist, cfg.lora, cfg.model, cfg.loading))
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, SFTConfig, run, argv)


if __name__ == "__main__":
    main()
