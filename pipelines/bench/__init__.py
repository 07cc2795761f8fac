"""`posttrain bench`: throughput, MFU and peak memory of our objectives, optionally against TRL on the same data.

    workloads  the random-init model shapes, and the rows, pairs and prompts drawn for them
    measure    the device, peak memory, throughput and MFU, counted the same way for both sides
    ours       our side: the training loop and our stages, run and measured
    trl_peer   the TRL peer: TRL's trainers on the same workloads
    cli        the command line: arguments, JSON lines, the table

The workloads and how each number is counted: docs/bench.md.
"""

import components  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads; components/threads.py)
from pipelines.bench.cli import main

__all__ = ["main"]
