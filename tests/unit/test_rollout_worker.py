"""Asynchronous RL's bookkeeping, without vLLM: the staleness check and histogram, the rounds the trainer requests
and the versions they name (rl_loop.Ahead over a stand-in worker), the config keys' checks, the worker's
environment and the weights' wire format."""

import time
from types import SimpleNamespace

import pytest
import torch

from components.config import ConfigError, from_mapping
from components.grpo.config import GRPOConfig
from components.ppo.config import PPOConfig
from components.training.engines import EngineSyncError
from components.training.rl_loop import Ahead
from components.training.rollout import Rollout
from components.training.rollout_worker import VersionBook, flat_weights, unflatten, worker_command, worker_env


def test_the_book_trains_nothing_older_than_k_and_counts_what_it_drops():
    book = VersionBook(max_staleness=1)
    assert book.accept(3, 3) and book.accept(3, 2)
    assert not book.accept(3, 1) and not book.accept(5, 0)
    assert book.dropped == 2
    with pytest.raises(EngineSyncError, match="newer than the trainer's"):
        book.accept(2, 3)
    book.trained(0, 0, 16)
    metrics = book.trained(3, 2, 8)
    assert metrics == {"async/version": 2, "async/staleness": 1, "async/dropped": 2, "async/restarts": 0,
                       "async/staleness_hist/0": 16, "async/staleness_hist/1": 8}


class StandIn:
    """A worker that samples each request with the last version pushed before it, as the real one does; except
    the first request of each round in `skipped`, sampled with version 0 (a worker that skipped versions), and,
    `dies` (round, call), a worker that dies on that call (take, push or request) about that round: everything
    it held is lost until restart()."""

    def __init__(self, skipped=(), dies=()):
        self.skipped, self.version, self.requests, self.pushed = set(skipped), None, [], []
        self.dies, self.broken, self.restarts, self.last = set(dies), False, 0, None

    def _maybe_die(self, round_index, call):
        if (round_index, call) in self.dies:
            self.dies.discard((round_index, call))
            self.broken, self.requests, self.version = True, [], None
        if self.broken:
            raise EngineSyncError(f"{call}: the stand-in died")

    def restart(self):
        self.broken, self.requests, self.version = False, [], None
        self.restarts += 1

    def push(self, model, version):
        self._maybe_die(self.last, "push")
        self.pushed.append(version)
        self.version = version

    def request(self, round_index, min_version, sampling, prompts, *, n, seed, indices):
        self.last = round_index
        self._maybe_die(round_index, "request")
        assert min_version == self.version
        version = 0 if round_index in self.skipped else self.version
        self.skipped.discard(round_index)
        self.requests.append((round_index, version, seed))

    def take(self, round_index):
        self._maybe_die(round_index, "take")
        index = next(i for i, (r, _, _) in enumerate(self.requests) if r == round_index)
        _, version, _ = self.requests.pop(index)
        return Rollout(texts=["x"] * 4), version, 0.0


def ahead(worker, k, max_steps=6, restarts=0):
    cfg = SimpleNamespace(max_staleness=k, rollout_worker_restarts=restarts, train=SimpleNamespace(max_steps=max_steps,
                                                                                                  seed=0),
                          sampling=SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=4,
                                                   generation_batch_size=8))
    stage = SimpleNamespace(cfg=cfg, model=None, steps_per_round=1, prompts_per_round=2, group_size=2)
    session = SimpleNamespace(dist=SimpleNamespace(rank=0, world=1))
    return Ahead(stage, session, worker, [{"prompt": f"p{i}"} for i in range(8)])


def run_rounds(pipe, rounds=6, start=0, book=None):
    pipe.begin(None, start, book)
    versions = []
    for r in range(start, rounds):
        _, version, metrics = pipe.take(r)
        versions.append(version)
        assert metrics["async/staleness"] == r - version
        if r < rounds - 1:
            pipe.advance(None, r + 1)
    return versions


@pytest.mark.parametrize("k", [0, 1, 2])
def test_round_r_plus_k_is_requested_once_version_r_is_pushed(k):
    worker = StandIn()
    pipe = ahead(worker, k)
    assert run_rounds(pipe) == [max(0, r - k) for r in range(6)]  # every round as stale as allowed, none staler
    assert worker.pushed == list(range(6))
    assert pipe.book.dropped == 0 and worker.requests == []  # nothing requested past the last round


def test_a_resume_requests_the_rounds_in_flight_again_with_the_checkpoints_weights():
    worker = StandIn()
    pipe = ahead(worker, 2)
    pipe.begin(None, 3)  # a checkpoint after round 3: rounds 4-6 (indices 3-5) were in flight
    assert [(r, v) for r, v, _ in worker.requests] == [(3, 3), (4, 3), (5, 3)]
    seeds = [seed for _, _, seed in worker.requests]
    fresh = StandIn()
    ahead(fresh, 2).begin(None, 0)
    assert len(set(seeds)) == 3 and not set(seeds) & {seed for _, _, seed in fresh.requests}


def test_a_round_sampled_with_weights_older_than_k_is_dropped_and_sampled_again():
    pipe = ahead(StandIn(skipped={3}), 1)
    versions = run_rounds(pipe)
    assert versions == [0, 0, 1, 3, 3, 4]  # round 4 came back with version 0 and was sampled again with version 3
    assert pipe.book.dropped == 1 and pipe.book.histogram == {0: 8, 1: 16}


def test_a_resumed_run_counts_drops_and_ages_from_the_checkpoints_book():
    first = ahead(StandIn(skipped={2}), 1)
    run_rounds(first, rounds=3)  # round 3 dropped once and sampled again; a checkpoint after it
    resumed = ahead(StandIn(), 1)
    run_rounds(resumed, rounds=6, start=3, book=first.book.state())
    # rounds 1-3: ages 0, 1, 0 (the dropped one), rounds 4-6 after the resume: 0 (the checkpoint's weights), 1, 1
    assert resumed.book.state() == {"dropped": 1, "restarts": 0, "histogram": {0: 12, 1: 12}}


@pytest.mark.parametrize("dies", [(2, "take"), (3, "request"), (3, "push")])
def test_a_worker_that_dies_is_restarted_and_caught_up_and_every_round_is_taken_once(dies):
    """k = 2: the worker dies holding rounds requested but not taken; the fresh one gets the trainer's current
    version and those rounds, sampled again with it; every round is taken once, none older than k."""
    worker = StandIn(dies=[dies])
    pipe = ahead(worker, 2, restarts=1)
    versions = run_rounds(pipe)
    assert worker.restarts == 1 and pipe.book.restarts == 1 and pipe.outstanding == [] and worker.requests == []
    assert all(0 <= r - v <= 2 for r, v in enumerate(versions)) and pipe.book.dropped == 0
    assert sum(pipe.book.histogram.values()) == 6 * 4  # six rounds of four samples, each taken once
    undisturbed = [max(0, r - 2) for r in range(6)]
    assert versions != undisturbed and all(v >= u for v, u in zip(versions, undisturbed))  # sampled again: fresher


def test_a_worker_that_dies_past_its_restarts_stops_the_step():
    worker = StandIn(dies=[(2, "take"), (3, "take")])
    with pytest.raises(EngineSyncError, match="take: the stand-in died"):
        run_rounds(ahead(worker, 2, restarts=1))
    assert worker.restarts == 1
    with pytest.raises(EngineSyncError, match="take: the stand-in died"):
        run_rounds(ahead(StandIn(dies=[(0, "take")]), 0, restarts=0))


def base(cls, **keys):
    extra = {"rewards": [{"name": "arithmetic"}]} if cls is PPOConfig else {}
    return {"model": "m", "output_dir": "o", "prompts": {"task": "arithmetic"}, "rollout": {"engine": "vllm"},
            **extra, **keys}


@pytest.mark.parametrize("cls", [GRPOConfig, PPOConfig])
@pytest.mark.parametrize("keys, message", [
    ({"max_staleness": -1}, "max_staleness"),
    ({"max_staleness": 1, "tis_cap": 2.0}, "max_staleness.*without rollout_worker"),
    ({"rollout_worker": True, "rollout": {"engine": "hf"}}, "rollout_worker.*engine hf"),
    ({"rollout_worker": True, "max_staleness": 1}, "tis_cap"),
    ({"rollout_worker": True, "lora": {"enabled": True}}, "rollout_worker.*lora"),
    ({"rollout_worker": True, "rollout_worker_cpus": "0;1"}, "rollout_worker_cpus"),
    ({"rollout_worker_cpus": "1"}, "rollout_worker_cpus.*without rollout_worker"),
])
def test_the_async_keys_are_checked_with_the_spec(cls, keys, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(cls, base(cls, **keys))
    assert from_mapping(cls, base(cls, rollout_worker=True, max_staleness=2, tis_cap=2.0,
                                  rollout_worker_cpus="1-2,4")).max_staleness == 2


def test_the_worker_gets_no_torchrun_variables_and_its_own_cores():
    env = worker_env("2-3", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1", "HOME": "/root", "PYTHONPATH": "x"})
    assert "RANK" not in env and "WORLD_SIZE" not in env and "MASTER_PORT" not in env and env["HOME"] == "/root"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["PYTHONPATH"].endswith(":x")
    assert worker_command("2-3")[:3] == ["taskset", "-c", "2-3"] and worker_command(None)[1:] == [
        "-m", "components.training.rollout_worker"]


def test_the_weights_go_over_as_one_fp32_buffer_and_come_back_as_they_were():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    flat, meta = flat_weights(model)
    assert flat.dtype == torch.float32 and flat.numel() == sum(p.numel() for p in model.parameters())
    back = dict(unflatten(flat, meta))
    for name, tensor in model.state_dict().items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_a_stage_that_declares_asynchronous_rl_must_have_the_keys():
    import dataclasses

    from components.stages import _check_config, get

    grpo, ppo, sft = get("grpo"), get("ppo"), get("sft")
    assert grpo.asynchronous and ppo.asynchronous and not sft.asynchronous
    _check_config(grpo)
    _check_config(ppo)
    with pytest.raises(ValueError, match="asynchronous=True is invalid: its config has no `max_staleness`"):
        _check_config(dataclasses.replace(sft, asynchronous=True))
    with pytest.raises(ValueError, match="asynchronous=False is invalid"):
        _check_config(dataclasses.replace(ppo, asynchronous=False))


# The trainer's side against a real worker process (the module's own serve loop, weight group and messages) whose
# engine is a stand-in with set sampling and loading times, so that no vLLM is needed.
STAND_IN_WORKER = '''
import os, sys, time
from components.training import engines, rollout_worker
from components.training.rollout import Rollout

class Engine:
    def __init__(self, *args, **kwargs):
        pass

    def load_weights(self, weights, what):
        time.sleep(float(os.environ["STAND_IN_LOAD_S"]))

    def generate(self, prompts, **sampling):
        time.sleep(float(os.environ["STAND_IN_SAMPLE_S"]))
        return Rollout(texts=[str(sampling["seed"])])

    def close(self):
        pass

engines.VLLMEngine = Engine
rollout_worker.main()
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch, tiny_model_dir):
    """start(sample_s, load_s, sync_timeout_s, timeout_s): a RolloutWorker over the stand-in worker."""
    from components.models import load_model, load_tokenizer
    from components.training import rollout_worker
    from components.training.config import RolloutEngine

    script = tmp_path / "stand_in_worker.py"
    script.write_text(STAND_IN_WORKER)
    monkeypatch.setattr(rollout_worker, "worker_command", lambda cpus: [rollout_worker.sys.executable, str(script)])
    model, tokenizer, started = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), []

    def start(sample_s, load_s=0.0, sync_timeout_s=30.0, timeout_s=60.0):
        monkeypatch.setenv("STAND_IN_SAMPLE_S", str(sample_s))
        monkeypatch.setenv("STAND_IN_LOAD_S", str(load_s))
        worker = rollout_worker.RolloutWorker(model, tokenizer, RolloutEngine(engine="vllm",
                                                                             sync_timeout_s=sync_timeout_s),
                                              seed=0, max_num_seqs=4, timeout_s=timeout_s)
        started.append(worker)
        return model, worker

    yield start
    for worker in started:
        worker.close()


def request(worker, round_index, version):
    from components.training.config import Sampling

    worker.request(round_index, version, Sampling(max_new_tokens=2), ["p"], n=1, seed=100 + round_index, indices=[0])


def test_a_push_made_while_the_worker_samples_longer_than_a_sync_waits_for_it(stand_in):
    """max_staleness 1: version 1 is pushed while the worker samples round 2 with version 0, for longer than
    rollout.sync_timeout_s; the broadcast waits for it (the group's timeout covers the sampling), and round 3 is
    sampled with version 1."""
    model, worker = stand_in(sample_s=4.0, sync_timeout_s=1.0)
    worker.push(model, 0)
    request(worker, 0, 0)
    request(worker, 1, 0)
    assert worker.take(0)[1] == 0
    worker.push(model, 1)  # the worker is sampling round 2 for 4 s
    request(worker, 2, 1)
    rollout, version, _ = worker.take(1)
    assert version == 0 and rollout.texts == ["101"]
    worker.push(model, 2)  # settles version 1 first: taken once round 2 was sampled
    rollout, version, _ = worker.take(2)
    assert version == 1 and rollout.texts == ["102"] and sorted(worker.loaded) == [0, 1]


@pytest.mark.parametrize("hang", ["sampling", "loading"])
def test_a_hung_worker_fails_the_step_naming_its_pid_and_what_it_was_on_and_is_killed(stand_in, hang):
    model, worker = stand_in(sample_s=600 if hang == "sampling" else 0, load_s=600 if hang == "loading" else 0,
                             sync_timeout_s=2.0, timeout_s=3.0)
    pid = worker.proc.pid
    started = time.monotonic()
    worker.push(model, 0)
    if hang == "sampling":
        request(worker, 0, 0)
        with pytest.raises(EngineSyncError, match=rf"^round 1: the rollout worker \(pid {pid}\) did not answer within "
                           r"3 s \(rollout_worker_timeout_s\) while sampling round 1 with weights version 0;"):
            worker.take(0)
    else:
        with pytest.raises(EngineSyncError, match=rf"^weights version 0: the rollout worker \(pid {pid}\) did not "
                           r"answer within 2 s \(rollout.sync_timeout_s\) while taking weights version 0;"):
            worker.push(model, 1)
    assert time.monotonic() - started < 30
    worker.close()
    assert worker.proc.poll() is not None and time.monotonic() - started < 30  # killed, not waited for


@pytest.mark.parametrize("world, device", [(2, "cpu"), (1, "meta")])
def test_a_worker_is_refused_beside_several_ranks_or_a_trainer_off_the_cpu(world, device):
    from components.config import UserError
    from components.training.rollout_worker import build_engine

    cfg = SimpleNamespace(rollout_worker=True)
    model = torch.nn.Linear(2, 2, device=device)
    with pytest.raises(UserError, match="ranks" if world > 1 else "CPU only"):
        build_engine(cfg, model, None, world)
