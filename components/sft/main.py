"""SFT stage: supervised fine-tuning with method sft, psft or sft_kl, on a JSONL dataset, by path.

Single device:   python -m components.sft --config sft.yaml      (or: posttrain stage sft --config sft.yaml)
N ranks:         torchrun --nproc-per-node N -m components.sft --config sft.yaml   (DeepSpeed ZeRO)

It differs from a plain fine-tuning script in three ways: only completion tokens are trained and they are
packed (no padding, no attention across sequences); PSFT trains against a π_old frozen for
`updates_per_batch` steps with a clipped ratio, which keeps entropy from collapsing; SFT-KL adds β·KL to
a reference model. Every row problem is reported by file and line before any training starts.

With `lora.enabled` only LoRA adapters on the frozen (QLoRA: quantized) base train (components/training/lora.py).

Outputs in `output_dir`: model/ (Hugging Face, safetensors; with LoRA the merged model or the adapter, by
`lora.output`), metrics.jsonl (one line per step), summary.json (data statistics, the final step's metrics, the
output kind and the trainable parameter count), checkpoints/ (resumable).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from components import tracking
from components.config import stage_main
from components.datasets import load_sft_examples
from components.evaluation.during_training import attach as attach_eval
from components.sft.config import SFTConfig
from components.sft.loop import train
from components.training import distributed
from components.training.lora import load_policy, save_policy

log = logging.getLogger("components.sft")


def run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    examples, stats = load_sft_examples(cfg.train_data, tokenizer, max_length=cfg.max_length,
                                        overlong=cfg.overlong, max_bad_fraction=cfg.max_bad_fraction)
    log.info("data %s: %s", cfg.train_data, stats.as_dict())

    model = load_policy(cfg.model, cfg.loading, cfg.lora, cfg.train.seed, cfg.train)
    ref_model = None
    if cfg.objective.method == "sft_kl" and cfg.lora.enabled and not cfg.ref_model:
        ref_model = model  # the policy's own base, the adapter disabled (components.training.lora.base_reference)
    elif cfg.objective.method == "sft_kl":
        ref_model = cfg.loading.load_model(cfg.ref_model or cfg.model)

    sessions = []

    def setup(session) -> None:
        sessions.append(session)  # what it exported (train.export) goes into summary.json
        attach_eval(session, cfg.eval, model, tokenizer, tracked=tracked)

    with tracking.stage_run("sft", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        history = train(cfg.train, model, examples, out, pad_id=tokenizer.pad_token_id, objective=cfg.objective,
                        ref_model=ref_model, on_metrics=tracked.log_metrics, run_config=asdict(cfg), setup=setup)

    dist = distributed.init()
    summary = {"method": cfg.objective.method, "data": stats.as_dict(), "steps": len(history),
               "final": history[-1] if history else None, **sessions[0].exported}
    summary.update(save_policy(model, tokenizer, out / "model", dist, cfg.lora, cfg.model, cfg.loading))
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s", out / "model")
    return summary


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, SFTConfig, run, argv)


if __name__ == "__main__":
    main()
