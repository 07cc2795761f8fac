"""Our side of the benchmark: SFT and PSFT through the training loop, DPO and GRPO through their stages run as
a user runs them (a model directory and a JSONL in, metrics.jsonl out), each measured over the steps after
warm-up. How each number is counted: docs/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import torch

from pipelines.bench.measure import peaks, rates, reset_peaks
from pipelines.bench.workloads import BENCH_REWARDS, PAD_ID, SIZES, build_model, dpo_rows, grpo_prompts, stage_pair_row


def stage_config(a, objective: str, token_budget: int, model: str = "", data: str = "", out: str = ""):
    """The config our side runs `objective` with, from the bench arguments `a`, read as a user's YAML is: the
    one place that knows the stages' config format. sft/psft: the training loop's (TrainConfig, SFTObjective);
    dpo/grpo: the stage's config, reading the model directory `model` and the JSONL `data`, writing under
    `out`."""
    from components.config import from_mapping

    if objective in ("sft", "psft"):
        from components.sft.config import SFTObjective
        from components.training.config import TrainConfig

        total = a.warmup + a.steps
        train = from_mapping(TrainConfig, {"max_steps": total, "batch_size": a.batch_size, "token_budget": token_budget,
                                           "lr": 1e-5, "seed": 0, "log_every": total, "precision": "auto"})
        return train, SFTObjective(method=objective, updates_per_batch=a.updates_per_batch if objective == "psft"
                                   else 1)
    if objective == "dpo":
        from components.dpo.config import DPOConfig

        total = a.warmup + a.steps
        return from_mapping(DPOConfig, {
            "model": model, "output_dir": out, "train_data": data, "max_length": a.max_len + 1,
            "train": {"max_steps": total, "batch_size": a.batch_size, "token_budget": token_budget, "lr": 1e-6,
                      "seed": 0, "log_every": total}})
    if objective == "grpo":
        from components.grpo.config import GRPOConfig

        total = a.grpo_warmup + a.grpo_steps
        round_size = a.grpo_batch_size * a.steps_per_rollout
        return from_mapping(GRPOConfig, {
            "model": model, "output_dir": out, "prompts": {"path": data}, "rewards": BENCH_REWARDS,
            "num_generations": a.group, "prompts_per_round": round_size // a.group,
            "sampling": {"max_new_tokens": a.new_tokens, "generation_batch_size": round_size},
            "rollout": {"engine": a.rollout},
            **async_keys(a),
            "train": {"max_steps": total, "batch_size": a.grpo_batch_size, "token_budget": token_budget,
                      "lr": 1e-6, "seed": 0, "log_every": total}})
    raise ValueError(f"no stage for objective {objective!r}")


def async_keys(a) -> dict:
    """The rollout worker's keys of grpo's and ppo's configs under --async K (none without it): max_staleness K, the
    worker on a.worker_cpus, and with K > 0 the off-policy correction it needs."""
    if getattr(a, "asynchronous", None) is None:
        return {}
    return {"rollout_worker": True, "max_staleness": a.asynchronous, "rollout_worker_cpus": a.worker_cpus,
            **({"tis_cap": 2.0} if a.asynchronous else {})}


def run_ours(a, objective: str, examples: list, dev: torch.device, token_budget: int) -> dict:
    """SFT or PSFT: the training loop on our Examples of the rows."""
    from components.sft.loop import train

    cfg, method = stage_config(a, objective, token_budget)
    rss_reset = reset_peaks(dev)
    model = build_model(a.size, torch.float32)
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as out:
        hist = train(cfg, model, examples, out, pad_id=PAD_ID, objective=method)
    mem = peaks(dev, rss_reset)
    measured = hist[a.warmup:]
    sec = sum(r["step_time_s"] for r in measured)
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured)  # the loop counts the sequences each step trained
    res = {**rates(tokens, sec, flops, len(measured), dev), **mem, "tokens": tokens,
           "trained_tokens": int(sum(r["trained_tokens"] for r in measured)),
           "token_budget": token_budget, "weights": "fp32",
           "autocast": "bf16" if dev.type == "cuda" else None, "final_loss": hist[-1]["loss"]}
    if objective == "psft":
        res["updates_per_batch"] = a.updates_per_batch
    del model, hist
    return res


def _jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_ours_dpo(a, work: str, dev: torch.device, token_budget: int) -> dict:
    """The dpo stage on the reference pairs. Time per pair: the measured steps plus their share of the
    reference pass (which TRL does inside each step), so pairs_per_s is the cost of DPO, not of its steps only."""
    from components.dpo.main import run

    total = a.warmup + a.steps
    rows = dpo_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.max_len)
    out = os.path.join(work, "dpo")
    data = _jsonl(os.path.join(work, "pairs.jsonl"), [stage_pair_row(r) for r in rows])
    cfg = stage_config(a, "dpo", token_budget, model=os.path.join(work, "model"), data=data, out=out)
    rss_reset = reset_peaks(dev)
    summary = run(cfg)
    mem = peaks(dev, rss_reset)
    measured = _metrics(out)[a.warmup:]
    pairs = a.batch_size * len(measured)
    train_s = sum(r["step_time_s"] for r in measured)
    ref_s = summary["reference_pass_s"] * pairs / summary["pairs"]
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured) * 4 / 3  # + the reference's forward of every sequence
    return {**rates(tokens, train_s + ref_s, flops, len(measured), dev), **mem,
            "pairs_per_s": pairs / (train_s + ref_s),
            "pairs_per_s_steps_only": pairs / train_s, "reference_share_s": ref_s, "tokens": tokens,
            "token_budget": token_budget, "weights": "fp32", "autocast": "bf16" if dev.type == "cuda" else None,
            "rewards/accuracies": measured[-1]["rewards/accuracies"], "final_loss": measured[-1]["loss"]}


@contextlib.contextmanager
def engine_calls():
    """Every rollout engine's generate and sync call in this process while inside, timed: (name, start, end,
    completion tokens sampled). Per rank, what the stage's metrics (rank 0's steps, the round's totals) do not
    tell: each rank's own share of the sampling and its own weight syncs."""
    from components.training.engines import HFEngine, VLLMEngine

    calls: list[tuple[str, float, float, int]] = []
    real = [(cls, name, cls.__dict__[name]) for cls in (HFEngine, VLLMEngine) for name in ("generate", "sync")]

    def timed(name, method):
        def call(self, *args, **kwargs):
            start = time.perf_counter()
            result = method(self, *args, **kwargs)
            calls.append((name, start, time.perf_counter(), sum(result.lengths) if name == "generate" else 0))
            return result
        return call

    for cls, name, method in real:
        setattr(cls, name, timed(name, method))
    try:
        yield calls
    finally:
        for cls, name, method in real:
            setattr(cls, name, method)


def rollout_job(a, objective: str, work: str, token_budget: int, write: bool = True) -> tuple[str, object]:
    """grpo or ppo with the engine a.rollout (one engine: "hf" or "vllm"): its prompts written under `work` (not
    with `write` False: a rank reads what the bench wrote), its output directory (one per objective and engine, so
    a second engine's run does not resume the first's) and its config."""
    data = os.path.join(work, f"{objective}_prompts.jsonl")
    if write:
        size = SIZES[a.size]
        _jsonl(data, grpo_prompts(size["vocab_size"], a.batch_size * 4 * (a.warmup + a.steps + 2), a.prompt_len))
    asynchronous = getattr(a, "asynchronous", None)
    out = os.path.join(work, f"{objective}-{a.rollout}" + ("" if asynchronous is None else f"-async{asynchronous}"))
    model = os.path.join(work, "model")
    if objective == "grpo":
        return out, stage_config(a, "grpo", token_budget, model=model, data=data, out=out)
    return out, rl_stage_config(a, "ppo", token_budget, model=model, data=data, out=out)


def run_rollout_stage(a, objective: str, cfg, dev: torch.device) -> dict:
    """The stage run in this process (one rank of it under torchrun): this rank's peak memory, and over the
    measured rounds (after the warm-up's) its sampled completion tokens, rollout seconds and weight-sync seconds
    (the syncs from the first measured round on: the one before it belongs to the warm-up's last step)."""
    # --grpo-warmup counts optimizer steps: grpo takes --steps-per-rollout of them a round, ppo's rounds are counted
    warmup_rounds = a.grpo_warmup // a.steps_per_rollout if objective == "grpo" else a.grpo_warmup
    if objective == "grpo":
        from components.grpo.main import run
    else:
        from components.ppo.main import run

    rss_reset = reset_peaks(dev)
    with engine_calls() as calls:
        run(cfg)
    mem = peaks(dev, rss_reset)
    generates = [c for c in calls if c[0] == "generate"][warmup_rounds:]
    first = generates[0][1] if generates else float("inf")
    syncs = [c for c in calls if c[0] == "sync" and c[1] >= first]
    return {"rank": int(os.environ.get("RANK", "0")), "completion_tokens": sum(c[3] for c in generates),
            "rollout_s": sum(c[2] - c[1] for c in generates), "sync_s": sum(c[2] - c[1] for c in syncs),
            "syncs": len(syncs), "threads": torch.get_num_threads(), **mem}


def with_ranks(line: dict, ranks: list[dict]) -> dict:
    """The line with each rank's numbers (`ranks`, its completion_tokens_per_s over the line's measured time) and
    the largest peak memory of a rank."""
    sec = line["measured_s"]
    ranks = sorted(ranks, key=lambda r: r["rank"])
    for r in ranks:
        r["completion_tokens_per_s"] = r["completion_tokens"] / sec
    out = {**line, "nproc": len(ranks), "ranks": ranks}
    for key in ("peak_rss_gb", "peak_mem_gb"):
        values = [r[key] for r in ranks if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["peak_rss_scope"] = "measurement" if all(r["peak_rss_scope"] == "measurement" for r in ranks) else "process"
    return out


def run_ours_grpo(a, work: str, dev: torch.device, token_budget: int) -> dict:
    """The grpo stage on the reference prompts: a round of rollouts (prompts × group) every
    --steps-per-rollout optimizer steps of --grpo-batch-size sequences; μ = 1, β = 0, as TRL's defaults."""
    return run_rollout(a, "grpo", work, dev, token_budget)


def split_cores() -> tuple[list[int], list[int]]:
    """This process's cores, halved: the trainer's (the first half) and the rollout worker's."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[:len(cores) // 2], cores[len(cores) // 2:]


def run_ours_async(a, objective: str, work: str, dev: torch.device, token_budget: int) -> dict:
    """The grpo or ppo stage with a rollout worker sampling ahead (--async K: max_staleness K): this process trains
    on the first half of its cores (its affinity and torch threads set for the run, then restored), the worker
    samples on the rest (rollout_worker_cpus: taskset). Its completion tokens/s count the trained completion tokens
    over the measured steps' wall time, waits for the worker included (the synchronous line's count)."""
    trainer, worker = split_cores()
    a = argparse.Namespace(**{**vars(a), "worker_cpus": ",".join(map(str, worker))})
    out, cfg = rollout_job(a, objective, work, token_budget)
    if objective == "grpo":
        from components.grpo.main import run
    else:
        from components.ppo.main import run

    affinity, threads, env = os.sched_getaffinity(0), torch.get_num_threads(), os.environ.get("POSTTRAIN_THREADS")
    os.sched_setaffinity(0, trainer)
    os.environ["POSTTRAIN_THREADS"] = str(len(trainer))
    rss_reset = reset_peaks(dev)
    try:
        run(cfg)
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("POSTTRAIN_THREADS", None)
        else:
            os.environ["POSTTRAIN_THREADS"] = env
    line = rollout_line(a, objective, out, dev, token_budget)
    measured, per_round = measured_steps(a, objective, out)  # a round's first step holds its wait and sampling
    return {**line, **peaks(dev, rss_reset), "rollout": "vllm", "async": a.asynchronous, "nproc": 1,
            "trainer_cpus": trainer, "worker_cpus": worker,
            "worker_sample_s": sum(r.get("async/sample_s", 0.0) for r in measured[::per_round]),
            "wait_s": sum(r.get("async/wait_s", 0.0) for r in measured[::per_round]),
            "staleness_hist": {key.rsplit("/", 1)[1]: value for key, value in measured[-1].items()
                               if key.startswith("async/staleness_hist/")},
            "dropped": measured[-1].get("async/dropped", 0)}


def run_rollout(a, objective: str, work: str, dev: torch.device, token_budget: int) -> dict:
    """grpo or ppo in this process: its line, with this process as its one rank."""
    out, cfg = rollout_job(a, objective, work, token_budget)
    rank = run_rollout_stage(a, objective, cfg, dev)
    return with_ranks(rollout_line(a, objective, out, dev, token_budget), [rank])


def rollout_line(a, objective: str, out: str, dev: torch.device, token_budget: int) -> dict:
    """The grpo or ppo line's numbers, from the stage's metrics under `out`."""
    return (grpo_line if objective == "grpo" else ppo_line)(a, out, dev, token_budget)


def measured_steps(a, objective: str, out: str) -> tuple[list[dict], int]:
    """The metrics of the grpo or ppo stage's measured steps (after --grpo-warmup's: grpo's counts steps, ppo's
    rounds of PPO_EPOCHS steps), and how many steps a round takes."""
    per_round = a.steps_per_rollout if objective == "grpo" else PPO_EPOCHS
    warmup_steps = a.grpo_warmup if objective == "grpo" else a.grpo_warmup * PPO_EPOCHS
    return _metrics(out)[warmup_steps:], per_round


def grpo_line(a, out: str, dev: torch.device, token_budget: int) -> dict:
    """The grpo line's numbers, from the stage's metrics (every rank's tokens; rank 0's step times)."""
    measured, per_round = measured_steps(a, "grpo", out)
    sec = sum(r["step_time_s"] for r in measured)
    completion = int(sum(r["trained_tokens"] for r in measured))  # μ = 1: each sampled token trains once
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured) * 4 / 3  # + the rollout: one forward of every sequence
    first_of_round = measured[::per_round]
    return {**rates(tokens, sec, flops, len(measured), dev), "completion_tokens_per_s": completion / sec,
            "completion_tokens": completion, "tokens": tokens, "measured_s": sec,
            "rollout_s": sum(r["rollout_s"] for r in first_of_round), "token_budget": token_budget,
            "weights": "fp32", "autocast": "bf16" if dev.type == "cuda" else None,
            "rollout": a.rollout, "rollout_cache": ("static" if dev.type == "cuda" else "dynamic") if a.rollout == "hf"
            else "vllm", "sync_s": sum(r.get("rollout/sync_s", 0.0) for r in measured),
            "logprob_diff_max": max(r.get("sampling/sampling_logp_difference/max", 0.0) for r in measured),
            "reward": measured[-1]["reward"]}


# ---- the reward-model and PPO rows (rm, ppo) ------------------------------------------------------------------------

PPO_EPOCHS = 4
"""PPO passes over each round: the ppo stage's default (preset ppo; a test checks), so a round is PPO_EPOCHS
optimizer steps. A constant: the bench's command line does not import the stages before measuring."""


def rl_stage_config(a, objective: str, token_budget: int, model: str, data: str, out: str):
    """The config our side runs `objective` (rm or ppo) with, from the bench arguments `a`, read as a user's YAML
    is (as `stage_config` does for the others). rm: the reward_model stage on the DPO pairs, none held out. ppo: the
    ppo stage on the GRPO prompts, one completion each, its defaults otherwise (preset ppo, a KL penalty to the
    starting policy, a critic from the policy), scoring with BENCH_REWARDS."""
    from components.config import from_mapping

    if objective == "rm":
        from components.reward_model.config import RewardModelConfig

        total = a.warmup + a.steps
        return from_mapping(RewardModelConfig, {
            "model": model, "output_dir": out, "train_data": data, "max_length": a.max_len + 1, "eval_fraction": 0.0,
            "train": {"max_steps": total, "batch_size": a.batch_size, "token_budget": token_budget, "lr": 1e-6,
                      "seed": 0, "log_every": total}})
    if objective == "ppo":
        from components.ppo.config import PPOConfig

        total = (a.grpo_warmup + a.grpo_steps) * PPO_EPOCHS
        return from_mapping(PPOConfig, {
            "model": model, "output_dir": out, "prompts": {"path": data}, "rewards": BENCH_REWARDS,
            "ppo_epochs": PPO_EPOCHS, "num_minibatches": 1, "rollout": {"engine": a.rollout},
            "sampling": {"max_new_tokens": a.new_tokens, "generation_batch_size": a.grpo_batch_size}, **async_keys(a),
            "train": {"max_steps": total, "batch_size": a.grpo_batch_size, "token_budget": token_budget,
                      "lr": 1e-6, "seed": 0, "log_every": total}})
    raise ValueError(f"no stage for objective {objective!r}")


def run_ours_rm(a, work: str, dev: torch.device, token_budget: int) -> dict:
    """The reward_model stage on the reference DPO pairs: a scalar head on the random-init model, each pair's
    chosen and rejected sequence in one packed row, scored at its last token (EOS)."""
    from components.reward_model.main import run
    from pipelines.bench.workloads import rm_pair_row

    total = a.warmup + a.steps
    rows = dpo_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.max_len)
    out = os.path.join(work, "rm")
    data = _jsonl(os.path.join(work, "rm_pairs.jsonl"), [rm_pair_row(r) for r in rows])
    cfg = rl_stage_config(a, "rm", token_budget, model=os.path.join(work, "model"), data=data, out=out)
    rss_reset = reset_peaks(dev)
    run(cfg)
    mem = peaks(dev, rss_reset)
    measured = _metrics(out)[a.warmup:]
    pairs = a.batch_size * len(measured)
    sec = sum(r["step_time_s"] for r in measured)
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured)  # the scalar-head model, as the stage counts it
    return {**rates(tokens, sec, flops, len(measured), dev), **mem, "pairs_per_s": pairs / sec, "tokens": tokens,
            "token_budget": token_budget, "weights": "fp32", "autocast": "bf16" if dev.type == "cuda" else None,
            "accuracy": measured[-1]["accuracy"], "final_loss": measured[-1]["loss"]}


def run_ours_ppo(a, work: str, dev: torch.device, token_budget: int) -> dict:
    """The ppo stage on the reference GRPO prompts: rounds of --grpo-batch-size prompts, one completion each, each
    round PPO_EPOCHS optimizer steps of the actor and of the critic; --grpo-warmup rounds, then --grpo-steps
    measured."""
    return run_rollout(a, "ppo", work, dev, token_budget)


def ppo_line(a, out: str, dev: torch.device, token_budget: int) -> dict:
    """The ppo line's numbers, from the stage's metrics (every rank's tokens; rank 0's step times)."""
    cfg_size = SIZES[a.size]
    measured, per_round = measured_steps(a, "ppo", out)
    first_of_round = measured[::per_round]
    sec = sum(r["step_time_s"] for r in measured)  # a round's first step holds its rollout
    completion = int(sum(r["trained_tokens"] for r in first_of_round))  # one minibatch: every sampled token
    tokens = int(sum(r["tokens"] for r in measured))
    # FLOPs: the actor's training (what the loop counts), the critic's (the same backbone, a scalar head instead of
    # the LM head: 6·(P_actor − P_critic) less per token), and per round one forward (⅓ of a training pass) of every
    # sequence by the sampler, the reference and the critic
    actor = sum(r["flops"] for r in measured)
    lm_head_less = 6 * (cfg_size["vocab_size"] - 1) * cfg_size["hidden_size"]
    critic = actor - lm_head_less * tokens
    round_actor = sum(r["flops"] for r in first_of_round)
    round_critic = round_actor - lm_head_less * sum(r["tokens"] for r in first_of_round)
    flops = actor + critic + (2 * round_actor + round_critic) / 3
    return {**rates(tokens, sec, flops, len(measured), dev), "completion_tokens_per_s": completion / sec,
            "completion_tokens": completion, "tokens": tokens, "measured_s": sec,
            "rollout_s": sum(r["rollout_s"] for r in first_of_round), "token_budget": token_budget,
            "weights": "fp32", "autocast": "bf16" if dev.type == "cuda" else None, "rollout": a.rollout,
            "rollout_cache": ("static" if dev.type == "cuda" else "dynamic") if a.rollout == "hf" else "vllm",
            "sync_s": sum(r.get("rollout/sync_s", 0.0) for r in measured),
            "logprob_diff_max": max(r.get("sampling/sampling_logp_difference/max", 0.0) for r in measured),
            "reward": first_of_round[-1]["reward"]}
