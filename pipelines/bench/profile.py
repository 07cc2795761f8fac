"""`python -m pipelines.bench.profile`: where one optimizer step of each objective spends its CPU time.

Each objective runs as `posttrain bench` runs it (the same workloads and stage configs, a few steps), under
torch.profiler; one step after the warm-up is split into the engine's phases, each timed by a
`record_function` range put around the function that does it:

  batching   Session.micro_batches (packing, collating, moving to the device)
  rollout    the sampler's generate (grpo, ppo)
  forward    the model's forward, less the head below
  logprobs   the language-model head, log-softmax, gather and entropy (token_logprobs)
  backward   the engine's backward
  optimizer  the engine's step: gradient clipping, AdamW, the schedule
  other      the rest of the step: the loss's arithmetic, metrics, the loop's Python

and for each, the self CPU time of its aten ops: what is left (phase − ops) is Python and dispatch overhead.
Prints a Markdown table (docs/bench.md, "Profile").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile

PHASES = ("batching", "rollout", "forward", "logprobs", "backward", "optimizer")


def _wrap(owner, name: str, label: str, patches: list) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        import torch

        with torch.profiler.record_function(f"phase:{label}"):
            return original(*args, **kwargs)

    patches.append((owner, name, original))
    setattr(owner, name, wrapped)


@contextlib.contextmanager
def phases():
    """The engine's phases as record_function ranges, for as long as the context lasts."""
    from components.training import distributed, engines, loop

    patches: list = []
    _wrap(loop.Session, "micro_batches", "batching", patches)
    _wrap(loop, "forward_logprobs", "forward", patches)
    _wrap(loop, "token_logprobs", "logprobs", patches)
    for engine in (distributed.PlainEngine, distributed.DeepSpeedEngine):
        _wrap(engine, "backward", "backward", patches)
        _wrap(engine, "step", "optimizer", patches)
    _wrap(engines.HFEngine, "generate", "rollout", patches)
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def split_step(events, step_name: str) -> dict[str, tuple[float, float]]:
    """{phase: (CPU ms of the phase, self CPU ms of the aten ops in it)} for the profiler step `step_name`, with
    "other" (the step less its phases) and "step"; a nested phase (logprobs in forward) is taken out of its
    parent."""
    step = next(e for e in events if e.name == step_name)
    lo, hi = step.time_range.start, step.time_range.end
    ranges = sorted(((e.time_range.start, e.time_range.end, e.name[len("phase:"):]) for e in events
                     if e.name.startswith("phase:") and lo <= e.time_range.start < hi), key=lambda r: r[0])

    def innermost(t: float) -> str:
        best = "other"
        for start, end, name in ranges:  # sorted by start: a later range that contains t is nested deeper
            if start <= t < end:
                best = name
        return best

    wall = {name: 0.0 for name in (*PHASES, "other")}
    ops = dict(wall)
    for start, end, name in ranges:
        wall[name] += end - start
        enclosing = [r for r in ranges if r[0] < start and end <= r[1]]
        if enclosing:
            wall[enclosing[-1][2]] -= end - start
    wall["other"] = (hi - lo) - sum(wall[n] for n in PHASES)
    for e in events:
        if e.name.startswith("aten::") and lo <= e.time_range.start < hi:
            ops[innermost(e.time_range.start)] += e.self_cpu_time_total
    table = {name: (wall[name] / 1e3, ops[name] / 1e3) for name in wall}
    table["step"] = ((hi - lo) / 1e3, sum(ops.values()) / 1e3)
    by_op: dict[str, float] = {}
    for e in events:
        if e.name.startswith("aten::") and lo <= e.time_range.start < hi:
            by_op[e.name] = by_op.get(e.name, 0.0) + e.self_cpu_time_total / 1e3
    table["top"] = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    return table


def profile_objective(objective: str, argv: list[str], profiled_step: int) -> dict[str, tuple[float, float]]:
    """Run `objective` through the bench's own runner with `argv` (bench flags), profiling optimizer step
    `profiled_step` (0-based, counted from the start of the run)."""
    import torch

    from components.training import loop
    from pipelines.bench import cli

    found: dict = {}
    schedule = torch.profiler.schedule(wait=profiled_step, warmup=0, active=1, repeat=1)
    record = loop.Session.record
    state = {"step": 0}

    def on_trace(prof):
        name = "ProfilerStep*"  # the one active step
        found.update(split_step(prof.events(), name))

    with phases(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule,
                                          on_trace_ready=on_trace) as prof:
        def stepped(self, *args, **kwargs):
            out = record(self, *args, **kwargs)
            state["step"] += 1
            prof.step()
            return out

        loop.Session.record = stepped
        try:
            with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(sys.stderr):
                cli.main([*argv, "--objectives", objective, "--out", f"{work}/lines.jsonl"])
        finally:
            loop.Session.record = record
    if not found:
        raise RuntimeError(f"{objective}: step {profiled_step} was not profiled ({state['step']} steps ran)")
    return found


def markdown(tables: dict[str, dict[str, tuple[float, float]]], threads: int) -> str:
    cols = [*PHASES, "other"]
    lines = [f"| objective | step ms | {' | '.join(cols)} |", "|---" * (len(cols) + 2) + "|"]
    for objective, t in tables.items():
        step = t["step"][0]
        cells = [f"{t[c][0]:.1f} ({t[c][1]:.1f})" if t[c][0] > 0.05 else "-" for c in cols]
        lines.append(f"| {objective} | {step:.1f} | {' | '.join(cells)} |")
    share = {c: sum(t[c][0] for t in tables.values()) / sum(t["step"][0] for t in tables.values()) for c in cols}
    ops = sum(t["step"][1] for t in tables.values()) / sum(t["step"][0] for t in tables.values())
    lines.append(f"| share of all steps | | {' | '.join(f'{100 * share[c]:.0f}%' for c in cols)} |")
    for objective, t in tables.items():
        lines.append(f"\n{objective}'s costliest aten ops (self CPU ms): " + ", ".join(f"{n[6:]} {ms:.1f}"
                                                                                    for n, ms in t["top"]))
    lines.append(f"\nms of one step: phase (self CPU ms of its aten ops); aten ops are {100 * ops:.0f}% of the "
                 f"steps' time, the rest Python and dispatch. torch threads: {threads}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--objectives", default="sft,psft,dpo,grpo,ppo")
    p.add_argument("--size", default="demo", help="the bench size (default: demo)")
    p.add_argument("--step", type=int, default=3, help="the step profiled, 0-based (default: 3)")
    p.add_argument("bench_args", nargs="*", help="more `posttrain bench` flags, after --")
    a = p.parse_args(argv)
    from pipelines.bench import cli
    from pipelines.bench.measure import pick_device
    from pipelines.bench.ours import PPO_EPOCHS

    tables = {}
    with cli.fixed_threads(a.size, pick_device()) as threads:  # one count for every objective's table
        for objective in [o.strip() for o in a.objectives.split(",") if o.strip()]:
            # ppo: the second round's first step, which holds its rollout; dpo: the demo's 32 pairs a step
            rounds = 1 if objective == "ppo" else a.step
            args = ["--size", a.size, "--warmup", str(a.step), "--steps", "1", "--grpo-warmup", str(rounds),
                    "--grpo-steps", "1", *(["--batch-size", "32"] if objective == "dpo" and a.size == "demo" else []),
                    *a.bench_args]
            tables[objective] = profile_objective(objective, args, PPO_EPOCHS if objective == "ppo" else a.step)
    print(markdown(tables, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
