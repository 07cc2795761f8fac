"""`posttrain bench --nproc 2`: a run of ranks that outlives --ranks-timeout ends as an error line, its processes
killed. The lines of a run that ends (grpo and ppo under torchrun and DeepSpeed, each rank its own engine,
docs/bench.md) are checked on tests/integration/test_vllm_ranks.py's bench run, which measures both objectives
with either engine on 2 processes."""

import json
import time

from pipelines.bench import main, ranks
from tests.unit.test_bench import RL


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
