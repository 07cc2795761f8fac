"""CPU threads of a training process: how many intra-op threads torch uses, and how OpenMP's idle threads wait.

Why: torch's intra-op threads meet at an OpenMP barrier after every op. By default a thread that reaches it first
spins; when another process holds the core the last thread needs, the spinning one burns the time that thread
waits for, and a small model meets the barrier thousands of times a step (docs/bench.md, "Threads"). So:

- `early_env` (run by `import components`, which every stage process, pipeline step, torchrun rank and TrainJob pod
  does before it imports torch) sets GOMP_SPINCOUNT=10000: a thread at the barrier spins briefly, then sleeps.
  OpenMP reads it once, when torch loads it; child processes inherit it. This is what keeps a step from exploding
  when the load changes while it trains, at no cost on idle cores (docs/bench.md, "Threads": PASSIVE, never
  spinning, costs 45% there).
- `ThreadPolicy` (the training Session builds one for its model, once, at start) sets torch's intra-op threads to
  `choose_threads` of the model size, the cores this process may use (its affinity, or fewer under a cgroup CPU
  quota) and the load other processes put on them then. The count is not changed afterwards: a different thread
  count can change float results (reductions split differently), and a resumed run must
  compute what the interrupted one would have.

Sampling-only stages (reward_scoring, evaluate) sampling with the hf engine build no Session: `for_sampling` gives
them the same policy, chosen for the first model they load and kept for the others. (vLLM sets its own threads.)

A bit-exact resume on the CPU needs the same thread count as the interrupted run: POSTTRAIN_THREADS (or
OMP_NUM_THREADS) pins it. A user's count is kept as given, and so is a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger("components.threads")

PARAMS_PER_THREAD = 250_000
"""The fewest parameters per intra-op thread: with fewer, an op's slice of the work is not much longer than the
barrier that ends it. A rough bound, not tuned."""
BUSY_FRACTION = 0.3
"""Slack on the others' load, in cores: a core is taken from the free ones for each full core (rounded up) by which
other processes' load over this process's cores exceeds BUSY_FRACTION; so a load of up to 0.3 of a core leaves all
cores free, more than 0.3 and up to 1.3 takes one, and so on."""
CPU_MAX = "/sys/fs/cgroup/cpu.max"
"""cgroup v2's CPU quota of this process's cgroup: "quota period" (microseconds), or "max period" when unlimited."""


SPINCOUNT = "10000"
"""Spins of an OpenMP thread at a barrier before it sleeps (libgomp's default is 300000, ~a scheduler slice): as fast
as spinning on idle cores, 3-6x less lost than spinning when another process holds a core (docs/bench.md)."""


def early_env(environ=None) -> None:
    """Before torch (and OpenMP with it) is loaded: idle OpenMP threads spin briefly, then sleep, unless the user
    chose how they wait."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)


def user_threads(environ=None) -> int | None:
    """The thread count the user set (POSTTRAIN_THREADS, else OMP_NUM_THREADS), or None."""
    environ = os.environ if environ is None else environ
    for key in ("POSTTRAIN_THREADS", "OMP_NUM_THREADS"):
        value = environ.get(key, "").strip()
        if value:
            try:
                return max(1, int(value.split(",")[0]))
            except ValueError:
                raise ValueError(f"{key}={value!r}: not a thread count") from None
    return None


def choose_threads(params: int, cpus: int, others_busy: float | None, user: int | None = None,
                   local_world_size: int = 1) -> int:
    """torch's intra-op threads for a model of `params` parameters on `cpus` cores of which other processes keep
    `others_busy` busy (in cores; None: not counted): the free cores, at most one thread per PARAMS_PER_THREAD
    parameters, at least 1. With `local_world_size` ranks on this machine each takes its share of the cores, and
    the load is not counted (the sibling ranks, loading too, would count as others). A user's count wins."""
    if user is not None:
        return user
    by_size = max(1, params // PARAMS_PER_THREAD)
    if local_world_size > 1:
        return max(1, min(by_size, cpus // local_world_size))
    free = cpus if others_busy is None else cpus - math.ceil(max(0.0, others_busy - BUSY_FRACTION))
    return max(1, min(cpus, free, by_size))


def affinity() -> set[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def quota_cpus(path: str = CPU_MAX) -> int | None:
    """The cores a cgroup v2 CPU quota gives this process, rounded up; None without a quota."""
    try:
        quota, period = open(path).read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def busy_seconds(cores: set[int], stat: str = "/proc/stat") -> float | None:
    """CPU seconds `cores` spent busy since boot (their /proc/stat `cpuN` lines: all but idle and iowait); None
    without /proc."""
    total = 0.0
    try:
        with open(stat) as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores):
                    continue
                ticks = [float(x) for x in fields[:8]]
                total += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def others_busy(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores other processes kept busy between two (wall, own CPU, this process's cores' busy) seconds samples."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[2] - before[2]) - (after[1] - before[1])) / wall)


def sample(cores: set[int]) -> tuple[float, float, float] | None:
    """(wall, this process's CPU, `cores`' busy) seconds now; None without /proc."""
    busy = busy_seconds(cores)
    return None if busy is None else (time.monotonic(), time.process_time(), busy)


def measure_others(cores: set[int], window_s: float = 0.1) -> float | None:
    """Cores other processes keep busy among `cores`, over `window_s`; None without /proc."""
    before = sample(cores)
    if before is None:
        return None
    time.sleep(window_s)
    after = sample(cores)
    return None if after is None else others_busy(before, after)


class ThreadPolicy:
    """Sets torch's intra-op threads once, when a model starts training on the CPU (`choose_threads`); `threads` is
    the count that took (torch.get_num_threads() read back: a process may have replaced set_num_threads, as vLLM
    does, with one that does nothing). On another device the threads are left as they are."""

    def __init__(self, params: int, device_type: str = "cpu", environ=None):
        import torch

        environ = os.environ if environ is None else environ
        self.torch, self.params = torch, params
        self.threads = torch.get_num_threads()
        if device_type != "cpu":
            return
        user = user_threads(environ)
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        cores = affinity()
        cpus, quota = len(cores), quota_cpus()
        if user is not None:
            self._set(user, "set by the user")
        elif local_world_size > 1:
            self._set(choose_threads(params, cpus, None, local_world_size=local_world_size),
                      f"{local_world_size} ranks share {cpus} core(s)")
        elif quota is not None and quota < cpus:
            self._set(choose_threads(params, quota, None), f"a CPU quota of {quota} core(s)")
        else:
            others = measure_others(cores)
            load = "load not measured" if others is None else f"other processes kept {others:.1f} busy"
            self._set(choose_threads(params, cpus, others), f"{cpus} core(s), {load}")

    def _set(self, threads: int, reason: str) -> None:
        self.torch.set_num_threads(threads)
        self.threads = self.torch.get_num_threads()
        took = "" if self.threads == threads else f", {threads} asked: set_num_threads did not take"
        waits = os.environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}"
        log.info("torch threads %d (%s; %.2fM parameters%s; idle threads: %s)", self.threads, reason,
                 self.params / 1e6, took, waits)


_sampling: ThreadPolicy | None = None


def for_sampling(model, device_type: str = "cpu") -> ThreadPolicy:
    """The policy of a process that only samples: chosen once, for the first model it samples with (a later model
    keeps the count, as a Session does)."""
    global _sampling
    if _sampling is None:
        _sampling = ThreadPolicy(sum(p.numel() for p in model.parameters()), device_type)
    return _sampling
