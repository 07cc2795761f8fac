"""The process of one step of a local run (pipelines.local): kfp's executor, then an exit without the interpreter's
teardown.

    python -m pipelines.local_step --executor_input ... --function_to_execute ...   (kfp.dsl.executor_main's arguments)

A step that has imported torch, transformers and MLflow spends seconds after its last line freeing them (8-10 s
for a 1-step SFT step with the cores shared): the finalization of modules and objects the process is about to drop
anyway. Once the executor has written the step's outputs, this exits at the end of the exit sequence instead
(components.exiting). A step that raises exits as it always does (its traceback, status 1).

In a local run whose step server runs (pipelines.step_server), this process only asks the server to fork the step and
waits for its end; it runs the step itself when the server cannot.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    server = os.environ.get("POSTTRAIN_STEP_SERVER")  # pipelines.step_server.SOCKET_ENV
    if server:  # a fork of the run's step server, which has imported torch and the rest, runs the step
        from pipelines import step_server

        code = step_server.run_forked(server, sys.argv)
        if code is not None:
            step_server.exit_as(code)
    from components import exiting

    exiting.run(_executor_main)


def _executor_main() -> None:
    from kfp.dsl.executor_main import executor_main  # imported after exiting.run registered its callback

    executor_main()


if __name__ == "__main__":
    main()
