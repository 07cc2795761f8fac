"""SFT stage: supervised fine-tuning with method sft, psft or sft_kl, on a JSONL dataset, by path.

Single device:   python -m components.sft --config sft.yaml      (or: posttrain stage sft --config sft.yaml)
N ranks:         torchrun --nproc-per-node N -m components.sft --config sft.yaml   (DeepSpeed ZeRO)

It differs from a plain fine-tuning script in three ways: only completion tokens are trained and they are
packed (no padding, no attention across sequences); PSFT trains against a π_old frozen for
`updates_per_batch` steps with a clipped ratio, which keeps entropy from collapsing; SFT-KL adds β·KL to
a reference model. Every row problem is reported by file and line before any training starts.

Outputs in `output_dir`: model/ (Hugging Face, safetensors), metrics.jsonl (one line per step),
summary.json (data statistics and the final step's metrics), checkpoints/ (resumable).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from components import tracking
from components.config import stage_main
from components.datasets import check_max_bad_fraction, load_sft_examples
from components.models import ModelLoading
from components.training import distributed
from components.training.loop import TrainConfig, train

log = logging.getLogger("components.sft")


@dataclass(kw_only=True)
class SFTConfig(TrainConfig, ModelLoading):
    """An SFT stage: the training settings plus where the model and data are."""

    model: str
    """Base model: a Hugging Face directory with safetensors weights."""
    train_data: str
    """SFT JSONL: {"prompt", "completion"} or {"messages"} rows."""
    output_dir: str
    """Where model/, metrics.jsonl, summary.json and checkpoints/ go."""
    ref_model: str | None = None
    """SFT-KL: the reference model (default: the base model)."""
    max_length: int = 1024
    """Longest sequence in tokens (prompt + completion)."""
    overlong: str = "drop"
    """What to do with a longer row: drop or truncate (both counted)."""
    max_bad_fraction: float = 0.0
    """Share of unusable rows (bad JSON, missing fields, empty completions) tolerated; each is logged and counted."""

    def __post_init__(self):
        super().__post_init__()
        ModelLoading.__post_init__(self)
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} is invalid: an integer ≥ 2")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong={self.overlong!r} is invalid: drop or truncate")
        if self.ref_model is not None and self.method != "sft_kl":
            raise ValueError(f"ref_model={self.ref_model!r} is invalid with method {self.method}: only sft_kl reads it")
        check_max_bad_fraction(self.max_bad_fraction)


CONFIG = SFTConfig


def run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    tokenizer = cfg.load_tokenizer(cfg.model)
    examples, stats = load_sft_examples(cfg.train_data, tokenizer, max_length=cfg.max_length,
                                        overlong=cfg.overlong, max_bad_fraction=cfg.max_bad_fraction)
    log.info("data %s: %s", cfg.train_data, stats.as_dict())

    model = cfg.load_model(cfg.model)
    ref_model = cfg.load_model(cfg.ref_model or cfg.model) if cfg.method == "sft_kl" else None

    with tracking.stage_run("sft", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        history = train(cfg.training(), model, examples, out, pad_id=tokenizer.pad_token_id,
                        ref_model=ref_model, on_metrics=tracked.log_metrics)

    dist = distributed.init()
    summary = {"method": cfg.method, "data": stats.as_dict(), "steps": len(history),
               "final": history[-1] if history else None}
    save_model(model, tokenizer, out / "model", dist)
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


def save_model(model, tokenizer, path: Path, dist) -> None:
    """Save a Hugging Face directory (safetensors) from rank 0; ZeRO-3 shards are gathered first."""
    if dist.world > 1:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if dist.rank == 0:
                model.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True)
    if dist.rank == 0:
        tokenizer.save_pretrained(path)
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, SFTConfig, run, argv)


if __name__ == "__main__":
    main()
