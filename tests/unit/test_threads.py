"""The thread policy (components/threads.py): its choices from the model size, the cores and the load, and what
ThreadPolicy sets and reports, with the samples and torch's thread calls replaced."""

import subprocess
import sys

import pytest
import torch

from components import threads
from components.threads import (
    ThreadPolicy,
    busy_seconds,
    choose_threads,
    early_env,
    others_busy,
    quota_cpus,
    user_threads,
)


def test_free_cores_are_used_when_the_model_is_big_enough():
    assert choose_threads(params=100_000_000, cpus=8, others_busy=0.0) == 8
    assert choose_threads(params=800_000, cpus=2, others_busy=0.05) == 2  # the demo's model, idle cores


def test_a_busy_core_is_left_to_its_process():
    assert choose_threads(params=100_000_000, cpus=2, others_busy=1.0) == 1  # one `while True: pass` beside it
    assert choose_threads(params=100_000_000, cpus=8, others_busy=2.4) == 5
    assert choose_threads(params=100_000_000, cpus=2, others_busy=5.0) == 1  # never fewer than one


def test_a_core_used_a_little_by_others_still_counts_as_free():
    assert choose_threads(params=100_000_000, cpus=2, others_busy=threads.BUSY_FRACTION - 0.01) == 2
    assert choose_threads(params=100_000_000, cpus=2, others_busy=threads.BUSY_FRACTION + 0.01) == 1


def test_a_small_model_gets_few_threads():
    assert choose_threads(params=100_000, cpus=16, others_busy=0.0) == 1  # the bench's tiny shape
    assert choose_threads(params=3 * threads.PARAMS_PER_THREAD, cpus=16, others_busy=0.0) == 3


def test_the_users_count_wins():
    assert choose_threads(params=100_000, cpus=2, others_busy=2.0, user=4) == 4
    assert user_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert user_threads({"OMP_NUM_THREADS": "3", "POSTTRAIN_THREADS": "1"}) == 1
    assert user_threads({"OMP_NUM_THREADS": "4,2"}) == 4  # OpenMP's nested form: the outer level
    assert user_threads({}) is None
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        user_threads({"OMP_NUM_THREADS": "many"})


def test_idle_threads_spin_briefly_unless_the_user_chose_how_they_wait():
    env = {}
    early_env(env)
    assert env == {"GOMP_SPINCOUNT": "10000"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        early_env(env)
        assert env == chosen


def test_others_load_is_this_process_cores_busy_time_less_this_process():
    # samples: (wall s, this process's CPU s, its cores' busy s); 2 s apart, 3 core-s busy of which 1 was ours
    assert others_busy((10.0, 5.0, 100.0), (12.0, 6.0, 103.0)) == pytest.approx(1.0)
    assert others_busy((10.0, 5.0, 100.0), (12.0, 7.0, 101.9)) == 0.0  # tick rounding: never negative
    assert others_busy((10.0, 5.0, 100.0), (10.0, 5.0, 100.0)) == 0.0


def test_several_ranks_share_the_cores_and_the_load_is_not_counted():
    assert choose_threads(params=100_000_000, cpus=8, others_busy=None, local_world_size=2) == 4
    assert choose_threads(params=100_000_000, cpus=2, others_busy=None, local_world_size=4) == 1
    assert choose_threads(params=600_000, cpus=16, others_busy=None, local_world_size=2) == 2  # by size


def test_only_this_process_cores_are_summed(tmp_path):
    stat = tmp_path / "stat"  # user nice system idle iowait irq softirq steal, in ticks
    stat.write_text("cpu  1000 0 0 9000 0 0 0 0 0 0\n"
                    "cpu0 100 0 0 900 0 0 0 0 0 0\n"
                    "cpu1 200 0 100 900 50 0 0 0 0 0\n"
                    "cpu12 700 0 0 100 0 0 0 0 0 0\n"
                    "intr 12345\n")
    tick = threads.os.sysconf("SC_CLK_TCK")
    assert busy_seconds({0, 1}, str(stat)) == pytest.approx(400 / tick)  # idle and iowait are not busy
    assert busy_seconds({12}, str(stat)) == pytest.approx(700 / tick)
    assert busy_seconds({2}, str(stat)) == 0.0


def test_a_cgroup_quota_is_read_as_cores_rounded_up(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    for text, cores in (("150000 100000", 2), ("100000 100000", 1), ("max 100000", None), ("50000 100000", 1)):
        cpu_max.write_text(text + "\n")
        assert quota_cpus(str(cpu_max)) == cores
    assert quota_cpus(str(tmp_path / "absent")) is None


class FakeTorch:
    """torch's thread calls: `takes` False is a set_num_threads that does nothing (vLLM's, in its process)."""

    def __init__(self, threads=7, takes=True):
        self.threads, self.takes, self.asked = threads, takes, []

    def set_num_threads(self, n):
        self.asked.append(n)
        if self.takes:
            self.threads = n

    def get_num_threads(self):
        return self.threads


@pytest.fixture
def machine(monkeypatch):
    """8 cores, no quota, other processes keeping 2.5 of them busy, torch replaced; returns the fake torch."""
    fake = FakeTorch()
    monkeypatch.setattr(torch, "set_num_threads", fake.set_num_threads)
    monkeypatch.setattr(torch, "get_num_threads", fake.get_num_threads)
    monkeypatch.setattr(threads, "affinity", lambda: set(range(8)))
    monkeypatch.setattr(threads, "quota_cpus", lambda: None)
    monkeypatch.setattr(threads, "measure_others", lambda cores: 2.5 if cores == set(range(8)) else None)
    return fake


BIG = 100_000_000


def test_the_policy_sets_the_free_cores_once(machine):
    assert ThreadPolicy(BIG, "cpu", environ={}).threads == 5  # 8 - ceil(2.5 - 0.3)
    assert machine.asked == [5]
    assert not hasattr(ThreadPolicy, "check")  # chosen once: no later change of the count


def test_the_users_count_wins_over_the_load(machine):
    assert ThreadPolicy(BIG, "cpu", environ={"POSTTRAIN_THREADS": "3", "OMP_NUM_THREADS": "1"}).threads == 3
    assert ThreadPolicy(BIG, "cpu", environ={"OMP_NUM_THREADS": "6", "LOCAL_WORLD_SIZE": "4"}).threads == 6
    assert machine.asked == [3, 6]


def test_local_ranks_split_the_cores_without_the_load(machine):
    assert ThreadPolicy(BIG, "cpu", environ={"LOCAL_WORLD_SIZE": "2"}).threads == 4  # not 5 // 2: load unused
    assert ThreadPolicy(BIG, "cpu", environ={"LOCAL_WORLD_SIZE": "1"}).threads == 5


def test_a_quota_below_the_affinity_sets_the_cores_and_the_load_is_not_counted(machine, monkeypatch):
    monkeypatch.setattr(threads, "quota_cpus", lambda: 3)
    assert ThreadPolicy(BIG, "cpu", environ={}).threads == 3
    monkeypatch.setattr(threads, "quota_cpus", lambda: 16)  # more than the affinity: the affinity and the load
    assert ThreadPolicy(BIG, "cpu", environ={}).threads == 5


def test_a_set_that_does_not_take_is_reported_as_what_took(machine, caplog):
    machine.takes = False
    with caplog.at_level("INFO", logger="components.threads"):
        policy = ThreadPolicy(BIG, "cpu", environ={"POSTTRAIN_THREADS": "2"})
    assert machine.asked == [2] and policy.threads == 7
    assert "torch threads 7" in caplog.text and "2 asked: set_num_threads did not take" in caplog.text


def test_on_cuda_the_threads_are_left_alone(machine):
    assert ThreadPolicy(BIG, "cuda", environ={"POSTTRAIN_THREADS": "2"}).threads == 7
    assert machine.asked == []


def test_importing_the_package_sets_the_wait_policy_and_loads_no_torch():
    code = "import os, sys, components; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    env = {k: v for k, v in threads.os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["10000", "False"]


def test_a_sampling_process_chooses_for_its_first_model_and_keeps_the_count(machine, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "_sampling", None)
    small = torch.nn.Linear(500, 1000)  # 0.5M parameters: 2 threads by size
    assert threads.for_sampling(small).threads == 2
    assert threads.for_sampling(torch.nn.Linear(4000, 4000)).threads == 2  # a bigger second model keeps the count
    assert machine.asked == [2]
