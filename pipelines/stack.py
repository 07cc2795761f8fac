"""The local stack: an MLflow server (sqlite) whose artifacts are proxied to an S3 endpoint on loopback.

    posttrain stack up      # S3 (moto) on http://127.0.0.1:9000, MLflow UI + API on http://127.0.0.1:5000
    posttrain stack down

`up` starts `moto_server` (an in-memory S3; objects are lost at `down`) unless `--s3-endpoint` names an
S3 that already runs (a MinIO), creates the buckets posttrain-mlflow, posttrain-data and
posttrain-pipelines there, and starts `mlflow server --backend-store-uri sqlite:///<dir>/mlflow.db
--artifacts-destination s3://posttrain-mlflow`: clients talk to MLflow only, and MLflow writes the
artifacts to S3. Pid files and logs live in the stack directory (default .posttrain/stack). Each service
runs in a process group of its own, whose id its pid file holds; `down` stops every process of that group
that carries the service's marker (the environment variable POSTTRAIN_STACK_SERVICE), so a server whose
wrapper has died (mlflow's uvicorn) is stopped too, and the port is free when `down` returns. The S3
credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); moto accepts any, so
without them the servers get a placeholder pair. The integration tests start the same processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_DIR = Path(".posttrain/stack")
MLFLOW_BUCKET = "posttrain-mlflow"
BUCKETS = (MLFLOW_BUCKET, "posttrain-data", "posttrain-pipelines")
HOST = "127.0.0.1"
COMMANDS = {"s3": "moto.server", "mlflow": "mlflow"}
"""The module each service runs as (`python -m ...`): how a pid file is checked to still be ours."""
MARKER = "POSTTRAIN_STACK_SERVICE"
"""Set in every service's environment (inherited by its children) to `<stack dir>/<name>`: which processes of
a process group are the service's."""


def _marker(root: Path, name: str) -> bytes:
    return f"{MARKER}={Path(root).resolve() / name}".encode()


def _server_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(overrides or {})}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.setdefault(key, "posttrain-local")  # moto checks no credentials; a real S3 gets the user's
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: one process fewer, faster start
    return env


def _pid(root: Path, name: str) -> int | None:
    """The pid in `<root>/<name>.pid` when that process is alive and is still the service (not a reused pid)."""
    try:
        pid = int((root / f"{name}.pid").read_text())
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it
                return None
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # an empty command line: the process is being exec'd right now
    return pid if not cmdline or COMMANDS[name].encode() in cmdline.split(b"\0") else None


def _group(root: Path, name: str) -> list[int]:
    """The live processes of the service's process group (its pid file holds the group id) that carry the
    service's marker: the server and its children, also when the process that started them has died."""
    try:
        pgid = int((root / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return []
    marker, found = _marker(root, name), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, _, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z" and marker in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


def _start(root: Path, name: str, port: int, args: list[str], env: dict[str, str]) -> int:
    if (pids := _group(root, name)) or (pids := [p] if (p := _pid(root, name)) is not None else []):
        raise RuntimeError(f"{name} already runs (pid {', '.join(map(str, pids))}); "
                           f"`posttrain stack down --dir {root}` first")
    with socket.socket() as s:
        if s.connect_ex((HOST, port)) == 0:
            raise RuntimeError(f"{name}: port {port} on {HOST} is taken by another process; choose another port")
    root.mkdir(parents=True, exist_ok=True)
    env = {**env, MARKER: _marker(root, name).decode().partition("=")[2]}
    with open(root / f"{name}.log", "ab") as logf:
        # a session of its own (its pid is the group id): stop() signals the whole group, since mlflow server
        # runs uvicorn as a child, which outlives mlflow when mlflow alone dies
        proc = subprocess.Popen([sys.executable, "-m", COMMANDS[name], *args], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    (root / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _wait_http(url: str, root: Path, name: str, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early, with the log's tail, when the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if _pid(root, name) is None:
            break
        time.sleep(0.3)
    tail = (root / f"{name}.log").read_text(errors="replace")[-3000:]
    stop(root, name)
    raise RuntimeError(f"{name} did not come up at {url} within {timeout:.0f}s; log {root / name}.log:\n{tail}")


def start_s3(root: Path, port: int, env: dict[str, str] | None = None) -> str:
    """Start moto's S3 server on loopback `port` (`env`: extra environment); returns its endpoint URL."""
    _start(root, "s3", port, ["-H", HOST, "-p", str(port)], _server_env(env))
    endpoint = f"http://{HOST}:{port}"
    _wait_http(endpoint + "/", root, "s3", timeout=60)
    return endpoint


def create_buckets(endpoint: str, names=BUCKETS, env: dict[str, str] | None = None) -> None:
    """Create the missing buckets, with the credentials the servers get."""
    from minio import Minio

    env, url = _server_env(env), urlparse(endpoint)
    c = Minio(url.netloc, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], secure=url.scheme == "https",
              region=env["AWS_DEFAULT_REGION"])
    for name in names:
        if not c.bucket_exists(name):
            c.make_bucket(name)


def start_mlflow(root: Path, port: int, s3_endpoint: str, env: dict[str, str] | None = None) -> str:
    """Start `mlflow server` (sqlite in `root`, artifacts proxied to s3://posttrain-mlflow); returns its URL."""
    env = _server_env(env) | {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    _start(root, "mlflow", port, ["server", "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
                            "--artifacts-destination", f"s3://{MLFLOW_BUCKET}", "--host", HOST, "--port", str(port),
                            "--workers", "1"], env)
    url = f"http://{HOST}:{port}"
    _wait_http(url + "/health", root, "mlflow", timeout=180)
    return url


def stop(root: Path, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> bool:
    """Signal the service's process group and wait until every process of it is gone (SIGKILL after
    `timeout`), whether or not the process that started it still lives: then its port is free."""
    root = Path(root)
    _pid(root, name)  # reaps the service when it is our own child that exited
    if not _group(root, name):
        (root / f"{name}.pid").unlink(missing_ok=True)
        return False
    pgid = int((root / f"{name}.pid").read_text())
    for s, wait in ((sig, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, s)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _pid(root, name)
            if not _group(root, name):
                break
            time.sleep(0.1)
        if not _group(root, name):
            break
    (root / f"{name}.pid").unlink(missing_ok=True)
    return True


def up(root: Path = DEFAULT_DIR, *, mlflow_port: int = 5000, s3_port: int = 9000,
       s3_endpoint: str | None = None) -> dict[str, str]:
    """Start the stack; returns the environment a client needs (tracking URI and S3 endpoint)."""
    root = Path(root)
    if s3_endpoint is None:
        s3_endpoint = start_s3(root, s3_port)
    create_buckets(s3_endpoint)
    try:
        tracking = start_mlflow(root, mlflow_port, s3_endpoint)
    except Exception:
        stop(root, "s3")
        raise
    return {"MLFLOW_TRACKING_URI": tracking, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}


def down(root: Path = DEFAULT_DIR) -> list[str]:
    """Stop the stack's services; returns the names of those that were running."""
    return [name for name in ("mlflow", "s3") if stop(Path(root), name)]


def main(argv: list[str]) -> int:
    import argparse

    if argv[:1] == ["--"]:  # what the `posttrain` CLI's REMAINDER passes through
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="posttrain stack", description="a local MLflow server with S3 artifacts")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"pid files, logs, mlflow.db (default {DEFAULT_DIR})")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--s3-port", type=int, default=9000, help="port of the moto S3 server")
    p.add_argument("--s3-endpoint", default=None, help="use this S3 (e.g. a MinIO) instead of starting moto")
    args = p.parse_args(argv)
    if args.action == "down":
        stopped = down(args.dir)
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
        return 0
    try:
        env = up(args.dir, mlflow_port=args.mlflow_port, s3_port=args.s3_port, s3_endpoint=args.s3_endpoint)
    except RuntimeError as e:
        print(f"posttrain stack up: {e}", file=sys.stderr)
        return 1
    print(f"MLflow UI: {env['MLFLOW_TRACKING_URI']}   logs: {args.dir}/*.log   stop: posttrain stack down")
    for k, v in env.items():
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
