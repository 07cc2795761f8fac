"""The config keys grpo and ppo share for asynchronous RL and the off-policy correction (`AsyncKeys`: tis_cap,
tis_level, tis_mode, rollout_worker, max_staleness, rollout_worker_cpus, rollout_worker_restarts,
rollout_worker_timeout_s) and their checks, light: checking a spec imports no torch. What they do:
components/training/rollout_worker.py (the worker), objectives.importance_weights (the correction)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from components.config import require

CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
"""taskset's CPU list: 0-3 or 0,2,4-5."""
TIS_LEVELS = ("token", "sequence")
"""tis_level: a weight per token, or one per sequence (the product of its tokens' ratios) on each of its tokens."""
TIS_MODES = ("truncate", "mask")
"""tis_mode: a weight above tis_cap is cut to it, or a weight outside [1/tis_cap, tis_cap] is set to 0."""


@dataclass(kw_only=True)
class AsyncKeys:
    """The keys of a stage that samples with a rollout engine and trains on the samples: where the samples come
    from (the colocated engine, or a rollout worker up to max_staleness versions behind) and how the loss corrects
    for the engine's policy not being the trainer's (tis_*). grpo's and ppo's configs inherit them."""

    tis_cap: float | None = None
    """Importance sampling against the rollout engine (as verl's rollout correction and TRL's
    vllm_importance_sampling): the trainer recomputes π_old's log-probs of every sample before the round's steps
    (one more forward pass; ppo with engine vllm recomputes them anyway), the clipped ratio uses them, and each
    token's policy-gradient term is weighted by ρ = π_old / π_rollout capped at tis_cap as tis_level and tis_mode
    say: not the KL term, nor ppo's critic (docs/rl.md). Needed with max_staleness > 0. null: off (π_old is the
    rollout's log-probs, or ppo's recomputed ones unweighted)."""
    tis_level: str = "token"
    """token (ρ_t of each token) or sequence (the product of a sequence's ρ_t, on each of its tokens)."""
    tis_mode: str = "truncate"
    """truncate (min(ρ, tis_cap): TIS) or mask (ρ, and 0 where ρ > tis_cap or ρ < 1/tis_cap: masked importance
    sampling, verl's rejection bounds)."""
    rollout_worker: bool = False
    """Asynchronous RL (docs/rl.md): one vLLM engine in a process of its own (rollout.engine vllm, one trainer
    process) samples each round and sends back its samples with their per-token log-probs and the weights version
    they were drawn with; the trainer pushes each new version to it over a gloo process group. With max_staleness 0
    the numbers are the colocated engine's."""
    max_staleness: int = 0
    """k: the worker samples round r + k with the weights of version r (after r rounds) while the trainer trains
    rounds r .. r + k − 1; no round is trained more than k versions after its weights (an older one is dropped and
    sampled again). 0: on-policy, as without the worker. k > 0 needs rollout_worker and tis_cap."""
    rollout_worker_cpus: str | None = None
    """The CPUs the worker runs on (`taskset -c`, e.g. 2-3; vLLM's CPU threads bound to them); null: the trainer's."""
    rollout_worker_restarts: int = 2
    """How many times in a run a rollout worker that exits, fails or misses a deadline is replaced by a fresh one,
    given the trainer's current weights and every round requested but not yet trained (sampled again with them);
    past that the step raises EngineSyncError (a rerun resumes from the last checkpoint)."""
    rollout_worker_timeout_s: float = 3600.0
    """Most seconds the trainer waits for the rollout worker at once (a round it samples, a version it has yet to
    reach behind the rounds before it): a worker that stays silent longer is killed and the step raises
    EngineSyncError naming its pid and the round or version it was on. The transfer itself: rollout.sync_timeout_s."""


def check_async(cfg) -> None:
    """The stage config `cfg`'s AsyncKeys, against its rollout engine and adapters."""
    cap = cfg.tis_cap
    require(cap is None or (isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap)
                            and cap >= 1), "tis_cap", cap, "null (off) or a number ≥ 1 (verl and TRL use 2)")
    require(cfg.tis_level in TIS_LEVELS, "tis_level", cfg.tis_level, f"one of {', '.join(TIS_LEVELS)}")
    require(cfg.tis_mode in TIS_MODES, "tis_mode", cfg.tis_mode, f"one of {', '.join(TIS_MODES)}")
    require(cfg.tis_mode != "mask" or cap is None or cap > 1, "tis_cap", cap,
            "a number > 1 with tis_mode mask (it keeps the weights in [1/tis_cap, tis_cap]: 1 would mask every token "
            "whose ratio is not exactly 1)")
    for key, default in (("tis_level", TIS_LEVELS[0]), ("tis_mode", TIS_MODES[0])):
        require(cap is not None or getattr(cfg, key) == default, key, getattr(cfg, key),
                f"{default} (the default) without tis_cap: it says how the weights tis_cap bounds are formed")
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
    require(k == 0 or cap is not None, "tis_cap", cap,
            f"a number ≥ 1 with max_staleness {k}: samples drawn with older weights are corrected by importance "
            "sampling against the engine's log-probs")
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
