"""What the tests that start torchrun themselves share: a free port on loopback, and the environment of a rank
(this process's, without what torchrun sets per rank, one thread per rank, the repository importable)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANK_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(*, tracking: bool = True, **extra: str) -> dict[str, str]:
    """The environment for torchrun's ranks; `tracking=False` leaves MLFLOW_TRACKING_URI out (no MLflow runs)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    if not tracking:
        env.pop("MLFLOW_TRACKING_URI", None)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               **extra)
    return env
