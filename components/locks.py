"""One writer per directory: an exclusive lock on a stage's output_dir and on `posttrain run`'s state directory.

Two writers into one directory corrupt each other (two stages append the same steps to metrics.jsonl and race for
checkpoints; two local runs race to create the MLflow database and read each other's results), so the second is
refused at once with one line naming the holder: its pid, host, command and since when.

The lock is flock(2) on `.<name>.lock` beside the directory `<name>` (not in it: a stage's output directory may be
a step's output artifact, which must hold the stage's outputs only), held by an open file: the kernel releases it
when the holder ends however it ends (kill -9 included), so a lock is never stale; the file stays (unlinking a
lock file races with a writer that has just opened it) and holds the holder's description as JSON, for the
refusal to quote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from components.config import UserError

log = logging.getLogger(__name__)



def lock_path(directory: str | Path) -> Path:
    """The lock file of `directory`: `.<name>.lock` beside it (`.posttrain.lock` for the state directory)."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name.lstrip('.')}.lock"


class DirectoryInUseError(UserError):
    """Another process writes into the directory; the message names it."""


def _holder() -> dict:
    command = " ".join(getattr(sys, "orig_argv", sys.argv))[:300]  # the interpreter's own argv: `python -m ...`
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h.get("pid"):
        return "another process (it has not described itself yet)"
    return f"pid {h['pid']} on {h.get('host', '?')} ({h.get('command', '?')}) since {h.get('since', '?')}"


@contextlib.contextmanager
def writer_lock(directory: str | Path | None, what: str) -> Iterator[None]:
    """Hold the directory's lock while the body runs; DirectoryInUseError at once when another process holds it.

    `what` says what the directory is, for the message (e.g. "sft.yaml: output_dir"). Only rank 0 (env RANK) of a
    distributed stage takes it: the ranks of one stage are one writer. A filesystem without locks (some network
    mounts) is logged and the body runs unlocked; so does a stage without an output directory (None).
    """
    if not directory or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = lock_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryInUseError(f"{what} {directory} is in use by {_describe(path)}: wait for it to end, "
                                          "or use another directory") from None
            log.warning("%s %s: cannot lock (%s); going on without the lock", what, directory, e)
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        try:
            yield
        finally:
            if locked:
                os.ftruncate(fd, 0)  # released: nothing to quote (the kernel drops the lock when fd closes)
    finally:
        os.close(fd)
