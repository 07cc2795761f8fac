"""A local run's step server: one process that imports what the steps import, once, and forks each step from itself.

Every step of a local run is a fresh process (kfp.local runs `sh -ec '... python -m kfp.dsl.executor_main ...'`),
and a training or sampling step starts by importing torch, transformers and MLflow: about 6 s on two cores, most of a
dpo or evaluate step of the short demo (docs/bench.md, "The harness"). The server pays that once per run:

- `Server` (in the run's process) starts `python -m pipelines.step_server SOCKET` with the environment the steps
  get and hands the socket's path to the steps in POSTTRAIN_STEP_SERVER. The server imports PRELOAD, then serves.
- The step's process is still the one kfp.local starts (pipelines.local_step, which imports nothing heavy). With
  POSTTRAIN_STEP_SERVER set it calls `run_forked`: it sends its arguments, working directory, environment, process
  group and standard streams (the descriptors themselves) to the server. The server forks; the fork joins the
  step's process group (a signal to the step's group reaches it, and everything it starts, as before), takes the
  step's streams and arguments and runs kfp's executor. The step's process waits and exits as the fork did: its
  code, or the same signal.
- A request the server cannot serve as a fresh process would run runs in the step's own process instead
  (`run_forked` returns None): an environment or working directory other than the server's (a module may have read
  a variable at import), a server running a Python thread besides its main one (a fork copies only the calling
  thread), or no server. Native threads of the imported libraries (OpenBLAS's pool, jemalloc's background thread)
  prepare for a fork themselves (pthread_atfork), as they must for torch's DataLoader, whose workers fork.

What a fork shares with the server, a fresh process would have built the same way: the same interpreter, the same
environment, the same imports. Python's `random` reseeds after a fork; torch's generators are seeded by the stages.
POSTTRAIN_FORK_STEPS=0 turns the server off (every step a fresh process).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SOCKET_ENV = "POSTTRAIN_STEP_SERVER"
"""The server's socket, in a step's environment."""
STOPS = {signal.SIGINT, signal.SIGTERM}
"""The signals that stop a step (pipelines.local.Steps.stop): blocked across the fork, so one sent to the fork
before it has its own handlers waits for them."""
SWITCH_ENV = "POSTTRAIN_FORK_STEPS"
"""0: no server; every step starts as a fresh process."""
RUNTIME_ENV = {"_KFP_RUNTIME": "true"}
"""What kfp.local's step command adds to the environment of the executor's process (the server's is the same)."""
SHELL_SET = ("PWD", "OLDPWD", "SHLVL", "_")
"""Set by the shell that starts a step's process (dash sets PWD, bash `_` too): not compared; the fork takes the
step's."""
PRELOAD = ("torch", "transformers", "mlflow", "kfp.dsl.executor_main", "components.step", "components.tracking",
           "components.preflight.main")
"""Imported by the server before it serves, with every built-in stage's main module (components.stages) and the
classes the stages load models with."""


def enabled(environ=None) -> bool:
    return (os.environ if environ is None else environ).get(SWITCH_ENV, "1").strip() not in ("0", "false", "no", "")


# ---------------------------------------------------------------------------------------------------------------
# The run's side

class Server:
    """The server process of one local run: `start` it with the steps' environment, give `env` to each step,
    `close` when the run ends (the server exits when its stdin closes)."""

    def __init__(self, directory: Path):
        self.path = str(directory / "steps.sock")
        self.proc: subprocess.Popen | None = None

    def start(self, environ: dict[str, str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        env = {**environ, **RUNTIME_ENV, SOCKET_ENV: self.path}
        # its own process group: a Ctrl-C in the terminal stops the steps through the run, not the server under them
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.step_server", self.path], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     process_group=0)
        deadline = time.monotonic() + 10  # until it listens (it binds before it imports): a step may ask at once
        while not os.path.exists(self.path) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def env(self) -> dict[str, str]:
        """What a step's environment adds to the run's."""
        return {SOCKET_ENV: self.path} if self.proc is not None else {}

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.proc = None


# ---------------------------------------------------------------------------------------------------------------
# The step's side

def run_forked(path: str, argv: list[str]) -> int | None:
    """Run this step (`argv`: kfp's executor arguments) as a fork of the server at `path`, this process waiting;
    returns its exit code (negative: the signal that ended it), or None when the server did not run it (said on
    stderr; a stop signal that came meanwhile is raised here again, once the step is this process's to run)."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError as e:
        print(f"step server: {e}; the step runs in its own process", file=sys.stderr)
        return None
    early: list[int] = []  # stop signals that came before the fork was in this process's group
    previous = {sig: signal.signal(sig, lambda signum, _: early.append(signum))
                for sig in STOPS}
    started = ended = why = None
    try:
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "pgid": os.getpgid(0)}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        with conn.makefile("r") as replies:
            started = json.loads(replies.readline() or "null")
            if not started or "pid" not in started:  # refused, or the server is gone: run here
                why = (started or {}).get("refused", "no answer")
                started = None
            else:
                # the fork is in this process's group now (the server put it there before it answered): a
                # signal to the group reaches it, which handles it, and this waits for its end
                for sig in previous:
                    signal.signal(sig, signal.SIG_IGN)
                for signum in early:  # one that came before is passed on
                    os.kill(started["pid"], signum)
                ended = json.loads(replies.readline() or "null")
    except (OSError, ValueError) as e:
        why = why or str(e)
    finally:
        conn.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not started:  # nothing was forked
        print(f"step server: {why}; the step runs in its own process", file=sys.stderr)
        for signum in early:
            signal.raise_signal(signum)
        return None
    if not ended:  # the server died under a running step: its code is lost (never run a step twice)
        print(f"step server: it exited while step process {started['pid']} ran", file=sys.stderr)
        return 1
    return int(ended["code"])


def exit_as(code: int) -> None:
    """Exit as a process whose step ended with `code` (negative: killed by that signal)."""
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's action cannot be set (and needs not be)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


# ---------------------------------------------------------------------------------------------------------------
# The server

def preload() -> None:
    import importlib

    import components  # noqa: F401  (first: OpenMP's wait policy, before torch)
    for name in PRELOAD:
        importlib.import_module(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from components.stages import STAGES
    for stage in STAGES.values():
        if not stage.package:
            importlib.import_module(f"components.{stage.module}.main")


def refusal(request: dict, environ: dict[str, str], cwd: str) -> str | None:
    """Why a fork of this server would not be the process the step would have been, or None."""
    if request["cwd"] != cwd:
        return f"working directory {request['cwd']} (the server's: {cwd})"
    keys = sorted(k for k in set(request["env"]) | set(environ)
                  if request["env"].get(k) != environ.get(k) and k not in SHELL_SET)
    if keys:
        return f"environment differs in {', '.join(keys)}"
    return None


def unforkable() -> str | None:
    """Why this server's state does not allow a fork, or None."""
    if threading.active_count() != 1:
        return f"the server runs {threading.active_count()} Python threads"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a fork cannot use a CUDA context it inherited
        return "CUDA is initialized in the server"
    return None


def child(request: dict, fds: list[int], go: int, listener: socket.socket, conns: list[socket.socket]) -> None:
    """In the fork: become the step's process and run kfp's executor once the server has told the step it runs
    here (`go`: a byte; end of file, the server gone or the step not told: exit, the step runs itself); never
    returns."""
    code, interrupted = 1, False
    try:
        listener.close()
        for c in conns:
            c.close()
        os.setpgid(0, request["pgid"])
        if os.read(go, 1) != b"1":
            os._exit(1)
        os.close(go)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # one sent meanwhile is delivered now
        for key in SHELL_SET:
            if key in request["env"]:
                os.environ[key] = request["env"][key]
            else:
                os.environ.pop(key, None)
        sys.argv = list(request["argv"])
        sys.modules["__main__"] = main_module()
        from kfp.dsl.executor_main import executor_main

        executor_main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:
        import traceback
        traceback.print_exc()
        interrupted = isinstance(e, KeyboardInterrupt)
    finally:  # the interpreter's exit sequence without its teardown (pipelines.local_step): threads, atexit, streams
        with contextlib.suppress(BaseException):
            threading._shutdown()
        with contextlib.suppress(BaseException):
            import atexit
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            if "logging" in sys.modules:
                sys.modules["logging"].shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        if interrupted:  # as the interpreter ends on an uncaught KeyboardInterrupt: killed by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def main_module():
    """`__main__` as in `python -m pipelines.local_step`: named __main__, with local_step's spec and file (what
    multiprocessing's spawn reads to start a child)."""
    import types

    import pipelines.local_step as local_step
    module = types.ModuleType("__main__")
    module.__dict__.update({k: v for k, v in vars(local_step).items() if k != "__name__"})
    return module


def serve(path: str) -> None:
    """Bind `path`, import PRELOAD, then fork each request until stdin closes."""
    environ, cwd = dict(os.environ), os.getcwd()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # steps that ask while this imports wait in the backlog
    signal.signal(signal.SIGINT, lambda *_: None)  # not SIG_IGN: a fork would discard a Ctrl-C sent before it is ready
    preload()
    sys.stdout.flush()
    sys.stderr.flush()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    waiting: dict[int, socket.socket | None] = {}  # a running fork's pid → its step's connection
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):  # the run ended (or was killed): its socket and
                    with contextlib.suppress(OSError):      # directory go, and this exits without the teardown
                        os.unlink(path)                     # of torch & co
                        os.rmdir(os.path.dirname(path))
                    os._exit(0)
            elif key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(4096)
            else:
                conn, _ = listener.accept()
                try:
                    handle(conn, listener, environ, cwd, waiting)
                except Exception:  # a request cut short or malformed: that step runs in its own process
                    conn.close()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                conn.close()


def handle(conn: socket.socket, listener: socket.socket, environ: dict, cwd: str,
           waiting: dict[int, socket.socket]) -> None:
    conn.settimeout(30)
    data, fds = b"", []
    try:  # the step's descriptors are closed here whatever happens (a fork that kept one would hold its pipe open)
        while not data.endswith(b"\n"):
            chunk, got, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            fds += got
            if not chunk:
                raise ValueError("request cut short")
            data += chunk
        request = json.loads(data)
        why = refusal(request, environ, cwd) or unforkable() if len(fds) == 3 else "no standard streams"
        if why:
            conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
            conn.close()
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            child(request, fds, go_r, listener, [conn, *filter(None, waiting.values())])
        os.close(go_r)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
        waiting[pid] = None  # reaped whatever happens next
        try:
            with contextlib.suppress(OSError):  # the child does it too; whichever comes first, before the step
                os.setpgid(pid, request["pgid"])  # learns the pid, so a signal to its group reaches the fork
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            os.write(go_w, b"1")  # the step waits for this fork now: it may run (never both, never twice)
            waiting[pid] = conn
        finally:
            os.close(go_w)
    finally:
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])
