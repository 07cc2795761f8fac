"""`posttrain serve` waits on its vLLM server in a way that Ctrl-C always interrupts (pipelines/serve.py, `_wait`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from pipelines.serve import _wait


@pytest.mark.parametrize("waits", ["serve", "blocking"])
def test_ctrl_c_handed_to_another_thread_interrupts_the_wait(waits):
    """The kernel may deliver a process's SIGINT to any thread that does not block it. Python runs the handler in
    the main thread, but only once that thread runs Python again: a blocking waitpid there is not interrupted, and
    the Ctrl-C waits for the child's end. `_wait` returns to Python every second."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever pytest inherited
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    other = threading.Thread(target=time.sleep, args=(3,))
    other.start()
    threading.Timer(0.5, signal.pthread_kill, (other.ident, signal.SIGINT)).start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            _wait(child) if waits == "serve" else child.wait()  # one blocking waitpid
        interrupted_after = time.monotonic() - started
    finally:
        child.kill()
        child.wait()
        other.join()
        signal.signal(signal.SIGINT, previous)
    if waits == "serve":
        assert interrupted_after < 3, interrupted_after
    else:  # what `_wait` is for: the blocking wait sees the Ctrl-C only when the child has ended by itself
        assert interrupted_after >= 5, interrupted_after
