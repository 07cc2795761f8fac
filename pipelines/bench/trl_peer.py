"""The TRL peer: TRL's SFTTrainer, DPOTrainer and GRPOTrainer on the same workloads as our side, set up as in
the reference measurements, timed by a trainer callback and counted from the batches their collators build.
TRL is an optional extra (pip install -e '.[bench]'), imported lazily. How each number is counted:
docs/bench.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import torch

from pipelines.bench.measure import peaks, rates, reset_peaks, sync
from pipelines.bench.workloads import (
    BENCH_REWARDS,
    SIZES,
    build_model,
    dpo_rows,
    grpo_prompts,
    pair_ids,
    peer_pair_row,
    peer_row,
    peer_tokenizer,
)

log = logging.getLogger("posttrain.bench")

TRL_MISSING = "trl not installed: pip install -e '.[bench]'"


@contextlib.contextmanager
def _no_fingerprints():
    """As the reference measurements do: datasets hashes map functions with dill, which fails on some images;
    restored after."""
    import datasets.fingerprint as fp

    saved = fp.Hasher.__dict__["hash"], fp.update_fingerprint
    fp.Hasher.hash = classmethod(lambda cls, value: os.urandom(16).hex())
    fp.update_fingerprint = lambda *args, **kw: os.urandom(16).hex()
    try:
        yield
    finally:
        fp.Hasher.hash, fp.update_fingerprint = saved


def _clock(skip: int, dev: torch.device):
    """A trainer callback timing from the end of step `skip` (or the start) to the end of the last step,
    synchronized at both ends: the reference measurements' Clock, minus the trainer's teardown."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.t1 = None, None

        def on_train_begin(self, args, state, control, **kw):
            if skip == 0:
                sync(dev)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == skip:
                sync(dev)
                self.t0 = time.perf_counter()
            if state.global_step == state.max_steps:
                sync(dev)
                self.t1 = time.perf_counter()

        @property
        def seconds(self) -> float:
            if self.t0 is None or self.t1 is None:
                raise RuntimeError("the trainer stopped before the measured steps ended")
            return self.t1 - self.t0

    return Clock()


def _trl_args(config_cls, a, dev: torch.device, out: str, checkpointing: bool | None, **kw):
    """A TRL config as the reference measurements build it (lr, no saving, no logging), plus `kw`;
    `checkpointing` None keeps TRL's default (on for DPO and GRPO)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_cls)}
    args = dict(output_dir=out, bf16=dev.type == "cuda", report_to="none",
                logging_steps=1000, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                dataloader_pin_memory=dev.type == "cuda", **kw)
    if checkpointing is not None:  # transformers 5 renamed gradient_checkpointing to activation_checkpointing
        args["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = \
            checkpointing
    cfg = config_cls(**args)
    return cfg, bool(getattr(cfg, "activation_checkpointing", getattr(cfg, "gradient_checkpointing", False)))


def _peer_bf16(a, dev: torch.device) -> bool:
    return a.peer_dtype == "bf16" or (a.peer_dtype == "auto" and dev.type == "cuda")


def _peer_checkpointing(a) -> bool | None:
    return {"default": None, "on": True, "off": False}[a.peer_checkpointing]


def _trl_versions() -> dict:
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__}


def run_trl(a, rows: list[dict], examples: list, dev: torch.device) -> dict:
    """TRL's SFTTrainer (also the peer of PSFT) on the same rows, checked to see the same tokens as our Examples."""
    try:
        import datasets
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return {"error": TRL_MISSING}
    from components.training.flops import training_flops

    total = a.warmup + a.steps
    bf16_weights = _peer_bf16(a, dev)
    rss_reset = reset_peaks(dev)
    model = build_model(a.size, torch.bfloat16 if bf16_weights else torch.float32)
    tok = peer_tokenizer(SIZES[a.size]["vocab_size"])
    out = tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-")
    # the reference measurements turn TRL's activation checkpointing off for SFT, whatever --peer-checkpointing says
    args, checkpointing = _trl_args(SFTConfig, a, dev, out.name, False, max_steps=total,
                                    per_device_train_batch_size=a.batch_size, max_length=a.max_len + 1,
                                    packing=False, learning_rate=1e-5)
    clock = _clock(a.warmup, dev)
    with _no_fingerprints():
        tr = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(
            [peer_row(r) for r in rows]), processing_class=tok, callbacks=[clock])
    same = _same_tokens(tr.train_dataset, examples)
    if not same:
        log.warning("TRL tokenized the rows differently from our Examples: the comparison is not like for like")

    # lengths and trained targets (a label; the model shifts labels by one) of each batch, step by step
    batches = _count_batches(tr, lambda fs: ([len(f["input_ids"]) for f in fs],
                                             sum(lab != -100 for f in fs for lab in f.get("labels", [])[1:])))
    mem = _train_peer(tr, out, dev, rss_reset)
    measured = _measured(batches, a.warmup, total)
    sec = clock.seconds
    tokens = sum(sum(lengths) for lengths, _ in measured)
    trained = sum(t for _, t in measured)
    flops = sum(training_flops(model, lengths) for lengths, _ in measured)
    res = {**rates(tokens, sec, flops, a.steps, dev), **mem, "tokens": tokens, "trained_tokens": trained or None,
           "weights": "bf16" if bf16_weights else "fp32",
           "autocast": "bf16" if dev.type == "cuda" else None, "same_tokens": same,
           "activation_checkpointing": checkpointing, **_trl_versions(),
           "note": "rows as the reference SFT workload, given as (prompt, ' '+completion+' t2') with single-word "
                   "special tokens so TRL sees prompt+completion+eos ids exactly as ours; the reference measurements' "
                   "own tokenizer splits ~48% of words in two"}
    del tr, model
    return res


def run_trl_dpo(a, dev: torch.device) -> dict:
    """TRL's DPOTrainer as the reference measurements run it: a second (reference) model, its log-probs inside
    each step."""
    try:
        import datasets
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return {"error": TRL_MISSING}
    from components.training.flops import training_flops

    total = a.warmup + a.steps
    rows = dpo_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.max_len)
    dtype = torch.bfloat16 if _peer_bf16(a, dev) else torch.float32
    rss_reset = reset_peaks(dev)
    model, ref = build_model(a.size, dtype), build_model(a.size, dtype).eval()
    out = tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-")
    args, checkpointing = _trl_args(DPOConfig, a, dev, out.name, _peer_checkpointing(a), max_steps=total,
                                    per_device_train_batch_size=a.batch_size, max_length=a.max_len,
                                    learning_rate=1e-6)
    clock = _clock(a.warmup, dev)
    with _no_fingerprints():
        tr = DPOTrainer(model=model, ref_model=ref, args=args,
                        processing_class=peer_tokenizer(SIZES[a.size]["vocab_size"]),
                        train_dataset=datasets.Dataset.from_list([peer_pair_row(r) for r in rows]), callbacks=[clock])
    ds = tr.train_dataset
    same = len(ds) == len(rows) and all((d["prompt_ids"], d["chosen_ids"], d["rejected_ids"]) == pair_ids(r)
                                        for d, r in zip(ds, rows))
    batches = _count_batches(tr, lambda fs: [len(f["prompt_ids"]) + len(f[k]) for f in fs
                                             for k in ("chosen_ids", "rejected_ids")])
    mem = _train_peer(tr, out, dev, rss_reset)
    measured = _measured(batches, a.warmup, total)
    sec = clock.seconds
    tokens = sum(sum(b) for b in measured)
    flops = sum(training_flops(model, b) for b in measured) * 4 / 3
    res = {**rates(tokens, sec, flops, a.steps, dev), **mem, "pairs_per_s": a.batch_size * a.steps / sec,
           "tokens": tokens, "weights": "bf16" if dtype == torch.bfloat16 else "fp32", "same_tokens": same,
           "activation_checkpointing": checkpointing, **_trl_versions()}
    del tr, model, ref
    return res


def run_trl_grpo(a, dev: torch.device) -> dict:
    """TRL's GRPOTrainer with HF generate (no vLLM), as the reference measurements run it, on the same prompts
    and reward."""
    try:
        import datasets
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return {"error": TRL_MISSING}
    from components.rewards import build_rewards
    from components.training.flops import training_flops

    total = a.grpo_warmup + a.grpo_steps
    prompts = grpo_prompts(SIZES[a.size]["vocab_size"], a.batch_size * 4 * (a.warmup + a.steps + 2), a.prompt_len)
    rewards = build_rewards(BENCH_REWARDS)
    rounds: list[list[tuple[int, int]]] = []  # (prompt, completion) tokens of each generation batch's sequences

    def bench_reward(prompts, completions, completion_ids, **kw):
        # one word of a prompt is one token (the peer tokenizer); TRL hands over the completions' ids
        rounds.append([(len(p.split()), len(c)) for p, c in zip(prompts, completion_ids)])
        return rewards.score(list(prompts), list(completions))[0]

    dtype = torch.bfloat16 if _peer_bf16(a, dev) else torch.float32
    rss_reset = reset_peaks(dev)
    model = build_model(a.size, dtype)
    model.config._name_or_path = "random-qwen2"
    out = tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-")
    args, checkpointing = _trl_args(GRPOConfig, a, dev, out.name, _peer_checkpointing(a), max_steps=total,
                                    per_device_train_batch_size=a.grpo_batch_size, num_generations=a.group,
                                    steps_per_generation=a.steps_per_rollout, max_completion_length=a.new_tokens,
                                    learning_rate=1e-6, use_vllm=False)
    clock = _clock(a.grpo_warmup, dev)
    with _no_fingerprints():
        tr = GRPOTrainer(model=model, reward_funcs=bench_reward, args=args, callbacks=[clock],
                         train_dataset=datasets.Dataset.from_list(prompts),
                         processing_class=peer_tokenizer(SIZES[a.size]["vocab_size"]))
    mem = _train_peer(tr, out, dev, rss_reset)
    k = a.steps_per_rollout
    measured = [seq for r in _measured(rounds, a.grpo_warmup // k, total // k) for seq in r]
    seqs = [p + c for p, c in measured]
    completion = sum(c for _, c in measured)
    sec = clock.seconds
    flops = training_flops(model, seqs) * 4 / 3
    res = {**rates(sum(seqs), sec, flops, a.grpo_steps, dev), **mem, "completion_tokens_per_s": completion / sec,
           "completion_tokens": completion, "tokens": sum(seqs),
           "weights": "bf16" if dtype == torch.bfloat16 else "fp32",
           "activation_checkpointing": checkpointing, "rollout_cache": "dynamic", **_trl_versions()}
    del tr, model
    return res


def _train_peer(trainer, out, dev: torch.device, rss_reset: bool) -> dict:
    """Run the TRL trainer, drop its output directory, and return the memory peaks of the measurement."""
    try:
        trainer.train()
    finally:
        out.cleanup()
    return peaks(dev, rss_reset)


def _count_batches(trainer, record) -> list:
    """Wrap the trainer's collator to keep `record(features)` of every batch it builds, in order: the k-th batch
    is step k+1's (prefetching keeps the order)."""
    seen: list = []
    inner = trainer.data_collator

    def collate(features):
        seen.append(record(features))
        return inner(features)

    trainer.data_collator = collate
    return seen


def _measured(batches: list, start: int, end: int) -> list:
    if len(batches) < end:
        raise RuntimeError(f"TRL built {len(batches)} batches, expected {end}: cannot count its tokens")
    return batches[start:end]


def _same_tokens(dataset, examples: list) -> bool:
    """TRL's tokenized rows equal our Examples: the same ids, and labels only on the completion (and EOS)."""
    if len(dataset) != len(examples):
        return False
    for row, ex in zip(dataset, examples):
        if row["input_ids"] != ex.input_ids:
            return False
        if "labels" in row:
            trained = [t for t, lab in enumerate(row["labels"]) if lab != -100]
        elif "completion_mask" in row:
            trained = [t for t, m in enumerate(row["completion_mask"]) if m]
        else:
            return False
        if trained != list(range(ex.completion_start, len(ex))):
            return False
    return True


def run_trl_rm(a, dev: torch.device) -> dict:
    """TRL's RewardTrainer on the same pairs as our reward_model stage: the same random-init model with a scalar head
    (AutoModelForSequenceClassification, num_labels 1, the head drawn with seed 0), the same pairs per step, TRL's
    default activation checkpointing (see --peer-checkpointing); checked to see the same tokens (`same_tokens`)."""
    try:
        import datasets
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer
    except ImportError:
        return {"error": TRL_MISSING}
    from components.training.flops import training_flops
    from pipelines.bench.workloads import PAD_ID, rm_pair_row, save_model

    total = a.warmup + a.steps
    rows = dpo_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.max_len)
    dtype = torch.bfloat16 if _peer_bf16(a, dev) else torch.float32
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-model-") as path:
        save_model(a.size, path)
        torch.manual_seed(0)  # the new head, as our stage draws it (train.seed 0)
        rss_reset = reset_peaks(dev)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=PAD_ID,
                                                                   dtype=dtype)
    out = tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-")
    args, checkpointing = _trl_args(RewardConfig, a, dev, out.name, _peer_checkpointing(a), max_steps=total,
                                    per_device_train_batch_size=a.batch_size, max_length=a.max_len + 1,
                                    learning_rate=1e-6)
    clock = _clock(a.warmup, dev)
    with _no_fingerprints():
        tr = RewardTrainer(model=model, args=args, processing_class=peer_tokenizer(SIZES[a.size]["vocab_size"]),
                           train_dataset=datasets.Dataset.from_list([rm_pair_row(r) for r in rows]), callbacks=[clock])
    ds = tr.train_dataset
    same = len(ds) == len(rows) and all(
        (d["chosen_ids"], d["rejected_ids"]) == (prompt + chosen, prompt + rejected)
        for d, (prompt, chosen, rejected) in zip(ds, map(pair_ids, rows)))
    batches = _count_batches(tr, lambda fs: [len(f[k]) for f in fs for k in ("chosen_ids", "rejected_ids")])
    mem = _train_peer(tr, out, dev, rss_reset)
    measured = _measured(batches, a.warmup, total)
    sec = clock.seconds
    tokens = sum(sum(b) for b in measured)
    flops = sum(training_flops(model, b) for b in measured)
    res = {**rates(tokens, sec, flops, a.steps, dev), **mem, "pairs_per_s": a.batch_size * a.steps / sec,
           "tokens": tokens, "weights": "bf16" if dtype == torch.bfloat16 else "fp32", "same_tokens": same,
           "activation_checkpointing": checkpointing, **_trl_versions()}
    del tr, model
    return res


def trl_ppo_missing() -> str:
    """Why the ppo row has no peer: TRL (1.x) has no PPO trainer, neither in trl nor in trl.experimental."""
    try:
        import trl
    except ImportError:
        return TRL_MISSING
    experimental = os.path.join(os.path.dirname(trl.__file__), "experimental")  # not imported: it warns
    if hasattr(trl, "PPOTrainer") or os.path.isdir(os.path.join(experimental, "ppo")):
        return f"trl {trl.__version__} has a PPO trainer, but no peer for it is written yet"
    return f"none: trl {trl.__version__} has no PPO trainer (neither trl nor trl.experimental)"
