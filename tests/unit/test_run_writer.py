"""components.tracking.RunWriter: what is put before close() is sent, whatever the writer thread was doing."""
import threading
import time

from components import tracking


class _Recorder:
    """An MLflow client that records what it is sent."""

    def __init__(self):
        self.calls = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=True):
        self.calls.append(("batch", [m.key for m in metrics]))

    def set_terminated(self, run_id, status):
        self.calls.append(("end", status))


def test_the_end_put_while_the_thread_finds_the_journal_empty_is_still_sent(tmp_path, monkeypatch):
    """The writer thread reads an empty batch, then the main thread puts the run's end and closes: the end must
    still be sent (it was once dropped here and the run stayed RUNNING). The interleaving is forced, not hoped
    for: the thread is held right after its read finds nothing, until close() has begun."""
    read, found_empty, writers = tracking._read_batch, threading.Event(), []

    def held_read(f):
        ops = read(f)
        if not ops and not found_empty.is_set():
            found_empty.set()
            deadline = time.monotonic() + 10
            while not (writers and writers[0]._closing) and time.monotonic() < deadline:  # until close() has begun
                time.sleep(0.01)
        return ops

    monkeypatch.setattr(tracking, "_read_batch", held_read)
    client = _Recorder()
    writers.append(tracking.RunWriter(client, "r" * 32, str(tmp_path)))
    writer = writers[0]
    assert found_empty.wait(10)
    writer.put("metrics", {"loss": 1.0}, 1)
    writer.put("end", {"status": "FINISHED"})
    assert writer.close(10)
    assert client.calls == [("batch", ["loss"]), ("end", "FINISHED")]
    assert list(tmp_path.iterdir()) == []  # sent whole: the journal is gone
