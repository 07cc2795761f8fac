"""`posttrain bench --nproc 2`: grpo and ppo under torchrun and DeepSpeed, each rank its own engine (docs/bench.md);
and a run of ranks that outlives --ranks-timeout ends as an error line, its processes killed."""

import json
import os
import time

from pipelines.bench import main, ranks
from tests.unit.test_bench import RL, _assert_ranks, _lines


def test_grpo_and_ppo_lines_hold_each_rank(capsys):
    """--nproc 2: each rank its own engine and its share of every round, the line holding each rank's numbers
    (one process: tests/unit/test_bench.py)."""
    assert main(RL + ["--objectives", "grpo,ppo", "--grpo-warmup", "1", "--nproc", "2"]) == 0
    grpo, ppo = _lines(capsys)
    for line in (grpo, ppo):
        _assert_ranks(line, 2)
        assert line["rollout"] == "hf"
        assert line["threads"] == max(1, int(os.environ["POSTTRAIN_THREADS"]) // 2)  # the bench's, split


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_ranks_past_the_timeout_are_killed_and_reported(capsys, monkeypatch):
    killed = []
    descendants = ranks.descendants

    def recorded(pid):
        killed.extend([pid, *descendants(pid)])
        return killed[1:]

    monkeypatch.setattr(ranks, "descendants", recorded)
    # 1000 rounds outlive 20 s (2 take a few seconds): the ranks are mid-run when the timeout ends them
    assert main(RL + ["--objectives", "grpo", "--nproc", "2", "--grpo-steps", "1000", "--ranks-timeout", "20"]) == 1
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert "grpo on 2 processes did not end in 20 s (--ranks-timeout)" in line["error"]
    assert len(killed) >= 3  # torchrun and its 2 ranks, at least
    time.sleep(1)
    assert not [pid for pid in killed if _alive(pid)]
