"""`posttrain bench`: throughput, MFU and peak memory of our objectives, optionally against TRL on the same data.

The command line: the arguments and their checks, the measurements in order (the TRL peer's first, then ours),
one JSON line per measurement on stdout and in --out, or a table. The flags, the workloads and how each number
is counted: docs/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import traceback

from pipelines.bench.measure import device_name, pick_device
from pipelines.bench.ours import (
    PPO_EPOCHS,
    run_ours,
    run_ours_async,
    run_ours_dpo,
    run_ours_grpo,
    run_ours_ppo,
    run_ours_rm,
)
from pipelines.bench.ranks import run_ranks
from pipelines.bench.trl_peer import run_trl, run_trl_dpo, run_trl_grpo, run_trl_rm, trl_ppo_missing
from pipelines.bench.workloads import (
    DEMO_FLAGS,
    SIZES,
    demo_examples,
    row_example,
    save_model,
    size_params,
    workload_rows,
)

log = logging.getLogger("posttrain.bench")

OBJECTIVES = ("sft", "psft", "dpo", "grpo", "rm", "ppo")
PEERS = ("trl",)
ROLLOUTS = ("hf", "vllm")
ROLLOUT_OBJECTIVES = ("grpo", "ppo")  # one line per rollout engine
# what each objective is compared on, and with which peer line
RATE = {"sft": ("tokens_per_s", "trl_sft"), "psft": ("tokens_per_s", "trl_sft"),
        "dpo": ("pairs_per_s", "trl_dpo"), "grpo": ("completion_tokens_per_s", "trl_grpo"),
        "rm": ("pairs_per_s", "trl_rm"), "ppo": ("completion_tokens_per_s", "trl_ppo")}


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
                   help="the TRL model's weights: auto = bf16 on GPU, fp32 on CPU, as the reference measurements "
                        "(default: auto)")
    p.add_argument("--peer-checkpointing", choices=("default", "on", "off"), default="default",
                   help="TRL's activation checkpointing for DPO, GRPO and RM: default = TRL's (on), as the reference "
                        "measurements (SFT: always off, as the reference measurements)")
    g = p.add_argument_group("GRPO (the reference GRPO workload) and PPO (its prompts, one completion each; rounds "
                             "for steps)")
    g.add_argument("--grpo-batch-size", type=int, default=32,
                   help="sequences per optimizer step (PPO: prompts per round; default: 32)")
    g.add_argument("--group", type=int, default=8, help="completions per prompt (default: 8)")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt words = tokens (default: 128)")
    g.add_argument("--new-tokens", type=int, default=256, help="most new tokens per completion (default: 256)")
    g.add_argument("--grpo-steps", type=int, default=3, help="measured optimizer steps (PPO: rounds; default: 3)")
    g.add_argument("--grpo-warmup", type=int, default=1, help="warm-up optimizer steps (PPO: rounds; default: 1)")
    g.add_argument("--rollout", default="hf",
                   help="our rollout engine(s), comma-separated of hf, vllm: one grpo and one ppo line per engine "
                        "(the stages' rollout.engine; default: hf)")
    g.add_argument("--async", dest="asynchronous", type=int, default=None, metavar="K",
                   help="also grpo and ppo with a rollout worker sampling ahead (max_staleness K), each beside its "
                        "vllm line: the trainer on the first half of this process's cores, the worker on the rest "
                        "(taskset)")
    g.add_argument("--nproc", type=int, default=1,
                   help="processes (ranks) our grpo and ppo run on, under torchrun, each with its own engine; the "
                        "line's `ranks` holds each rank's numbers (default: 1)")
    g.add_argument("--ranks-timeout", type=float, default=1800.0,
                   help="seconds a --nproc > 1 measurement may take before its ranks are ended and it is reported as "
                        "an error (a hung collective; default: 1800)")
    g.add_argument("--steps-per-rollout", type=int, default=1,
                   help="optimizer steps per rollout round, for us and TRL (TRL's steps_per_generation; default: 1)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _bad_arguments(a, objectives: list[str], peers: list[str]) -> str | None:
    """What is wrong with the arguments (exit status 2), or None."""
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        return f"unknown objective(s) {', '.join(bad) or '(none given)'}; known: {', '.join(OBJECTIVES)}"
    bad = [p for p in peers if p not in PEERS]
    if bad:
        return f"unknown peer(s) {', '.join(bad)}; known: {', '.join(PEERS)}"
    if peers and a.size == "demo":
        return "--size demo has no peer: its SFT rows are the demo's arithmetic problems, not the peer's words"
    bad = [e for e in _split(a.rollout) if e not in ROLLOUTS]
    if bad or not _split(a.rollout):
        return f"unknown rollout engine(s) {', '.join(bad) or '(none given)'}; known: {', '.join(ROLLOUTS)}"
    if a.nproc < 1 or (a.nproc > 1 and set(objectives) - {"grpo", "ppo"}):
        return "need --nproc ≥ 1; --nproc > 1 measures grpo and ppo only (the stages that run on ranks here)"
    k = a.steps_per_rollout
    if a.steps < 1 or a.warmup < 0 or a.batch_size < 1 or not 1 <= a.min_len <= a.max_len:
        return "need --steps ≥ 1, --warmup ≥ 0, --batch-size ≥ 1, 1 ≤ --min-len ≤ --max-len"
    if "grpo" in objectives and (min(a.grpo_batch_size, a.new_tokens, a.prompt_len, a.grpo_steps, k) < 1
                                 or a.group < 2 or a.grpo_batch_size % a.group or a.grpo_warmup % k
                                 or a.grpo_steps % k or a.grpo_warmup < 0):
        return ("GRPO needs --group ≥ 2 dividing --grpo-batch-size, --new-tokens, --prompt-len, "
                "--grpo-steps ≥ 1, and --grpo-steps and --grpo-warmup multiples of --steps-per-rollout")
    if a.asynchronous is not None and (a.asynchronous < 0 or not set(ROLLOUT_OBJECTIVES) & set(objectives)
                                       or a.nproc > 1 or len(os.sched_getaffinity(0)) < 2):
        return "--async K needs K ≥ 0, grpo or ppo among --objectives, --nproc 1 and two cores (trainer and worker)"
    if "ppo" in objectives and (min(a.grpo_batch_size, a.new_tokens, a.prompt_len, a.grpo_steps) < 1
                                or a.grpo_warmup < 0):
        return "PPO needs --grpo-batch-size, --new-tokens, --prompt-len, --grpo-steps ≥ 1 and --grpo-warmup ≥ 0"
    return None


def _workloads(a) -> dict[str, dict]:
    """The workload fields of each objective's lines (the peer's line of an objective has the same)."""
    workload = {
        "sft": {"bs": a.batch_size, "steps": a.steps, "warmup": a.warmup, "min_len": a.min_len, "max_len": a.max_len,
                "seq": "prompt+completion+eos"},
        "dpo": {"bs": a.batch_size, "steps": a.steps, "warmup": a.warmup, "prompt_len": a.max_len // 4,
                "completion_len": a.max_len // 4, "seq": "prompt+chosen|rejected+eos"},
        "grpo": {"bs": a.grpo_batch_size, "steps": a.grpo_steps, "warmup": a.grpo_warmup, "group": a.group,
                 "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "steps_per_rollout": a.steps_per_rollout},
    }
    workload["psft"] = workload["sft"]
    workload["rm"] = workload["dpo"]
    workload["ppo"] = {"bs": a.grpo_batch_size, "steps": a.grpo_steps * PPO_EPOCHS,
                       "warmup": a.grpo_warmup * PPO_EPOCHS, "rounds": a.grpo_steps, "warmup_rounds": a.grpo_warmup,
                       "ppo_epochs": PPO_EPOCHS, "prompt_len": a.prompt_len,
                       "new_tokens": a.new_tokens}
    return workload


def _measure(what: str, size: str, fn) -> dict:
    """fn()'s result, its prints sent to stderr, with the torch threads it ran with (`threads`, unless the result
    has its own: a --nproc line's are rank 0's); a failure becomes an "error" field, so the other measurements
    still run."""
    import torch

    log.info("measuring %s (%s)", what, size)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            res = fn()
    except Exception as e:  # keep the other measurements
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"[:400]}
    return {"threads": torch.get_num_threads(), **res}


@contextlib.contextmanager
def fixed_threads(size: str, dev):
    """The torch threads for the whole bench, chosen once (components.threads.ThreadPolicy, for the size's model)
    and pinned in POSTTRAIN_THREADS, so that the peer and our Sessions run with the same count; restored after."""
    import torch

    from components.threads import ThreadPolicy

    before, env = torch.get_num_threads(), os.environ.get("POSTTRAIN_THREADS")
    threads = ThreadPolicy(size_params(size), dev.type).threads
    os.environ["POSTTRAIN_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("POSTTRAIN_THREADS", None)
        else:
            os.environ["POSTTRAIN_THREADS"] = env


def _run(a, objectives: list[str], peers: list[str], emit) -> bool:
    """The peer's measurements, then ours, each emitted as it ends; True if one of ours failed."""
    dev = pick_device()
    token_budget = a.token_budget or (16384 if dev.type == "cuda" else 4096)
    common = {"size": a.size, "device": dev.type, "device_name": device_name(dev)}
    workload = _workloads(a)
    rows = workload_rows(SIZES[a.size]["vocab_size"], a.batch_size * (a.warmup + a.steps + 2), a.min_len, a.max_len)
    examples = demo_examples(len(rows)) if a.size == "demo" else [row_example(r) for r in rows]
    peer_fns = {"sft": lambda: run_trl(a, rows, examples, dev), "dpo": lambda: run_trl_dpo(a, dev),
                "grpo": lambda: run_trl_grpo(a, dev), "rm": lambda: run_trl_rm(a, dev)}
    peer_rates: dict[str, float] = {}
    if "trl" in peers:
        for obj in dict.fromkeys("sft" if o == "psft" else o for o in objectives):
            if obj == "ppo":  # no peer to run (docs/bench.md): our line says why
                continue
            res = _measure(f"trl_{obj}", a.size, peer_fns[obj])
            if RATE[obj][0] in res:
                peer_rates[f"trl_{obj}"] = res[RATE[obj][0]]
            emit({"what": f"trl_{obj}", **common, **workload[obj], **({"rollout": "hf"} if obj == "grpo" else {}),
                  **res})
    failed = False
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as work:
        if {"dpo", "grpo", "rm", "ppo"} & set(objectives):
            with contextlib.redirect_stdout(sys.stderr):  # saving may import DeepSpeed, whose logger prints
                save_model(a.size, os.path.join(work, "model"))
        ours = {"sft": lambda a: run_ours(a, "sft", examples, dev, token_budget),
                "psft": lambda a: run_ours(a, "psft", examples, dev, token_budget),
                "dpo": lambda a: run_ours_dpo(a, work, dev, token_budget),
                "grpo": lambda a: run_ours_grpo(a, work, dev, token_budget),
                "rm": lambda a: run_ours_rm(a, work, dev, token_budget),
                "ppo": lambda a: run_ours_ppo(a, work, dev, token_budget)}
        if a.nproc > 1:
            ours["grpo"] = lambda a: run_ranks(a, "grpo", work, token_budget, a.ranks_timeout)
            ours["ppo"] = lambda a: run_ranks(a, "ppo", work, token_budget, a.ranks_timeout)
        def variants(obj: str) -> list[argparse.Namespace]:
            """One run per rollout engine; with --async, grpo's and ppo's are the synchronous vllm line and the
            asynchronous one, beside each other."""
            if obj in ROLLOUT_OBJECTIVES and a.asynchronous is not None:
                return [argparse.Namespace(**{**vars(a), "rollout": "vllm", "asynchronous": k})
                        for k in (None, a.asynchronous)]
            engines = _split(a.rollout) if obj in ROLLOUT_OBJECTIVES else [None]
            return [argparse.Namespace(**{**vars(a), "rollout": engine, "asynchronous": None}) for engine in engines]

        runs = [(obj, args) for obj in objectives for args in variants(obj)]
        if a.asynchronous is not None:
            ours["grpo"] = lambda a: run_ours_async(a, "grpo", work, dev, token_budget) \
                if a.asynchronous is not None else run_ours_grpo(a, work, dev, token_budget)
            ours["ppo"] = lambda a: run_ours_async(a, "ppo", work, dev, token_budget) \
                if a.asynchronous is not None else run_ours_ppo(a, work, dev, token_budget)
        for obj, args in runs:
            res = _measure(f"posttrain_{obj}", a.size, lambda: ours[obj](args))
            extra = {"rollout": args.rollout} if obj in ROLLOUT_OBJECTIVES else {}
            if args.asynchronous is not None:
                extra["async"] = args.asynchronous
            failed |= "error" in res
            key, vs = RATE[obj]
            if vs in peer_rates and key in res:
                res["speedup_vs_trl"] = res[key] / peer_rates[vs]
                res["vs"] = vs
            if obj == "ppo" and "trl" in peers:
                res["peer"] = trl_ppo_missing()
            emit({"what": f"posttrain_{obj}", **common, **workload[obj], **extra, **res})
    return failed


def _table(results: list[dict]) -> str:
    cols = [("what", "{}"), ("size", "{}"), ("bs", "{}"), ("steps", "{}"), ("rollout", "{}"), ("async", "{}"),
            ("nproc", "{}"), ("reward", "{:.3f}"),
            ("tokens_per_s", "{:.0f}"), ("pairs_per_s", "{:.1f}"), ("completion_tokens_per_s", "{:.0f}"),
            ("sec_per_step", "{:.3f}"), ("sync_s", "{:.3f}"),
            ("mfu", "{:.3f}"), ("peak_mem_gb", "{:.2f}"), ("peak_rss_gb", "{:.2f}"), ("speedup_vs_trl", "{:.2f}x")]
    def cell(r, k, f):
        if "error" in r and k not in ("what", "size", "bs", "steps"):
            return r["error"][:60] if k == "tokens_per_s" else ""
        v = r.get(k)
        return "-" if v is None else f.format(v)
    rows = [[k for k, _ in cols]] + [[cell(r, k, f) for k, f in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def with_size_defaults(argv: list[str]) -> list[str]:
    """`argv` with --size demo's defaults (DEMO_FLAGS: the demo's PSFT step) put before it, those it does not set."""
    if "--size=demo" not in argv and not any(x == "--size" and y == "demo" for x, y in zip(argv, argv[1:])):
        return argv
    given = {arg.split("=")[0] for arg in argv}
    return [*(x for flag, value in DEMO_FLAGS.items() if flag not in given for x in (flag, value)), *argv]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `posttrain bench -- --size ...`: what the CLI's REMAINDER passes through
        argv = argv[1:]
    a = _parser().parse_args(with_size_defaults(argv))
    objectives, peers = _split(a.objectives), _split(a.peers)
    problem = _bad_arguments(a, objectives, peers)
    if problem:
        print(f"posttrain bench: {problem}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stdout = sys.stdout  # results only; everything else (our logs, the trainers' prints) goes to stderr
    results: list[dict] = []

    def emit(rec: dict):
        results.append(rec)
        line = json.dumps(rec)
        if a.json:
            print(line, file=stdout, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    with fixed_threads(a.size, pick_device()):
        failed = _run(a, objectives, peers, emit)
    if not a.json:
        print(_table(results), file=stdout, flush=True)
    return 1 if failed else 0
