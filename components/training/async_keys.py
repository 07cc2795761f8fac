"""The config keys of asynchronous RL (grpo: `max_staleness`, `rollout_worker`, `rollout_worker_cpus`,
`rollout_worker_restarts`, `rollout_worker_timeout_s`) and their checks, light: checking a spec imports no torch.
What they do: components/training/rollout_worker.py."""

from __future__ import annotations

import re

from components.config import require

CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
"""taskset's CPU list: 0-3 or 0,2,4-5."""


def check_async(cfg) -> None:
    """The stage config `cfg`'s asynchronous keys, against its rollout engine, adapters and tis_cap."""
    k = cfg.max_staleness
    require(isinstance(k, int) and not isinstance(k, bool) and k >= 0, "max_staleness", k,
            "an integer ≥ 0 (0: every round samples with the weights it trains on)")
    require(isinstance(cfg.rollout_worker, bool), "rollout_worker", cfg.rollout_worker, "true or false")
    require(k == 0 or cfg.rollout_worker, "max_staleness", k,
            "0 without rollout_worker: true (the colocated engine samples between the trainer's steps, on-policy)")
    require(not cfg.rollout_worker or cfg.rollout.engine == "vllm", "rollout_worker", cfg.rollout_worker,
            "false with rollout.engine hf (the worker is a vLLM engine in a process of its own: engine vllm)")
    require(not (cfg.rollout_worker and cfg.lora.enabled), "rollout_worker", cfg.rollout_worker,
            "false with lora (the worker takes whole weights; LoRA policies sample with the colocated engine)")
    require(k == 0 or cfg.tis_cap is not None, "tis_cap", cfg.tis_cap,
            f"a number ≥ 1 with max_staleness {k}: samples drawn with older weights are corrected by truncated "
            "importance sampling against the engine's log-probs")
    cpus = cfg.rollout_worker_cpus
    require(cpus is None or (isinstance(cpus, str) and CPU_LIST.match(cpus) is not None), "rollout_worker_cpus",
            cpus, "null or a CPU list as taskset takes it (0-3, 0,2)")
    require(cpus is None or cfg.rollout_worker, "rollout_worker_cpus", cpus, "null without rollout_worker: true")
    restarts = cfg.rollout_worker_restarts
    require(isinstance(restarts, int) and not isinstance(restarts, bool) and restarts >= 0, "rollout_worker_restarts",
            restarts, "an integer ≥ 0 (0: a broken worker stops the stage)")
    timeout = cfg.rollout_worker_timeout_s
    require(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
            "rollout_worker_timeout_s", timeout, "seconds > 0 (the longest the trainer waits for the worker's round)")
