"""`posttrain stack down` stops every process a service started, also when the service's own process has died."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from pipelines import stack

WRAPPER = '''
import subprocess, sys, time
# like `mlflow server`: a wrapper whose child (uvicorn) is the process that listens
subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.create_server(('127.0.0.1', "
                  "int(sys.argv[1]))); time.sleep(600)", sys.argv[1]])
time.sleep(600)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_down_stops_the_orphan_of_a_dead_wrapper(tmp_path, monkeypatch):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "posttrain_fake_server.py").write_text(WRAPPER)
    monkeypatch.setitem(stack.COMMANDS, "fake", "posttrain_fake_server")
    root, port = tmp_path / "stack", _free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "mod")}
    wrapper = stack._start(root, "fake", port, [str(port)], env)
    deadline = time.monotonic() + 60
    while not _listening(port):
        assert time.monotonic() < deadline, "the fake server did not listen"
        time.sleep(0.1)
    [child] = [p for p in stack._group(root, "fake") if p != wrapper]

    os.kill(wrapper, signal.SIGKILL)  # the wrapper dies; its child serves on, an orphan
    os.waitpid(wrapper, 0)
    assert stack._pid(root, "fake") is None and _listening(port)
    assert stack._group(root, "fake") == [child]
    try:
        stack._start(root, "fake", port, [str(port)], env)
        raise AssertionError("a second start must be refused while the orphan runs")
    except RuntimeError as e:
        assert f"fake already runs (pid {child})" in str(e)

    assert stack.stop(root, "fake") is True  # returns once every process of the group is gone
    assert not _listening(port) and stack._group(root, "fake") == []
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split(")")[1].split()[0] == "Z"
    assert not (root / "fake.pid").exists()
    assert stack.stop(root, "fake") is False


def test_a_group_without_the_marker_is_not_ours(tmp_path):
    """A pid file naming a process group of some other program (the id reused) stops nothing."""
    import subprocess

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (tmp_path / "s3.pid").write_text(str(other.pid))
        assert stack._group(tmp_path, "s3") == []
        assert stack.stop(tmp_path, "s3") is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
