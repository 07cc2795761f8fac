"""A local run's step server (pipelines.step_server): a step forked from it ends as the step's own process would have
(outputs, log, atexit callbacks, exit code, the signal that killed it), inside the step's process group; a step the
server cannot run as a fresh process would runs in its own process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines import step_server

COMPONENT = textwrap.dedent("""
    def probe(mode: str, marker: str) -> str:
        import atexit
        import json
        import logging
        import os
        import sys
        import time
        from pathlib import Path

        logging.basicConfig(level=logging.INFO)
        atexit.register(lambda: Path(marker).write_text("atexit ran"))
        facts = {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "torch": "torch" in sys.modules,
                 "main": (sys.modules["__main__"].__name__, sys.modules["__main__"].__spec__.name)}
        Path(marker + ".facts").write_text(json.dumps(facts))
        if mode == "fail":
            raise ValueError("failing as asked")
        if mode == "sleep":
            Path(marker + ".sleeping").write_text("")
            time.sleep(60)
        logging.getLogger("probe").info("last line of the step")
        return "done " + mode
""")


BASE = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # which pytest changes per test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = step_server.Server(tmp_path_factory.mktemp("srv"))
    srv.start(BASE)
    yield srv
    srv.close()
    assert srv.proc is None and not os.path.exists(srv.path)


def start_step(tmp_path, mode: str, env: dict) -> tuple[subprocess.Popen, dict]:
    (tmp_path / "component.py").write_text(COMPONENT)
    files = {"marker": tmp_path / "marker", "output": tmp_path / "executor_output.json"}
    executor_input = {"inputs": {"parameterValues": {"mode": mode, "marker": str(files["marker"])}},
                      "outputs": {"parameters": {"Output": {"outputFile": str(tmp_path / "Output")}},
                                  "outputFile": str(files["output"])}}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.local_step", "--component_module_path",
                             str(tmp_path / "component.py"), "--function_to_execute", "probe",
                             "--executor_input", json.dumps(executor_input)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, process_group=0, env=env)
    return proc, files


def step_env(server, **extra) -> dict:
    return {**BASE, **step_server.RUNTIME_ENV, **server.env(), **extra}


def read(path):
    return path.read_text() if path.exists() else None


def test_a_forked_step_keeps_its_outputs_log_atexit_and_process_group(server, tmp_path):
    proc, files = start_step(tmp_path, "ok", step_env(server))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    facts = json.loads(read(files["marker"].with_suffix(".facts")))
    # run by a fork of the server (torch already imported there), in the group of the process kfp.local started
    assert facts["torch"] and facts["ppid"] == server.proc.pid and facts["pid"] != proc.pid, (facts, stderr)
    assert facts["pgid"] == proc.pid and facts["main"] == ["__main__", "pipelines.local_step"]
    assert json.loads(read(files["output"])) == {"parameterValues": {"Output": "done ok"}}
    assert read(files["marker"]) == "atexit ran"
    assert "last line of the step" in stdout + stderr and "Wrote executor output file" in stdout + stderr


def test_a_forked_step_that_raises_exits_1_with_its_traceback(server, tmp_path):
    proc, files = start_step(tmp_path, "fail", step_env(server))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and not files["output"].exists()
    assert json.loads(read(files["marker"].with_suffix(".facts")))["torch"]
    assert stderr.rstrip().endswith("ValueError: failing as asked") and "Traceback" in stderr
    assert read(files["marker"]) == "atexit ran"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_steps_group_ends_the_fork_and_the_step_the_same_way(server, tmp_path, sig):
    # as a fresh interpreter ends: killed by SIGTERM (its default action), or by SIGINT after its KeyboardInterrupt
    proc, files = start_step(tmp_path, "sleep", step_env(server))
    sleeping = files["marker"].with_suffix(".sleeping")
    deadline = time.monotonic() + 120
    while not sleeping.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sleeping.exists(), proc.communicate()[1]
    fork = json.loads(read(files["marker"].with_suffix(".facts")))["pid"]
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -sig, stderr
    assert ("KeyboardInterrupt" in stderr) == (sig == signal.SIGINT)
    assert read(files["marker"]) == "atexit ran" or sig == signal.SIGTERM
    time.sleep(0.5)  # the server reaps it
    assert not os.path.exists(f"/proc/{fork}")


def test_a_stop_signal_that_comes_before_the_fork_stops_the_step(server, tmp_path):
    """kfp.local's stop reaches a step still waiting for its fork (the server busy: importing, or another
    request): the step ends by that signal, and the component never runs."""
    import socket

    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.connect(server.path)
    busy.sendall(b"{")  # a request not finished: the server waits for the rest, the next one waits in the backlog
    try:
        proc, files = start_step(tmp_path, "sleep", step_env(server))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not any(
                os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("socket:")
                for fd in os.listdir(f"/proc/{proc.pid}/fd") if os.path.exists(f"/proc/{proc.pid}/fd/{fd}")):
            time.sleep(0.05)
        time.sleep(0.5)  # connected; its handlers are set right after
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting for its fork, the signal kept
    finally:
        busy.close()  # the server drops the unfinished request and forks the step
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, stderr
    assert not files["marker"].with_suffix(".facts").exists()


@pytest.mark.parametrize("why", ["environment", "no server"])
def test_a_step_the_server_cannot_run_as_a_fresh_process_runs_in_its_own(server, tmp_path, why):
    # a variable the server's imports could have read differently; or a run whose server is gone
    env = step_env(server, HF_HUB_OFFLINE="1") if why == "environment" else \
        step_env(server, **{step_server.SOCKET_ENV: str(tmp_path / "gone.sock")})
    proc, files = start_step(tmp_path, "ok", env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    facts = json.loads(read(files["marker"].with_suffix(".facts")))
    assert facts["pid"] == proc.pid and not facts["torch"]
    said = "environment differs in HF_HUB_OFFLINE" if why == "environment" else "No such file or directory"
    assert "step server: " in stderr and said in stderr.split("step server: ")[1].splitlines()[0]
    assert json.loads(read(files["output"])) == {"parameterValues": {"Output": "done ok"}}
    assert read(files["marker"]) == "atexit ran"


def test_refusal_names_what_differs():
    env = {"A": "1", "PWD": "/x"}
    assert step_server.refusal({"cwd": "/w", "env": {"A": "1", "PWD": "/y"}}, env, "/w") is None  # the shell's PWD
    assert step_server.refusal({"cwd": "/w", "env": {"A": "2", "B": "1"}}, env, "/w") == \
        "environment differs in A, B"
    assert step_server.refusal({"cwd": "/v", "env": env}, env, "/w") == "working directory /v (the server's: /w)"


def test_the_server_of_a_killed_run_exits_and_removes_its_socket(tmp_path):
    """A run killed with SIGKILL cannot close its server: the server sees its stdin close, removes its socket and
    directory, and exits."""
    (tmp_path / "srv").mkdir()
    run = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from pipelines import step_server\n"
        f"srv = step_server.Server(Path({str(tmp_path / 'srv')!r}))\n"
        "srv.start(dict(os.environ))\n"
        "print(srv.proc.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    server = int(run.stdout.readline())
    assert (tmp_path / "srv" / "steps.sock").exists()
    run.kill()
    run.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{server}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{server}") or open(f"/proc/{server}/stat").read().split()[2] == "Z"
    assert not (tmp_path / "srv").exists()
