"""A stage's process (components.exiting, every `python -m components.<stage>`): once its main returns, the
interpreter's exit sequence runs (atexit callbacks, streams flushed) but not its teardown; a main that fails exits as
it always does."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent("""
    import atexit
    import os
    import sys

    from components import exiting


    class FreedByTheTeardown:
        def __del__(self, write=os.write):
            write(2, b"teardown ran\\n")


    def main():
        global kept
        kept = FreedByTheTeardown()  # a global: only the interpreter's teardown frees it
        atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
        sys.stdout.write("buffered, no newline")
        if sys.argv[2] == "fail":
            raise ValueError("failing as asked")


    exiting.run(main)
""")


@pytest.mark.parametrize("outcome", ["succeed", "fail"])
def test_a_stage_process_skips_the_teardown_only_after_its_main_returned(tmp_path, outcome):
    script, marker = tmp_path / "stage.py", tmp_path / "marker"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(marker), outcome], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout == "buffered, no newline"  # flushed either way
    assert marker.read_text() == "atexit ran"  # the callbacks main registered ran before the exit
    if outcome == "succeed":
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    else:
        assert proc.returncode == 1 and "ValueError: failing as asked" in proc.stderr
        assert "teardown ran" in proc.stderr  # the usual exit, teardown and all


def test_every_stage_module_runs_through_it():
    for main in sorted((REPO / "components").glob("*/__main__.py")):
        stage = main.parent.name
        assert main.read_text() == f'from components import exiting\n\nexiting.run("components.{stage}.main")\n', main
