"""Asynchronous RL: a rollout worker (a vLLM engine in a process of its own) samples rounds ahead of the trainer,
with weights at most `max_staleness` versions older than the ones each round is trained with.

Versions. The trainer's weights after r rounds are version r, and round r is trained at version r. With
`max_staleness` k the trainer keeps k + 1 rounds requested: after the rounds before r are trained it pushes
version r and requests round r + k, so the worker samples round r + k with version r while the trainer trains
rounds r .. r + k − 1 (verl's fully-async trainer calls this the staleness threshold, NeMo-RL's async GRPO the
trajectory age). k = 0 is the synchronous loop in two processes: push version r, sample round r, train it.
Every round comes back with the version it was sampled with; the trainer trains a round only when r − version is
in [0, k] (`VersionBook`): an older one is dropped (counted in async/dropped) and sampled again with the current
weights. The worker holds each request until it has loaded the version the request names, so with a sound worker
nothing is dropped: the check is what keeps a worker that skipped a version from being trained on.

Weights. Each push is one flat fp32 buffer broadcast from the trainer (rank 0) to the worker (rank 1) over a gloo
process group of their own (a TCPStore on 127.0.0.1; separate from any torchrun group of the trainer's ranks),
announced by a message that names the version, the tensors' names, shapes and dtypes. The trainer does not
wait for the worker to take it (the worker may be sampling): the next push first waits for the worker to reach it
(behind the rounds queued before it: up to `rollout_worker_timeout_s`), then, up to rollout.sync_timeout_s, for
the broadcast and the worker's word that it loaded that version. The group's own timeout is the sum of both, as
gloo times a send out when its receiver has not come for it within the group's timeout, and a worker may well
sample longer than a sync takes.

Deadlines. Every wait of the trainer's for the worker has one: its start (600 s), a round (rollout_worker_timeout_s,
from the moment the trainer waits for it), a version reached (the same), taken and loaded (rollout.sync_timeout_s).
A worker that misses one, reports an error or exits is killed and replaced (rl_loop.Ahead: up to
rollout_worker_restarts times in a run), the fresh one given the trainer's current version and the rounds
requested but not taken; past that the step raises EngineSyncError naming its pid and what it was doing (the round
or version it was on, from its own announcements), and resuming the run from its checkpoint replays what was in
flight. The control messages (requests, sampled rounds with the engine's per-token log-probs, what the worker is
doing) go over a multiprocessing connection on 127.0.0.1 with a random key.

The worker process is started by the trainer (`python -m components.training.rollout_worker`) with an environment
without the trainer's torchrun variables, under `taskset -c <rollout_worker_cpus>` when given, and dies with the
trainer (PR_SET_PDEATHSIG): a kill -9 of the trainer leaves no engine behind.

Resume. A checkpoint sits between rounds and records the version (= its round). Rounds that were requested or
sampled but not trained when the run stopped are not in it: a resumed run requests them again, sampled with the
checkpoint's weights (so after a resume the first k rounds are fresher than the uninterrupted run's), and
samples.jsonl keeps only the rounds before the checkpoint (rl.write_samples): no trained sample is lost or
counted twice.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import asdict
from datetime import timedelta
from multiprocessing.connection import Client, Listener
from pathlib import Path

import torch

from components.training.engines import ENGINE_DIR_PREFIX, EngineSyncError, policy_weights, remove_orphan_dirs

log = logging.getLogger("components.training.rollout_worker")

HOST = "127.0.0.1"
AUTHKEY_ENV = "POSTTRAIN_ROLLOUT_WORKER_KEY"
TRAINER_ONLY_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
"""torchrun's variables, which the worker must not inherit: it is no rank of the trainer's group (vLLM would read
them and join it)."""


class VersionBook:
    """Which version each trained round was sampled with: the staleness check, the dropped count and the
    staleness histogram (in samples) that the metrics report."""

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.dropped = self.restarts = 0
        self.histogram: Counter[int] = Counter()

    def accept(self, round_index: int, version: int) -> bool:
        """Whether round `round_index`, sampled with weights `version`, may be trained (at version round_index):
        False (and counted) when it is more than max_staleness versions old."""
        staleness = round_index - version
        if staleness < 0:
            raise EngineSyncError(f"round {round_index + 1} came back sampled with weights version {version}, newer "
                                  "than the trainer's: the rollout worker answers another run")
        if staleness > self.max_staleness:
            self.dropped += 1
            log.warning("round %d was sampled with weights version %d, %d versions old (max_staleness %d): dropped, "
                        "sampled again", round_index + 1, version, staleness, self.max_staleness)
            return False
        return True

    def state(self) -> dict:
        """What a checkpoint keeps of it: a resumed run's counts go on from the checkpoint's."""
        return {"dropped": self.dropped, "restarts": self.restarts, "histogram": dict(self.histogram)}

    def restore(self, state: dict) -> None:
        self.dropped, self.restarts, self.histogram = state["dropped"], state["restarts"], Counter(state["histogram"])

    def trained(self, round_index: int, version: int, samples: int) -> dict:
        """Record a trained round of `samples` samples; its metrics (the histogram counts every round so far)."""
        self.histogram[round_index - version] += samples
        return {"async/version": version, "async/staleness": round_index - version, "async/dropped": self.dropped,
                "async/restarts": self.restarts,
                **{f"async/staleness_hist/{age}": self.histogram[age] for age in range(self.max_staleness + 1)}}


def flat_weights(model) -> tuple[torch.Tensor, list[tuple[str, list[int], str]]]:
    """The model's weights as one fp32 buffer (what the broadcast sends) and each tensor's name, shape and dtype."""
    named = policy_weights(model)
    meta = [(name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")) for name, tensor in named]
    flat = torch.cat([tensor.detach().reshape(-1).to("cpu", torch.float32) for _, tensor in named])
    return flat, meta


def unflatten(flat: torch.Tensor, meta) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for name, shape, dtype in meta:
        count = int(torch.Size(shape).numel())
        out.append((name, flat[offset:offset + count].view(shape).to(getattr(torch, dtype))))
        offset += count
    return out


def weight_store(port: int, timeout_s: float, *, master: bool):
    """The TCPStore on 127.0.0.1 the weight group meets over (the trainer's, port 0: a free one, is the master)."""
    from torch.distributed import TCPStore

    return TCPStore(HOST, port, 2, is_master=master, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def weight_group(store, rank: int, timeout_s: float):
    """The trainer's and the worker's own gloo process group (rank 0 the trainer) over `store`; `timeout_s` bounds
    each broadcast on both sides, the wait for the peer to come for it included."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [ProcessGroupGloo.create_device(hostname=HOST)]
    return ProcessGroupGloo(PrefixStore("posttrain-rollout-weights", store), rank, 2, options)


def send(conn, message) -> None:
    """A message over the connection, pickled by value: multiprocessing's own pickler would hand tensors over as
    shared-memory handles, which need the processes to be one family of multiprocessing's."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn):
    return pickle.loads(conn.recv_bytes())


def _die_with_parent(parent: int) -> None:
    """In the worker: SIGKILL when the trainer (`parent`) dies (Linux prctl PR_SET_PDEATHSIG); exit now if it is
    already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:
        sys.exit("rollout worker: the trainer that started it is gone")


def worker_command(cpus: str | None) -> list[str]:
    command = [sys.executable, "-m", "components.training.rollout_worker"]
    return ["taskset", "-c", cpus, *command] if cpus else command


def worker_env(cpus: str | None, environ=None) -> dict:
    """The worker's environment: the trainer's without TRAINER_ONLY_ENV, vLLM in-process, its CPU threads bound to
    `cpus` when given."""
    env = {key: value for key, value in (os.environ if environ is None else environ).items()
           if key not in TRAINER_ONLY_ENV}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    root = str(Path(__file__).resolve().parents[2])  # the worker imports this package as the trainer does
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    if cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    return env


class RolloutWorker:
    """The trainer's handle on its rollout worker process: start, push a version, request a round, take a
    sampled round, close. Every wait notices the worker's exit and has a deadline: `timeout_s` for the worker's
    sampling (rollout_worker_timeout_s), settings.sync_timeout_s for a version's transfer and load."""

    def __init__(self, model, tokenizer, settings, *, seed: int, max_num_seqs: int, cpus: str | None = None,
                 timeout_s: float = 3600.0, start_timeout_s: float = 600.0):
        self.timeout_s, self.sync_timeout_s, self.start_timeout_s = timeout_s, settings.sync_timeout_s, start_timeout_s
        self.init = {"tokenizer": tokenizer, "settings": asdict(settings), "seed": seed, "max_num_seqs": max_num_seqs}
        self.cpus = cpus
        self.arrived = threading.Condition()
        self.proc = self.conn = self.group = self.store = None
        shm = Path("/dev/shm")
        parent = shm if shm.is_dir() else Path(tempfile.gettempdir())
        remove_orphan_dirs(parent)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{ENGINE_DIR_PREFIX}{os.getpid()}-", dir=parent))
        model.config.save_pretrained(self.dir)  # config and tokenizer: the worker's engine starts without weights
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.dir)
        tokenizer.save_pretrained(self.dir)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        """A fresh worker process, engine started, no weights yet."""
        self.inbox: dict = {}
        self.receiving: set[int] = set()
        self.loaded: dict[int, float] = {}
        self.doing = "starting"  # what the worker last said it is doing: the deadlines' errors name it
        self.closed, self.failure, self.pending = False, None, None
        key = secrets.token_bytes(16)
        listener = Listener((HOST, 0), authkey=key)
        try:
            self.store = weight_store(0, self.start_timeout_s, master=True)
            env = {**worker_env(self.cpus), AUTHKEY_ENV: key.hex()}
            address = f"{HOST}:{listener.address[1]}"
            self.proc = subprocess.Popen([*worker_command(self.cpus), address, str(os.getpid())], env=env,
                                         stdout=2)  # its logs to stderr: stdout may be a caller's results
            self.conn = self._wait(listener.accept, self.start_timeout_s, "rollout worker start")
            send(self.conn, ("init", {**self.init, "model_dir": str(self.dir), "store_port": self.store.port,
                                      "timeout_s": self.group_timeout_s}))
            threading.Thread(target=self._receive, args=(self.conn,), name="posttrain-rollout-worker",
                             daemon=True).start()
            self.group = self._wait(lambda: weight_group(self.store, 0, self.group_timeout_s), self.start_timeout_s,
                                    "rollout worker start")
            self._await(lambda: "ready" in self.inbox, self.start_timeout_s, "rollout worker start")
        finally:
            listener.close()
        log.info("rollout worker ready (pid %d%s)", self.proc.pid, f", cpus {self.cpus}" if self.cpus else "")

    @property
    def broken(self) -> bool:
        """It exited, failed or missed a deadline: restart() is what may follow."""
        return self.failure is not None or (self.proc is not None and self.proc.poll() is not None)

    def restart(self) -> None:
        """Stop this worker (killed when broken) and start a fresh one: the caller pushes the weights and requests
        the rounds again."""
        self._stop()
        self._start()

    @property
    def group_timeout_s(self) -> float:
        """The weight group's timeout: a broadcast waits for the worker to finish the rounds queued before it, then
        for the transfer (gloo times out a send whose receiver has not come within it)."""
        return self.timeout_s + self.sync_timeout_s

    # waiting, with the worker's exit and a deadline in view
    def _worker(self) -> str:
        return f"the rollout worker (pid {self.proc.pid if self.proc is not None else 'not started'})"

    def _alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise EngineSyncError(f"{what}: {self._worker()} exited with code {self.proc.returncode} while "
                                  f"{self.doing}" + (f" ({self.failure})" if self.failure else ""))
        if self.failure:
            raise EngineSyncError(f"{what}: {self._worker()} failed while {self.doing}: {self.failure}")

    def _await(self, done, timeout_s: float, what: str, key: str = "the start timeout", since: float | None = None
               ) -> None:
        """Until done(), for at most timeout_s from `since` (time.monotonic(); default now)."""
        deadline = (time.monotonic() if since is None else since) + timeout_s
        with self.arrived:
            while not done():
                self._alive(what)
                if time.monotonic() > deadline:
                    message = (f"{what}: {self._worker()} did not answer within {timeout_s:g} s ({key}) while "
                               f"{self.doing}; it is stopped, and the stage with it (a rerun resumes from the last "
                               "checkpoint)")
                    self.failure = self.failure or message
                    raise EngineSyncError(message)
                self.arrived.wait(0.2)

    def _wait(self, fn, timeout_s: float, what: str, key: str = "the start timeout"):
        """fn() in a thread, its result; EngineSyncError when it raises, the worker exits or the deadline passes."""
        box: dict = {}

        def target():
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e
            with self.arrived:
                self.arrived.notify_all()

        threading.Thread(target=target, name=f"posttrain-{what}", daemon=True).start()
        self._await(lambda: box, timeout_s, what, key)
        if "error" in box:
            if self.proc is not None:  # a peer that died breaks the call: say so, not only how the call broke
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                self._alive(what)
            raise EngineSyncError(f"{what} failed: {type(box['error']).__name__}: {box['error']}") from box["error"]
        return box["result"]

    def _receive(self, conn) -> None:
        """The worker's messages, as they come: ready, receiving and loaded <version>, sampling and round <index>,
        error. (Those of a worker since replaced by restart() are left unread.)"""
        while True:
            try:
                message = receive(conn)
            except (EOFError, OSError):
                with self.arrived:
                    if not self.closed and conn is self.conn:
                        self.failure = self.failure or "its connection closed"
                    self.arrived.notify_all()
                return
            with self.arrived:
                if conn is not self.conn:
                    return
                kind = message[0]
                if kind == "ready":
                    self.inbox["ready"] = message[1]
                    self.doing = "idle"
                elif kind == "receiving":
                    self.receiving.add(message[1])
                    self.doing = f"taking weights version {message[1]}"
                elif kind == "loaded":
                    self.loaded[message[1]] = message[2]
                    self.doing = f"idle with weights version {message[1]}"
                elif kind == "sampling":
                    self.doing = f"sampling round {message[1] + 1} with weights version {message[2]}"
                elif kind == "round":
                    self.inbox[("round", message[1])] = message[2:]
                    self.doing = f"idle with weights version {message[3]}"
                else:
                    self.failure = message[1]
                self.arrived.notify_all()

    # the trainer's calls
    def rest(self) -> None:
        """(The worker's engine has its own process and memory: nothing to free between sampling and the sync.)"""

    def push(self, model, version: int) -> None:
        """Send weights `version` (the model's current ones); first the previous push must have been taken and
        loaded within the deadline."""
        self.settle()
        flat, meta = flat_weights(model)
        self._alive(f"weights version {version}")
        send(self.conn, ("weights", version, meta))
        self.pending = (version, self.group.broadcast(flat, 0), flat)  # (flat kept alive until it is sent)

    def settle(self) -> None:
        """The last push is with the worker and loaded: reached within rollout_worker_timeout_s (the worker may be
        sampling the rounds requested before it), then taken and loaded within rollout.sync_timeout_s."""
        if self.pending is None:
            return
        version, work, _ = self.pending
        what = f"weights version {version}"
        self._await(lambda: version in self.receiving, self.timeout_s, what, "rollout_worker_timeout_s")
        started = time.monotonic()
        self._wait(work.wait, self.sync_timeout_s, what, "rollout.sync_timeout_s")
        self._await(lambda: version in self.loaded, self.sync_timeout_s, what, "rollout.sync_timeout_s", since=started)
        self.pending = None

    def request(self, round_index: int, min_version: int, sampling, prompts: list, *, n: int, seed: int,
                indices: list[int]) -> None:
        """Ask for round `round_index`'s samples, drawn with weights of version ≥ `min_version` by
        `sampling.sample` (the stage's Sampling: what the colocated engine would be asked)."""
        self._alive(f"round {round_index + 1}")
        send(self.conn, ("sample", round_index, min_version, sampling, prompts, n, seed, indices))

    def take(self, round_index: int):
        """Round `round_index`'s samples once they are back: (Rollout, version, the worker's sampling seconds)."""
        key = ("round", round_index)
        self._await(lambda: key in self.inbox, self.timeout_s, f"round {round_index + 1}", "rollout_worker_timeout_s")
        with self.arrived:
            return self.inbox.pop(key)

    def close(self) -> None:
        """Stop the worker; then its folder goes."""
        self._stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stop(self) -> None:
        """Stop the worker: asked to, or killed when it failed (a hung one would not read the request) or does not
        stop within 30 s."""
        with self.arrived:
            self.closed = True
        if self.conn is not None and self.failure is None:
            try:
                send(self.conn, ("stop",))
            except OSError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=0 if self.failure else 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.conn is not None:
            self.conn.close()


def serve(conn) -> None:
    """The worker: start the engine, then take weights and sample requests in order until told to stop. A
    request waits until the version it names is loaded."""
    from components.training.config import RolloutEngine
    from components.training.engines import VLLMEngine

    init = receive(conn)[1]
    store = weight_store(init["store_port"], init["timeout_s"], master=False)
    group = weight_group(store, 1, init["timeout_s"])
    # the trainer's tokenizer itself (pickled), so that prompts encode as the trainer's do
    engine = VLLMEngine(init["model_dir"], init["tokenizer"], RolloutEngine(**init["settings"]), seed=init["seed"],
                        max_num_seqs=init["max_num_seqs"], placeholder_weights=True)
    send(conn, ("ready", os.getpid()))
    version, waiting = None, deque()
    try:
        while True:
            message = receive(conn)
            if message[0] == "stop":
                return
            if message[0] == "weights":
                _, new_version, meta = message
                send(conn, ("receiving", new_version))
                started = time.perf_counter()
                flat = torch.empty(sum(int(torch.Size(shape).numel()) for _, shape, _ in meta), dtype=torch.float32)
                group.broadcast(flat, 0).wait()
                engine.load_weights(unflatten(flat, meta), f"weights version {new_version}")
                version = new_version
                send(conn, ("loaded", version, time.perf_counter() - started))
            else:
                waiting.append(message)
            while waiting and version is not None and version >= waiting[0][2]:
                _, round_index, _, sampling, prompts, n, seed, indices = waiting.popleft()
                send(conn, ("sampling", round_index, version))
                started = time.perf_counter()
                sampled = sampling.sample(engine, prompts, n=n, seed=seed, indices=indices)
                send(conn, ("round", round_index, sampled, version, time.perf_counter() - started))
    finally:
        engine.close()
        del group, store


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent(int(argv[1]))
    logging.basicConfig(level=logging.INFO, format="rollout-worker %(levelname)s %(name)s: %(message)s")
    host, port = argv[0].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
    try:
        serve(conn)
    except (EOFError, ConnectionError):
        pass  # the trainer is gone
    except BaseException as e:  # noqa: BLE001 - the trainer raises it as EngineSyncError
        try:
            send(conn, ("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise


def build_engine(cfg, model, tokenizer, world_size: int):
    """The stage's rollout engine: with `rollout_worker` a RolloutWorker (one trainer process), else the colocated
    engine of cfg.rollout."""
    from components.config import UserError

    if not cfg.rollout_worker:
        return cfg.rollout.build(model, tokenizer, seed=cfg.train.seed, max_num_seqs=cfg.sampling.generation_batch_size,
                                 world_size=world_size)
    if world_size > 1:
        raise UserError(f"rollout_worker: true runs one trainer process with one worker; this run has {world_size} "
                        "ranks (set rollout_worker false, or run one process)")
    if next(model.parameters()).device.type != "cpu":
        raise UserError("rollout_worker: true runs on CPU only for now: the worker's share of the GPUs and an NCCL "
                        "weight group are not wired, and a worker on the trainer's GPU would compete for its memory "
                        "(set rollout_worker false to sample on the trainer's engine)")
    return RolloutWorker(model, tokenizer, cfg.rollout, seed=cfg.train.seed,
                         max_num_seqs=cfg.sampling.generation_batch_size, cpus=cfg.rollout_worker_cpus,
                         timeout_s=cfg.rollout_worker_timeout_s)


if __name__ == "__main__":
    main()

