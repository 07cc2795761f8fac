"""`posttrain bench`: throughput, MFU and peak memory of our objectives, optionally against TRL on the same data.

    posttrain bench --size tiny|0.5b|1.5b --objectives sft,psft,dpo,grpo [--peers trl] [--json]
                    [--steps 15] [--warmup 5] [--batch-size 8] [--min-len 128] [--max-len 1024]
                    [--token-budget T] [--updates-per-batch 8] [--peer-dtype auto|bf16|fp32]
                    [--peer-checkpointing default|on|off] [--grpo-batch-size 32] [--group 8] [--prompt-len 128]
                    [--new-tokens 256] [--grpo-steps 3] [--grpo-warmup 1] [--steps-per-rollout 1] [--out FILE]

Workload (the peer anchors' SFT workload: the one TRL's SFTTrainer was measured on, on one H100)
    A random-init Qwen2 of the chosen shape (the same SIZES table, tie_word_embeddings, rope_theta 1e6, sdpa,
    torch.manual_seed(0)), and batch_size × (warmup + steps + 2) rows drawn with random.Random(0) exactly as
    the anchors draw them: n ~ uniform[min_len, max_len], prompt = n // 4 words "t<id>" (id uniform in
    [3, vocab)), completion = the other n - n // 4. With the defaults (15 measured + 5 warm-up steps) the
    rows are the anchors' default rows, one for one; the row sequence is prefix-stable in the row count.

    Our loop gets the words directly as token ids ("t<i>" -> i): prompt ids, completion ids, then EOS (id 2,
    as TRL appends it), so n + 1 tokens with completion_start = n // 4; the loss covers the completion and
    the EOS. No chat template.

    The TRL peer gets the same rows as text, with two changes that make it see exactly those n + 1 tokens
    (checked: the "same_tokens" field of the trl_sft line compares TRL's tokenized dataset with our
    Examples, ids and loss masks):
    - the tokenizer's special tokens t0/t1/t2 (unk/pad/eos) are single-word added tokens. In peer_anchors'
      tokenizer they are plain added tokens, which match *inside* words: "t200" -> [t2, unk], "t135" ->
      [t1, unk], so about 48% of the words (43% at vocab 512) become two tokens, TRL trains on ~1.48 n
      tokens per row (truncated at max_length) and the anchors' tokens_per_s, which counts n words, is
      that much below what TRL actually processed.
    - the completion is given as " " + completion + " t2": TRL tokenizes prompt + completion as one
      string and appends EOS with no separator, so otherwise the last prompt word and the first completion
      word ("t66t100"), and the last completion word and EOS ("t53t2"), merge into unknown tokens.

Measurement (SFT, PSFT)
    SFT and PSFT run `components.training.loop.train` for warmup + steps optimizer steps of batch_size
    sequences (token_budget tokens per packed micro-batch: 16384 on GPU, 4096 on CPU unless given; PSFT
    with updates_per_batch π_old snapshots, 8 as in the reference setting, so a snapshot's extra forward
    pass falls in the measured window in proportion). Precision is the loop's "auto": fp32 weights and
    AdamW with bf16 autocast on GPU, fp32 on CPU.

    - tokens_per_s: non-pad tokens of the measured steps (the steps after warm-up) / the sum of their
      step_time_s (a step's time covers packing, forward, backward, optimizer step, up to a device sync).
    - mfu: the FLOPs of those steps (components.training.flops.training_flops over the sequences each step
      actually trained) / that time / peak_flops (PEAK_TFLOPS, or a known GPU's bf16 peak); null on CPU
      unless PEAK_TFLOPS is set.
    - peak_mem_gb: torch.cuda.max_memory_allocated during the measurement (null on CPU); peak_rss_gb: the
      process's peak resident set during the measurement (VmHWM, reset per measurement through
      /proc/self/clear_refs; where that is not possible, resource.getrusage's ru_maxrss since the process
      started: "peak_rss_scope": "process").

    The TRL peer for SFT and PSFT (`--peers trl`) runs SFTTrainer as the anchors do (packing=False, no activation
    checkpointing, lr 1e-5, bf16=True on GPU; weights bf16 on GPU as in the anchors, see --peer-dtype) with
    max_length = max_len + 1 (nothing is truncated). Time: from the end of warm-up step `warmup` to the end
    of the last step, synchronized at both ends (the anchors' Clock callback, minus the trainer's teardown);
    tokens and FLOPs: the lengths of the batches its collator actually built for the measured steps (TRL
    samples its own random rows of the same set; rates are per token, so that is fair). Our lines get
    "speedup_vs_trl" = our tokens_per_s / TRL's tokens_per_s ("vs": "trl_sft"; for psft too, as the cost of
    PSFT relative to TRL's SFT). TRL is an optional extra (pip install -e '.[bench]'), imported lazily; when
    it is missing the trl_sft line carries an "error" and the rest still runs.

DPO (the anchors' DPO workload)
    batch_size × (warmup + steps + 2) pairs drawn as peer_anchors.dpo() draws them: prompt, chosen and rejected
    of max_len // 4 words each (256 with the defaults), 8 pairs per step. Ours is the dpo stage itself
    (components.dpo.main.run: a model directory with the random-init model and the peer tokenizer, the pairs
    as JSONL, β 0.1, sigmoid, lr 1e-6), so a pair is prompt + chosen + EOS and prompt + rejected + EOS. Its
    reference log-probs come from one pass before training; TRL's DPOTrainer (as the anchors run it: a second
    model as reference, its forward inside every step, TRL's default activation checkpointing) is given the
    pairs so that it tokenizes exactly those ids ("same_tokens").
    - pairs_per_s: measured pairs / (their steps' step_time_s + their share of the reference pass); for TRL
      measured pairs / the Clock's seconds. pairs_per_s_steps_only leaves our reference pass out.
    - mfu counts training FLOPs × 4/3 (the reference's forward) on both sides.
    "speedup_vs_trl" (posttrain_dpo) = our pairs_per_s / TRL's.

GRPO (the anchors' GRPO workload)
    Prompts of --prompt-len words (peer_anchors.grpo()'s draw), --group completions each, up to --new-tokens
    tokens sampled at temperature 1, --grpo-batch-size sequences per optimizer step, one rollout round per
    --steps-per-rollout steps (TRL: steps_per_generation), μ = 1, β = 0, lr 1e-6; --grpo-warmup steps, then
    --grpo-steps measured (the anchors: 4 steps, the first not timed). Ours is the grpo stage itself (a static
    KV cache on GPU); TRL's GRPOTrainer uses HF generate (no vLLM) with TRL's default activation checkpointing.
    Both score with the same reward (BENCH_REWARDS: groups with and without variance, so advantages are real).
    - completion_tokens_per_s: sampled tokens (EOS included, padding not) of the measured steps / their time,
      the rollout included (ours: the step_time_s of the measured steps, the round's rollout in its first
      step; TRL: the Clock's seconds; its completions are counted in the reward function, from completion_ids).
    - mfu counts training FLOPs × 4/3 (the rollout: one forward of every sequence) on both sides.
    "speedup_vs_trl" (posttrain_grpo) = our completion_tokens_per_s / TRL's.

Output
    One JSON line per measurement (what: posttrain_<objective> | trl_sft | trl_dpo | trl_grpo), e.g.
    {"what": "posttrain_sft", "size": "tiny", "bs": 8, "steps": 15, "warmup": 5, "tokens_per_s": ...,
     "sec_per_step": ..., "mfu": null, "peak_mem_gb": null, "peak_rss_gb": ..., "device": "cpu", ...}
    With --json only those lines go to stdout (logs and the trainers' own output go to stderr); without it
    a table. --out FILE also appends the JSON lines to FILE. Exit status 0, or 1 when one of our objectives
    failed (its line then carries "error"), 2 on bad arguments (unknown objective or peer, a GRPO workload
    whose group does not divide the batch).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
import traceback

import torch

log = logging.getLogger("posttrain.bench")

# The peer anchors' model shapes (peer_anchors.py SIZES), random-init Qwen2.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}
OBJECTIVES = ("sft", "psft", "dpo", "grpo")
PEERS = ("trl",)
UNK_ID, PAD_ID, EOS_ID = 0, 1, 2  # "t0", "t1", "t2": the anchors' unk / pad / eos
TRL_MISSING = "trl not installed: pip install -e '.[bench]'"


# ----------------------------------------------------------------------------------------------------
# Model and workload

def qwen2_config(size: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6,
                       attn_implementation="sdpa", use_cache=True)


def build_model(size: str, dtype: torch.dtype = torch.float32):
    """The anchors' random-init model (seed 0), on the CPU; the trainers move it."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(qwen2_config(size)).to(dtype=dtype)


def text(n: int, vocab: int, rng: random.Random) -> str:
    """peer_anchors.text: n words "t<id>", id uniform in [3, vocab)."""
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


def workload_rows(vocab: int, num_rows: int, min_len: int, max_len: int) -> list[dict]:
    """The anchors' SFT rows: the same RNG (random.Random(0)) drawn in the same order as peer_anchors.sft()."""
    rng = random.Random(0)
    rows = []
    for _ in range(num_rows):
        n = rng.randint(min_len, max_len)
        p = n // 4
        rows.append({"prompt": text(p, vocab, rng), "completion": text(n - p, vocab, rng)})
    return rows


def row_example(row: dict):
    """A row as our Example: prompt ids, completion ids, EOS; the loss covers completion and EOS."""
    from components.training.batching import Example

    prompt = [int(w[1:]) for w in row["prompt"].split()]
    completion = [int(w[1:]) for w in row["completion"].split()]
    return Example(input_ids=prompt + completion + [EOS_ID], completion_start=len(prompt))


def peer_row(row: dict) -> dict:
    """The row as TRL gets it: separated so that no words merge, EOS given (TRL then appends none)."""
    return {"prompt": row["prompt"], "completion": " " + row["completion"] + " t2"}


def dpo_rows(vocab: int, num_rows: int, max_len: int) -> list[dict]:
    """The anchors' DPO rows (peer_anchors.dpo()): prompt, chosen and rejected of max_len // 4 words each."""
    rng = random.Random(0)
    n = max_len // 4
    return [{"prompt": text(n, vocab, rng), "chosen": text(n, vocab, rng), "rejected": text(n, vocab, rng)}
            for _ in range(num_rows)]


def grpo_prompts(vocab: int, num_rows: int, prompt_len: int) -> list[dict]:
    """The anchors' GRPO prompts (peer_anchors.grpo()): prompt_len words each."""
    rng = random.Random(0)
    return [{"prompt": text(prompt_len, vocab, rng)} for _ in range(num_rows)]


def pair_ids(row: dict) -> tuple[list[int], list[int], list[int]]:
    """A DPO row as token ids: prompt, chosen + EOS, rejected + EOS."""
    ids = lambda s: [int(w[1:]) for w in s.split()]  # noqa: E731
    return ids(row["prompt"]), ids(row["chosen"]) + [EOS_ID], ids(row["rejected"]) + [EOS_ID]


def stage_pair_row(row: dict) -> dict:
    """The row as our DPO stage reads it: it appends the EOS text to each completion, so a space first."""
    return {"prompt": row["prompt"], "chosen": row["chosen"] + " ", "rejected": row["rejected"] + " "}


def peer_pair_row(row: dict) -> dict:
    """The row as TRL's DPOTrainer gets it: it tokenizes prompt + completion as one string and appends EOS
    only when the completion does not end with it, so both are separated and end with " t2"."""
    return {"prompt": row["prompt"], "chosen": " " + row["chosen"] + " t2", "rejected": " " + row["rejected"] + " t2"}


def save_model(size: str, path: str) -> str:
    """The anchors' random-init model and the peer tokenizer as a Hugging Face directory (what stages load)."""
    model = build_model(size)
    model.save_pretrained(path, safe_serialization=True)
    peer_tokenizer(SIZES[size]["vocab_size"]).save_pretrained(path)
    del model
    return path


def peer_tokenizer(vocab: int):
    """The anchors' WordLevel tokenizer, with t0/t1/t2 as single-word special tokens (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = lambda s: AddedToken(s, single_word=True, special=True)  # noqa: E731
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=special("t0"), pad_token=special("t1"),
                                   eos_token=special("t2"))


# ----------------------------------------------------------------------------------------------------
# Device, memory

def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _reset_peaks(dev: torch.device) -> bool:
    """Free what the last measurement left and reset the peak counters; True if the RSS peak could be reset."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _peaks(dev: torch.device, rss_reset: bool) -> dict:
    rss_gb = None
    if rss_reset:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        rss_gb = int(line.split()[1]) * 1024 / 2**30
        except OSError:
            pass
    if rss_gb is None:
        rss_reset = False
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss_gb = maxrss / 2**30 if sys.platform == "darwin" else maxrss * 1024 / 2**30
    return {"peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "peak_rss_gb": rss_gb, "peak_rss_scope": "measurement" if rss_reset else "process"}


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rates(tokens: int, sec: float, flops: float, steps: int, dev: torch.device) -> dict:
    """Throughput and MFU of a measured window, the same way for ours and the peer."""
    from components.training.flops import peak_flops

    peak = peak_flops(dev)
    return {"tokens_per_s": tokens / sec, "sec_per_step": sec / steps, "mfu": flops / sec / peak if peak else None}


# ----------------------------------------------------------------------------------------------------
# Our loop

def run_ours(a, objective: str, examples: list, dev: torch.device, token_budget: int) -> dict:
    from components.training.loop import TrainConfig, train

    total = a.warmup + a.steps
    cfg = TrainConfig(method=objective, max_steps=total, batch_size=a.batch_size, token_budget=token_budget,
                      lr=1e-5, seed=0, updates_per_batch=a.updates_per_batch if objective == "psft" else 1,
                      log_every=total, precision="auto")
    rss_reset = _reset_peaks(dev)
    model = build_model(a.size, torch.float32)
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as out:
        hist = train(cfg, model, examples, out, pad_id=PAD_ID)
    mem = _peaks(dev, rss_reset)
    measured = hist[a.warmup:]
    sec = sum(r["step_time_s"] for r in measured)
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured)  # the loop counts the sequences each step trained
    res = {**_rates(tokens, sec, flops, len(measured), dev), **mem, "tokens": tokens, "trained_tokens": int(sum(r["trained_tokens"] for r in measured)),
           "token_budget": token_budget, "weights": "fp32",
           "autocast": "bf16" if dev.type == "cuda" else None, "final_loss": hist[-1]["loss"]}
    if objective == "psft":
        res["updates_per_batch"] = cfg.updates_per_batch
    del model, hist
    return res


# ----------------------------------------------------------------------------------------------------
# The TRL peer

@contextlib.contextmanager
def _no_fingerprints():
    """As the anchors do: datasets hashes map functions with dill, which fails on some images; restored after."""
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
    synchronized at both ends: the anchors' Clock, minus the trainer's teardown."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.t1 = None, None

        def on_train_begin(self, args, state, control, **kw):
            if skip == 0:
                _sync(dev)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == skip:
                _sync(dev)
                self.t0 = time.perf_counter()
            if state.global_step == state.max_steps:
                _sync(dev)
                self.t1 = time.perf_counter()

        @property
        def seconds(self) -> float:
            if self.t0 is None or self.t1 is None:
                raise RuntimeError("the trainer stopped before the measured steps ended")
            return self.t1 - self.t0

    return Clock()


def _trl_args(config_cls, a, dev: torch.device, out: str, checkpointing: bool | None, **kw):
    """A TRL config as the anchors build it (lr, no saving, no logging), plus `kw`; `checkpointing` None keeps
    TRL's default (on for DPO and GRPO)."""
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
    try:
        import datasets
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return {"error": TRL_MISSING}
    from components.training.flops import training_flops

    total = a.warmup + a.steps
    bf16_weights = _peer_bf16(a, dev)
    rss_reset = _reset_peaks(dev)
    model = build_model(a.size, torch.bfloat16 if bf16_weights else torch.float32)
    tok = peer_tokenizer(SIZES[a.size]["vocab_size"])
    out = tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-")
    # the anchors turn TRL's activation checkpointing off for SFT, whatever --peer-checkpointing says
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
    res = {**_rates(tokens, sec, flops, a.steps, dev), **mem, "tokens": tokens, "trained_tokens": trained or None, "weights": "bf16" if bf16_weights else "fp32",
           "autocast": "bf16" if dev.type == "cuda" else None, "same_tokens": same,
           "activation_checkpointing": checkpointing, **_trl_versions(),
           "note": "rows as peer_anchors, given as (prompt, ' '+completion+' t2') with single-word special tokens so "
                   "TRL sees prompt+completion+eos ids exactly as ours; peer_anchors' own tokenizer splits ~48% of "
                   "words in two"}
    del tr, model
    return res


# ----------------------------------------------------------------------------------------------------
# DPO and GRPO: our stages, run as a user runs them (a model directory and a JSONL in, metrics.jsonl out)

# A reward with variance inside groups, the same function for us and TRL: 1 when the completion's first word
# ends in 0-4, else 0 (the anchors' len(c) % 7 plays that role; what the reward is does not change the cost).
BENCH_REWARDS = [{"name": "format", "pattern": r"\s*t\d*[0-4]\b.*"}]


def _jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_ours_dpo(a, work: str, dev: torch.device, token_budget: int) -> dict:
    """The dpo stage on the anchors' pairs. Time per pair: the measured steps plus their share of the
    reference pass (which TRL does inside each step), so pairs_per_s is the cost of DPO, not of its steps only."""
    from components.dpo.main import DPOConfig, run

    total = a.warmup + a.steps
    rows = dpo_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.max_len)
    out = os.path.join(work, "dpo")
    cfg = DPOConfig(model=os.path.join(work, "model"), output_dir=out, max_steps=total, batch_size=a.batch_size,
                    train_data=_jsonl(os.path.join(work, "pairs.jsonl"), [stage_pair_row(r) for r in rows]),
                    token_budget=token_budget, max_length=a.max_len + 1, lr=1e-6, seed=0, log_every=total)
    rss_reset = _reset_peaks(dev)
    summary = run(cfg)
    mem = _peaks(dev, rss_reset)
    measured = _metrics(out)[a.warmup:]
    pairs = a.batch_size * len(measured)
    train_s = sum(r["step_time_s"] for r in measured)
    ref_s = summary["reference_pass_s"] * pairs / summary["pairs"]
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured) * 4 / 3  # + the reference's forward of every sequence
    return {**_rates(tokens, train_s + ref_s, flops, len(measured), dev), **mem, "pairs_per_s": pairs / (train_s + ref_s),
            "pairs_per_s_steps_only": pairs / train_s, "reference_share_s": ref_s, "tokens": tokens,
            "token_budget": token_budget, "weights": "fp32", "autocast": "bf16" if dev.type == "cuda" else None,
            "rewards/accuracies": measured[-1]["rewards/accuracies"], "final_loss": measured[-1]["loss"]}


def run_ours_grpo(a, work: str, dev: torch.device, token_budget: int) -> dict:
    """The grpo stage on the anchors' prompts: a round of rollouts (prompts × group) every
    --steps-per-rollout optimizer steps of --grpo-batch-size sequences; μ = 1, β = 0, as TRL's defaults."""
    from components.grpo.main import GRPOConfig, run

    total = a.grpo_warmup + a.grpo_steps
    round_size = a.grpo_batch_size * a.steps_per_rollout
    prompts = grpo_prompts(SIZES[a.size]["vocab_size"], a.batch_size * 4 * (a.warmup + a.steps + 2), a.prompt_len)
    out = os.path.join(work, "grpo")
    cfg = GRPOConfig(model=os.path.join(work, "model"), output_dir=out, max_steps=total,
                     prompts=_jsonl(os.path.join(work, "prompts.jsonl"), prompts), rewards=BENCH_REWARDS,
                     num_generations=a.group, prompts_per_round=round_size // a.group, batch_size=a.grpo_batch_size,
                     max_new_tokens=a.new_tokens, generation_batch_size=round_size, token_budget=token_budget,
                     lr=1e-6, seed=0, log_every=total)
    rss_reset = _reset_peaks(dev)
    run(cfg)
    mem = _peaks(dev, rss_reset)
    measured = _metrics(out)[a.grpo_warmup:]
    sec = sum(r["step_time_s"] for r in measured)
    completion = int(sum(r["trained_tokens"] for r in measured))  # μ = 1: each sampled token trains once
    tokens = int(sum(r["tokens"] for r in measured))
    flops = sum(r["flops"] for r in measured) * 4 / 3  # + the rollout: one forward of every sequence
    first_of_round = measured[::a.steps_per_rollout]
    return {**_rates(tokens, sec, flops, len(measured), dev), **mem, "completion_tokens_per_s": completion / sec,
            "completion_tokens": completion, "tokens": tokens,
            "rollout_s": sum(r["rollout_s"] for r in first_of_round), "token_budget": token_budget,
            "weights": "fp32", "autocast": "bf16" if dev.type == "cuda" else None,
            "rollout_cache": "static" if dev.type == "cuda" else "dynamic", "reward": measured[-1]["reward"]}


def run_trl_dpo(a, dev: torch.device) -> dict:
    """TRL's DPOTrainer as the anchors run it: a second (reference) model, its log-probs inside each step."""
    try:
        import datasets
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return {"error": TRL_MISSING}
    from components.training.flops import training_flops

    total = a.warmup + a.steps
    rows = dpo_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.max_len)
    dtype = torch.bfloat16 if _peer_bf16(a, dev) else torch.float32
    rss_reset = _reset_peaks(dev)
    model, ref = build_model(a.size, dtype), build_model(a.size, dtype).eval()
    out = tempfile.TemporaryDirectory(prefix="posttrain-bench-trl-")
    args, checkpointing = _trl_args(DPOConfig, a, dev, out.name, _peer_checkpointing(a), max_steps=total,
                                    per_device_train_batch_size=a.batch_size, max_length=a.max_len,
                                    learning_rate=1e-6)
    clock = _clock(a.warmup, dev)
    with _no_fingerprints():
        tr = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=peer_tokenizer(SIZES[a.size]["vocab_size"]),
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
    res = {**_rates(tokens, sec, flops, a.steps, dev), **mem, "pairs_per_s": a.batch_size * a.steps / sec,
           "tokens": tokens, "weights": "bf16" if dtype == torch.bfloat16 else "fp32", "same_tokens": same,
           "activation_checkpointing": checkpointing, **_trl_versions()}
    del tr, model, ref
    return res


def run_trl_grpo(a, dev: torch.device) -> dict:
    """TRL's GRPOTrainer with HF generate (no vLLM), as the anchors run it, on the same prompts and reward."""
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
    rss_reset = _reset_peaks(dev)
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
    res = {**_rates(sum(seqs), sec, flops, a.grpo_steps, dev), **mem, "completion_tokens_per_s": completion / sec,
           "completion_tokens": completion, "tokens": sum(seqs), "weights": "bf16" if dtype == torch.bfloat16 else "fp32",
           "activation_checkpointing": checkpointing, "rollout_cache": "dynamic", **_trl_versions()}
    del tr, model
    return res


def _train_peer(trainer, out, dev: torch.device, rss_reset: bool) -> dict:
    """Run the TRL trainer, drop its output directory, and return the memory peaks of the measurement."""
    try:
        trainer.train()
    finally:
        out.cleanup()
    return _peaks(dev, rss_reset)


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


# ----------------------------------------------------------------------------------------------------
# CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--objectives", default="sft,psft",
                   help=f"comma-separated, of {', '.join(OBJECTIVES)} (default: sft,psft)")
    p.add_argument("--peers", default="", help="comma-separated peers to run on the same rows: trl")
    p.add_argument("--json", action="store_true", help="print only JSON lines on stdout")
    p.add_argument("--steps", type=int, default=15, help="measured optimizer steps (default: 15)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps before measuring (default: 5)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default: 8)")
    p.add_argument("--min-len", type=int, default=128, help="shortest row, prompt + completion words (default: 128)")
    p.add_argument("--max-len", type=int, default=1024, help="longest row (default: 1024)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per packed micro-batch (default: 16384 on GPU, 4096 on CPU)")
    p.add_argument("--updates-per-batch", type=int, default=8,
                   help="PSFT optimizer steps per π_old snapshot (default: 8)")
    p.add_argument("--peer-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the TRL model's weights: auto = bf16 on GPU, fp32 on CPU, as the anchors (default: auto)")
    p.add_argument("--peer-checkpointing", choices=("default", "on", "off"), default="default",
                   help="TRL's activation checkpointing for DPO and GRPO: default = TRL's (on), as the anchors "
                        "(SFT: always off, as the anchors)")
    g = p.add_argument_group("GRPO (the anchors' GRPO workload)")
    g.add_argument("--grpo-batch-size", type=int, default=32, help="sequences per optimizer step (default: 32)")
    g.add_argument("--group", type=int, default=8, help="completions per prompt (default: 8)")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt words = tokens (default: 128)")
    g.add_argument("--new-tokens", type=int, default=256, help="most new tokens per completion (default: 256)")
    g.add_argument("--grpo-steps", type=int, default=3, help="measured optimizer steps (default: 3)")
    g.add_argument("--grpo-warmup", type=int, default=1, help="warm-up optimizer steps (default: 1)")
    g.add_argument("--steps-per-rollout", type=int, default=1,
                   help="optimizer steps per rollout round, for us and TRL (TRL's steps_per_generation; default: 1)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _table(results: list[dict]) -> str:
    cols = [("what", "{}"), ("size", "{}"), ("bs", "{}"), ("steps", "{}"), ("tokens_per_s", "{:.0f}"),
            ("pairs_per_s", "{:.1f}"), ("completion_tokens_per_s", "{:.0f}"), ("sec_per_step", "{:.3f}"),
            ("mfu", "{:.3f}"), ("peak_mem_gb", "{:.2f}"), ("peak_rss_gb", "{:.2f}"), ("speedup_vs_trl", "{:.2f}x")]
    def cell(r, k, f):
        if "error" in r and k not in ("what", "size", "bs", "steps"):
            return r["error"][:60] if k == "tokens_per_s" else ""
        v = r.get(k)
        return "-" if v is None else f.format(v)
    rows = [[k for k, _ in cols]] + [[cell(r, k, f) for k, f in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `posttrain bench -- --size ...`: what the CLI's REMAINDER passes through
        argv = argv[1:]
    a = _parser().parse_args(argv)
    objectives, peers = _split(a.objectives), _split(a.peers)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        print(f"posttrain bench: unknown objective(s) {', '.join(bad) or '(none given)'}; "
              f"known: {', '.join(OBJECTIVES)}", file=sys.stderr)
        return 2
    bad = [p for p in peers if p not in PEERS]
    if bad:
        print(f"posttrain bench: unknown peer(s) {', '.join(bad)}; known: {', '.join(PEERS)}", file=sys.stderr)
        return 2
    k = a.steps_per_rollout
    if a.steps < 1 or a.warmup < 0 or a.batch_size < 1 or not 1 <= a.min_len <= a.max_len:
        print("posttrain bench: need --steps ≥ 1, --warmup ≥ 0, --batch-size ≥ 1, 1 ≤ --min-len ≤ --max-len",
              file=sys.stderr)
        return 2
    if "grpo" in objectives and (min(a.grpo_batch_size, a.new_tokens, a.prompt_len, a.grpo_steps, k) < 1
                                 or a.group < 2 or a.grpo_batch_size % a.group or a.grpo_warmup % k
                                 or a.grpo_steps % k or a.grpo_warmup < 0):
        print("posttrain bench: GRPO needs --group ≥ 2 dividing --grpo-batch-size, --new-tokens, --prompt-len, "
              "--grpo-steps ≥ 1, and --grpo-steps and --grpo-warmup multiples of --steps-per-rollout", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stdout = sys.stdout  # results only; everything else (our logs, the trainers' prints) goes to stderr
    dev = _device()
    token_budget = a.token_budget or (16384 if dev.type == "cuda" else 4096)
    total = a.warmup + a.steps
    common = {"size": a.size, "device": dev.type, "device_name": _device_name(dev)}
    workload = {
        "sft": {"bs": a.batch_size, "steps": a.steps, "warmup": a.warmup, "min_len": a.min_len, "max_len": a.max_len,
                "seq": "prompt+completion+eos"},
        "dpo": {"bs": a.batch_size, "steps": a.steps, "warmup": a.warmup, "prompt_len": a.max_len // 4,
                "completion_len": a.max_len // 4, "seq": "prompt+chosen|rejected+eos"},
        "grpo": {"bs": a.grpo_batch_size, "steps": a.grpo_steps, "warmup": a.grpo_warmup, "group": a.group,
                 "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "steps_per_rollout": k},
    }
    workload["psft"] = workload["sft"]
    # what each objective is compared on, and with which peer line
    rate = {"sft": ("tokens_per_s", "trl_sft"), "psft": ("tokens_per_s", "trl_sft"),
            "dpo": ("pairs_per_s", "trl_dpo"), "grpo": ("completion_tokens_per_s", "trl_grpo")}
    results: list[dict] = []
    failed = False

    def emit(rec: dict):
        results.append(rec)
        line = json.dumps(rec)
        if a.json:
            print(line, file=stdout, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    def measure(what: str, fn) -> dict:
        log.info("measuring %s (%s)", what, a.size)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return fn()
        except Exception as e:  # keep the other measurements
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"[:400]}

    rows = workload_rows(SIZES[a.size]["vocab_size"], a.batch_size * (total + 2), a.min_len, a.max_len)
    examples = [row_example(r) for r in rows]
    peer_fns = {"sft": lambda: run_trl(a, rows, examples, dev), "dpo": lambda: run_trl_dpo(a, dev),
                "grpo": lambda: run_trl_grpo(a, dev)}
    peer_rates: dict[str, float] = {}
    if "trl" in peers:
        for obj in dict.fromkeys("sft" if o == "psft" else o for o in objectives):
            res = measure(f"trl_{obj}", peer_fns[obj])
            if rate[obj][0] in res:
                peer_rates[f"trl_{obj}"] = res[rate[obj][0]]
            emit({"what": f"trl_{obj}", **common, **workload[obj], **res})
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as work:
        if {"dpo", "grpo"} & set(objectives):
            save_model(a.size, os.path.join(work, "model"))
        ours = {"sft": lambda: run_ours(a, "sft", examples, dev, token_budget),
                "psft": lambda: run_ours(a, "psft", examples, dev, token_budget),
                "dpo": lambda: run_ours_dpo(a, work, dev, token_budget),
                "grpo": lambda: run_ours_grpo(a, work, dev, token_budget)}
        for obj in objectives:
            res = measure(f"posttrain_{obj}", ours[obj])
            failed |= "error" in res
            key, vs = rate[obj]
            if vs in peer_rates and key in res:
                res["speedup_vs_trl"] = res[key] / peer_rates[vs]
                res["vs"] = vs
            emit({"what": f"posttrain_{obj}", **common, **workload[obj], **res})
    if not a.json:
        print(_table(results), file=stdout, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
