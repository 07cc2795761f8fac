"""reward_scoring stage: sample k completions per prompt from a model, score them, and write preference pairs.

    python -m components.reward_scoring --config scoring.yaml    (or: posttrain stage reward_scoring --config ...)

For each prompt, `num_samples` completions are sampled (the rollout engine, seeded) and scored by the reward
functions (components/rewards). The best and the worst completion of a prompt make a preference pair for DPO;
a prompt whose best and worst score the same (a tie) gives no pair, nor does one whose best or worst
completion is empty or whose two completions are the same text; each is counted. Fewer than `min_pairs`
pairs fail the stage (after its outputs are written, for a look at them).

Outputs in `output_dir`: scored.jsonl (every sample: prompt, completion, answer, reward and per-function
rewards), pairs.jsonl ({"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}), stats.json.

On several processes (torchrun, one per accelerator; components/training/parallel.py) each data-parallel group
samples and scores a contiguous shard of the prompts, and rank 0 gathers them in prompt order and writes the
same outputs as one process (only the timings differ): each prompt's samples are seeded by (seed, prompt index,
sample number), whichever process draws them. With `rollout.engine: vllm` the engine loads the model directory
itself, split over `rollout.tensor_parallel_size` accelerators, and no Hugging Face copy is loaded.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from components import threads, tracking
from components.config import stage_main
from components.datasets import DataError, write_jsonl
from components.models import check_model_dir
from components.reward_scoring.config import RewardScoringConfig
from components.rewards import build_rewards
from components.training.parallel import SamplingWorld, init_sampling

log = logging.getLogger("components.reward_scoring")


def make_pairs(rows: list[dict], texts: list[str], totals: list[float], k: int) -> tuple[list[dict], Counter]:
    """Best vs worst completion of each prompt's k samples (samples of a prompt are contiguous)."""
    pairs, skipped = [], Counter()
    for p, row in enumerate(rows):
        group = list(range(p * k, (p + 1) * k))
        best = max(group, key=lambda i: (totals[i], -i))
        worst = min(group, key=lambda i: (totals[i], i))
        if totals[best] == totals[worst]:
            skipped["tie"] += 1
        elif not texts[best].strip() or not texts[worst].strip():
            skipped["empty completion"] += 1
        elif texts[best].strip() == texts[worst].strip():
            skipped["same text"] += 1
        else:
            pairs.append({"prompt": row["prompt"], "chosen": texts[best], "rejected": texts[worst],
                          "chosen_reward": totals[best], "rejected_reward": totals[worst]})
    return pairs, skipped


def score_shard(cfg: RewardScoringConfig, engine, rows: list[dict], rewards, shard: range) -> dict | None:
    """Sample the prompts of `shard` (each seeded by its index in `rows`) and score them: what a rank sends to
    rank 0 (None for an empty shard)."""
    if not shard:
        return None
    ro = cfg.sampling.sample(engine, [rows[i]["prompt"] for i in shard], n=cfg.num_samples, seed=cfg.seed,
                             indices=list(shard))
    srows = [rows[shard[i]] for i in ro.prompt_index]
    totals, per_fn = rewards.score([r["prompt"] for r in srows], ro.texts, [r.get("answer") for r in srows],
                                   [r.get("task") for r in srows])
    return {"texts": ro.texts, "lengths": ro.lengths, "totals": list(totals),
            "per_fn": {fn: list(v) for fn, v in per_fn.items()}}


def merge_shards(parts: list[dict | None]) -> dict:
    """score_shard's results of every shard, in shard order, as one (samples in prompt order)."""
    parts = [p for p in parts if p is not None]
    return {"texts": [t for p in parts for t in p["texts"]], "lengths": [n for p in parts for n in p["lengths"]],
            "totals": [t for p in parts for t in p["totals"]],
            "per_fn": {fn: [v for p in parts for v in p["per_fn"][fn]] for fn in parts[0]["per_fn"]}}


def run(cfg: RewardScoringConfig) -> dict:
    with init_sampling(cfg.rollout.tensor_parallel_size) as world:
        return _run(cfg, world)


def _run(cfg: RewardScoringConfig, world: SamplingWorld) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rewards = build_rewards(cfg.rewards, where="rewards")
    rows = cfg.prompts.load_prompts(cfg.seed)
    cfg.prompts.check_rows(rows, rewards)
    tokenizer = cfg.loading.load_tokenizer(cfg.model)
    batch = cfg.sampling.generation_batch_size
    if cfg.rollout.engine == "vllm":  # the engine loads the model itself (its share, with tensor parallelism)
        engine = cfg.rollout.build_from(check_model_dir(cfg.model), tokenizer, seed=cfg.seed, max_num_seqs=batch,
                                        world_size=world.world)
    else:
        model = cfg.loading.load_model(cfg.model)
        if torch.cuda.is_available():
            model.cuda()
        threads.for_sampling(model, "cuda" if torch.cuda.is_available() else "cpu")
        engine = cfg.rollout.build(model, tokenizer, seed=cfg.seed, max_num_seqs=batch)
    try:
        t0 = time.perf_counter()
        shard = world.shard(len(rows))
        log.info("sampling %d of %d prompts × %d", len(shard), len(rows), cfg.num_samples)
        parts = world.gather(score_shard(cfg, engine, rows, rewards, shard))
        gen_s = time.perf_counter() - t0  # on rank 0: until every shard is in
    finally:
        engine.close()  # after the gather: vLLM's shutdown ends the process group it shares (external launcher)
    if parts is None:
        return {}
    merged = merge_shards(parts)
    texts, lengths, totals, per_fn = merged["texts"], merged["lengths"], merged["totals"], merged["per_fn"]
    srows = [row for row in rows for _ in range(cfg.num_samples)]  # sample i answers prompt i // num_samples
    write_jsonl(out / "scored.jsonl", ({"prompt": r["prompt"], "completion": t, "answer": r.get("answer"),
                                        "reward": tot, "rewards": {fn: v[i] for fn, v in per_fn.items()}}
                                       for i, (r, t, tot) in enumerate(zip(srows, texts, totals))))
    pairs, skipped = make_pairs(rows, texts, totals, cfg.num_samples)
    write_jsonl(out / "pairs.jsonl", pairs)
    t = torch.tensor(totals, dtype=torch.float64)
    stats = {"prompts": len(rows), "samples": len(texts), "pairs": len(pairs), "skipped": dict(skipped),
             "reward_mean": float(t.mean()), "reward_std": float(t.std()) if len(t) > 1 else 0.0,
             **{f"rewards/{fn}/mean": float(torch.tensor(v, dtype=torch.float64).mean()) for fn, v in per_fn.items()},
             "completions/mean_length": sum(lengths) / len(texts), "tokens_per_s": sum(lengths) / gen_s,
             "rollout_s": gen_s}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    with tracking.stage_run("reward_scoring", cfg) as tracked:  # a no-op without MLFLOW_TRACKING_URI
        tracked.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))}, step=0)
    log.info("%d prompts × %d samples: reward %.3f ± %.3f, %d pairs (skipped %s), %.0f tok/s on %d process(es)",
             len(rows), cfg.num_samples, stats["reward_mean"], stats["reward_std"], len(pairs), dict(skipped),
             stats["tokens_per_s"], world.world)
    if len(pairs) < cfg.min_pairs:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none skipped"
        raise DataError(f"reward_scoring made {len(pairs)} preference pairs from {len(rows)} prompts, fewer than "
                        f"min_pairs={cfg.min_pairs} (prompts without a pair: {why}); sample more or more varied "
                        f"completions (num_samples, temperature) or check the rewards; see {out / 'stats.json'}")
    return stats


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, RewardScoringConfig, run, argv)


if __name__ == "__main__":
    main()
