"""The part of the Kubernetes API that the TrainJob launcher (components/trainjob.py) calls, on loopback, with a
small stand-in for Kubeflow Trainer's controller behind it.

No cluster runs here, so tests start this server (http.server in a thread) and point the launcher at it
(POSTTRAIN_KUBE_API). It serves:

- trainjobs (trainer.kubeflow.org/v1alpha1): create (validated against the CRD schema pinned in k8s/crds/, as
  the API server does: 422 when invalid; 409 when the name exists), get, list (labelSelector) and delete;
- pods: list (labelSelector), get, and a pod's log, followed (the response grows until the pod ends) and with
  RFC 3339 timestamps, as `kubectl logs -f --timestamps` reads it.

The controller plays each created TrainJob as `behaviour` says: one JobSet pod per node (labels
jobset.sigs.k8s.io/jobset-name and job-index), each printing `lines`, then the Complete or Failed condition with
its reason and message; with outcome None the TrainJob runs until finish() or delete. Deleting a TrainJob deletes
its pods and ends their log streams. Every request is recorded.

    with KubernetesApi() as api:
        os.environ["POSTTRAIN_KUBE_API"] = api.url
        ...
        assert api.created == ["pt-sft-..."] and api.deleted == ["pt-sft-..."]
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[2]
TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?$")
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Behaviour:
    """How the controller plays the next TrainJob created."""

    lines: list[str] = field(default_factory=lambda: ["step 1 loss 2.0", "step 2 loss 1.5", "step 3 loss 1.2"])
    interval: float = 0.05
    """Seconds between two lines of a pod."""
    outcome: str | None = "Complete"
    """Complete, Failed, or None: runs until finish() or delete."""
    reason: str = ""
    message: str = ""
    on_complete: Callable[[dict], None] | None = None
    """Called with the TrainJob before its Complete condition is set (e.g. to write the stage's outputs)."""
    drop_log_after: int | None = None
    """Cut each pod's first followed log stream after this many lines, while the pod runs (a dropped
    connection): the client must reconnect and show no line twice."""


def _stamp(counter: int) -> str:
    """An RFC 3339 timestamp with nanoseconds, strictly increasing with `counter`."""
    t = EPOCH + timedelta(microseconds=counter)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _crd_validator():
    spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    schemas = module.crd_schemas()
    return lambda resource: module.crd_errors(resource, schemas)


def _selects(selector: str, labels: dict) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class KubernetesApi:
    def __init__(self, namespace: str = "posttrain"):
        self.namespace = namespace
        self.behaviour = Behaviour()
        self.trainjobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.logs: dict[str, list[str]] = {}
        self.created: list[str] = []
        self.last_created: dict | None = None
        """The last TrainJob created, as the client sent it."""
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.log_streams: dict[str, int] = {}
        """Followed log streams opened, by pod."""
        self.cond = threading.Condition()
        self._clock = 0
        self._validate = _crd_validator()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- lifecycle
    def __enter__(self) -> KubernetesApi:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.trainjobs.clear()
            self.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # --- what a test sets up or asks
    def add_pod(self, pod: dict) -> None:
        """A pod that is no TrainJob's (e.g. the step's own)."""
        with self.cond:
            self.pods[pod["metadata"]["name"]] = pod

    def wait_for(self, predicate: Callable[[], bool], seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the fake Kubernetes API never reached the awaited state")
                self.cond.wait(min(left, 0.1))

    def log_lines(self, name: str) -> int:
        """Lines written so far by the pods of TrainJob `name`."""
        with self.cond:
            return sum(len(self.logs.get(p, [])) for p, pod in self.pods.items()
                       if pod["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name)

    def finish(self, name: str, outcome: str = "Complete", reason: str = "", message: str = "") -> None:
        """End a TrainJob that runs until told (Behaviour.outcome None)."""
        with self.cond:
            job = self.trainjobs[name]
            job["_behaviour"].outcome, job["_behaviour"].reason, job["_behaviour"].message = outcome, reason, message
            self.cond.notify_all()

    # --- the controller
    def _log(self, pod: str, text: str) -> None:
        self._clock += 1
        self.logs.setdefault(pod, []).append(f"{_stamp(self._clock)} {text}")

    def _play(self, name: str, behaviour: Behaviour) -> None:
        time.sleep(0.05)
        with self.cond:
            job = self.trainjobs.get(name)
            if job is None:
                return
            uid = job["metadata"]["uid"]
            nodes = job["spec"]["trainer"].get("numNodes", 1)
            pods = [f"{name}-node-0-{i}-x{i}" for i in range(nodes)]
            for i, pod in enumerate(pods):
                self.pods[pod] = {"metadata": {"name": pod, "namespace": self.namespace, "labels": {
                    "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/job-index": str(i)}},
                    "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}]},
                    "status": {"phase": "Running"}}
            self.cond.notify_all()

        def alive() -> bool:
            current = self.trainjobs.get(name)
            return current is not None and current["metadata"]["uid"] == uid

        for line in behaviour.lines:
            time.sleep(behaviour.interval)
            with self.cond:
                if not alive():
                    return
                for i, pod in enumerate(pods):
                    self._log(pod, f"rank {i}: {line}")
                self.cond.notify_all()
        with self.cond:
            while alive() and behaviour.outcome is None:
                self.cond.wait(0.1)
            if not alive():
                return
        if behaviour.outcome == "Complete" and behaviour.on_complete:
            behaviour.on_complete(self.trainjobs[name])
        with self.cond:
            if not alive():
                return
            failed = behaviour.outcome == "Failed"
            for i, pod in enumerate(pods):
                if failed and i == len(pods) - 1:
                    self._log(pod, "Traceback (most recent call last): RuntimeError: NCCL timeout")
                self.pods[pod]["status"]["phase"] = "Failed" if failed else "Succeeded"
            self.trainjobs[name]["status"] = {"conditions": [{
                "type": behaviour.outcome, "status": "True", "reason": behaviour.reason or behaviour.outcome,
                "message": behaviour.message, "lastTransitionTime": _stamp(self._clock)[:19] + "Z"}]}
            self.cond.notify_all()

    # --- the HTTP side
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "code": code})

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with api.cond:
                    api.requests.append((method, url.path))
                if m := TRAINJOBS.match(url.path):
                    return self._trainjobs(method, m.group(2), query)
                if m := PODS.match(url.path):
                    return self._pods(method, m.group(2), bool(m.group(3)), query)
                self._status(404, "NotFound", f"no route {method} {url.path}")

            def _public(self, job: dict) -> dict:
                return {k: v for k, v in job.items() if not k.startswith("_")}

            def _trainjobs(self, method: str, name: str | None, query: dict) -> None:
                if method == "POST" and name is None:
                    body = self._body()
                    errors = api._validate(body)
                    if errors:
                        return self._status(422, "Invalid", "; ".join(errors))
                    new = body["metadata"]["name"]
                    sent = json.loads(json.dumps(body))
                    with api.cond:
                        if new in api.trainjobs:
                            return self._status(409, "AlreadyExists", f'trainjobs "{new}" already exists')
                        body["metadata"]["uid"] = f"uid-{len(api.created)}"
                        body["_behaviour"] = api.behaviour
                        api.trainjobs[new] = body
                        api.created.append(new)
                        api.last_created = sent
                        api.cond.notify_all()
                    threading.Thread(target=api._play, args=(new, api.behaviour), daemon=True).start()
                    return self._send(201, self._public(body))
                if method == "GET" and name is None:
                    with api.cond:
                        items = [self._public(j) for j in api.trainjobs.values()
                                 if _selects(query.get("labelSelector", ""), j["metadata"].get("labels", {}))]
                    return self._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList",
                                            "metadata": {}, "items": items})
                with api.cond:
                    job = api.trainjobs.get(name)
                    if job is None:
                        return self._status(404, "NotFound", f'trainjobs "{name}" not found')
                    if method == "GET":
                        return self._send(200, self._public(job))
                    if method == "DELETE":
                        self._body()
                        del api.trainjobs[name]
                        for pod in [p for p, v in api.pods.items()
                                    if v["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name]:
                            del api.pods[pod]
                        api.deleted.append(name)
                        api.cond.notify_all()
                        return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                self._status(405, "MethodNotAllowed", method)

            def _pods(self, method: str, name: str | None, log: bool, query: dict) -> None:
                if method != "GET":
                    return self._status(405, "MethodNotAllowed", method)
                if name is None:
                    with api.cond:
                        items = [p for p in api.pods.values()
                                 if _selects(query.get("labelSelector", ""), p["metadata"]["labels"])]
                    return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                with api.cond:
                    pod = api.pods.get(name)
                if pod is None:
                    return self._status(404, "NotFound", f'pods "{name}" not found')
                if not log:
                    return self._send(200, pod)
                self._stream_log(name, query.get("follow", "").lower() == "true",
                                 query.get("timestamps", "").lower() == "true")

            def _stream_log(self, name: str, follow: bool, timestamps: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Connection", "close")
                self.end_headers()
                sent = 0
                with api.cond:
                    api.log_streams[name] = api.log_streams.get(name, 0) + 1
                    job = api.trainjobs.get(api.pods[name]["metadata"]["labels"].get(
                        "jobset.sigs.k8s.io/jobset-name", ""), {})
                    cut = job.get("_behaviour") and job["_behaviour"].drop_log_after
                    cut = cut if api.log_streams[name] == 1 else None
                while True:
                    with api.cond:
                        lines = list(api.logs.get(name, []))
                        pod = api.pods.get(name)
                        ended = pod is None or pod["status"]["phase"] in ("Succeeded", "Failed")
                        if cut is not None and len(lines) >= cut and not ended:
                            lines, ended = lines[:cut], True  # the connection drops
                        if sent >= len(lines) and follow and not ended:
                            api.cond.wait(0.1)
                            continue
                    for line in lines[sent:]:
                        self.wfile.write(((line if timestamps else line.partition(" ")[2]) + "\n").encode())
                    self.wfile.flush()
                    sent = len(lines)
                    if not follow or ended:
                        return

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler
