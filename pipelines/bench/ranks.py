"""`posttrain bench --nproc N`: grpo and ppo measured with N processes under torchrun, as the stages run on N
ranks (each rank its own colocated rollout engine, sampling its share of a round). The bench starts torchrun on
this module; each rank runs the stage and writes its own numbers (ours.run_rollout_stage), rank 0 also the
line from the stage's metrics; the bench reads them back into one line with a `ranks` list. How each number is
counted: docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RANK_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (/proc's children lists), nearest first."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
            kids = [int(c) for t in tasks for c in open(f"/proc/{parent}/task/{t}/children").read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it: torchrun starts each rank in a session of its own, so killing
    torchrun's process group alone would leave the ranks running (and holding its output pipe)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_ranks(a, objective: str, work: str, token_budget: int, timeout_s: float | None = None) -> dict:
    """`objective` (grpo or ppo) with the engine a.rollout on a.nproc processes: the line, with every rank's
    numbers. The ranks' output (logs, the stages' prints) goes to this process's stderr once they end. Past
    `timeout_s` (a hung collective) torchrun and its ranks are ended and the measurement is an error.

    Each rank gets this process's torch threads divided among the ranks (POSTTRAIN_THREADS), so that together they
    use the cores one process would."""
    import torch

    from pipelines.bench.ours import rollout_job, with_ranks

    rollout_job(a, objective, work, token_budget)  # the prompts, written once for every rank
    job = Path(work) / f"ranks-{objective}-{a.rollout}"
    job.mkdir(parents=True, exist_ok=True)
    (job / "args.json").write_text(json.dumps(vars(a)))
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["POSTTRAIN_THREADS"] = str(max(1, torch.get_num_threads() // a.nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "-m", "pipelines.bench.ranks", objective, work, str(token_budget), str(job)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        sys.stderr.write(output)
        raise RuntimeError(f"{objective} on {a.nproc} processes did not end in {timeout_s:g} s (--ranks-timeout); "
                           f"its ranks were killed (their output is above, on stderr): {output[-300:]}") from None
    sys.stderr.write(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{objective} on {a.nproc} processes exited with status {proc.returncode} "
                           f"(its ranks' output is above, on stderr): {output[-300:]}")
    ranks = [json.loads((job / f"rank-{r}.json").read_text()) for r in range(a.nproc)]
    return with_ranks(json.loads((job / "line.json").read_text()), ranks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.ranks")
    p.add_argument("objective", choices=("grpo", "ppo"))
    p.add_argument("work", help="the bench's work directory (the model, the prompts, the stages' outputs)")
    p.add_argument("token_budget", type=int)
    p.add_argument("job", help="this measurement's directory: args.json in, rank-<r>.json and line.json out")
    o = p.parse_args(argv)
    from pipelines.bench.measure import pick_device
    from pipelines.bench.ours import rollout_job, rollout_line, run_rollout_stage

    job = Path(o.job)
    a = argparse.Namespace(**json.loads((job / "args.json").read_text()))
    dev = pick_device()
    if dev.type == "cuda":  # this rank's GPU, before the peaks are reset: each rank measures its own
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    out, cfg = rollout_job(a, o.objective, o.work, o.token_budget, write=False)
    rank = run_rollout_stage(a, o.objective, cfg, dev)
    (job / f"rank-{rank['rank']}.json").write_text(json.dumps(rank))
    if rank["rank"] == 0:  # the metrics are rank 0's, complete once its stage returned
        line = {**rollout_line(a, o.objective, out, dev, o.token_budget), "threads": rank["threads"]}
        (job / "line.json").write_text(json.dumps(line))


if __name__ == "__main__":
    main()
