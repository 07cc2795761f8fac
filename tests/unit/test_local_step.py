"""A local run's step process (pipelines.local_step): kfp's executor, its outputs, its atexit callbacks and its log
kept; only the interpreter's teardown is skipped, and only after a step that succeeded."""

import json
import subprocess
import sys
import textwrap

import pytest

from pipelines.local import step_command

COMPONENT = textwrap.dedent("""
    def greet(name: str, marker: str) -> str:
        import atexit
        import logging
        from pathlib import Path

        logging.basicConfig(level=logging.INFO)
        atexit.register(lambda: Path(marker).write_text("atexit ran"))
        if name == "fail":
            raise ValueError("failing as asked")
        logging.getLogger("greet").info("last line of the step")
        return "hello " + name
""")


def run_step(tmp_path, name: str) -> tuple[subprocess.CompletedProcess, dict | None, str | None]:
    (tmp_path / "component.py").write_text(COMPONENT)
    marker, output = tmp_path / "marker", tmp_path / "executor_output.json"
    executor_input = {"inputs": {"parameterValues": {"name": name, "marker": str(marker)}},
                      "outputs": {"parameters": {"Output": {"outputFile": str(tmp_path / "Output")}},
                                  "outputFile": str(output)}}
    proc = subprocess.run([sys.executable, "-m", "pipelines.local_step", "--component_module_path",
                           str(tmp_path / "component.py"), "--function_to_execute", "greet",
                           "--executor_input", json.dumps(executor_input)], capture_output=True, text=True, timeout=120)
    return (proc, json.loads(output.read_text()) if output.exists() else None,
            marker.read_text() if marker.exists() else None)


def test_a_step_that_succeeds_keeps_its_outputs_log_and_atexit_callbacks(tmp_path):
    proc, output, marker = run_step(tmp_path, "world")
    assert proc.returncode == 0, proc.stderr
    assert output == {"parameterValues": {"Output": "hello world"}}
    assert marker == "atexit ran"
    log = proc.stdout + proc.stderr
    assert "last line of the step" in log and "Wrote executor output file" in log


def test_a_step_that_raises_exits_1_with_its_traceback(tmp_path):
    proc, output, marker = run_step(tmp_path, "fail")
    assert proc.returncode == 1 and output is None
    assert proc.stderr.rstrip().endswith("ValueError: failing as asked") and "Traceback" in proc.stderr
    assert marker == "atexit ran"


@pytest.mark.parametrize("python", ["python3", "/work/venv/bin/python"])
def test_the_local_runner_starts_steps_through_it(python):
    script = (f'program_path=$(mktemp -d)\nprintf "%s" "$0" > "$program_path/ephemeral_component.py"\n'
              f'_KFP_RUNTIME=true {python} -m kfp.dsl.executor_main                         --component_module_path '
              f'"$program_path/ephemeral_component.py" "$@"\n')
    source = "def f(x: str):\n    print('-m kfp.dsl.executor_main ')\n"  # the component's text is never changed
    command = ["sh", "-ec", script, source, "--executor_input", "{}", "--function_to_execute", "f"]
    assert step_command(command) == ["sh", "-ec", script.replace("-m kfp.dsl.executor_main ",
                                                                 "-m pipelines.local_step "), *command[3:]]
