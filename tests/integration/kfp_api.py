"""The part of the KFP v2beta1 REST API that kfp.Client calls to upload, run and schedule (create, list, get,
disable, enable and delete recurring runs), on loopback.

No KFP can run here, so tests start this server (http.server in a thread) and point kfp.Client at it. It keeps
pipelines, versions, experiments, runs and recurring runs in memory, answers as the real API server does
(the fields kfp_server_api reads), and records every request (method, path, query, JSON body or multipart
parts) so a test can assert on exactly what the client sent.

    with KfpApi() as api:
        client = kfp.Client(host=api.url)
        ...
        api.requests_to("POST", "/apis/v2beta1/runs")
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _filter_name(query: dict) -> str | None:
    """The display_name an EQUALS predicate of the `filter` query parameter asks for."""
    if "filter" not in query:
        return None
    for p in json.loads(query["filter"]).get("predicates", []):
        if p.get("key") in ("display_name", "name") and p.get("operation") in ("EQUALS", 1):
            return p.get("stringValue", p.get("string_value"))
    return None


class KfpApi:
    """An in-memory KFP API server on 127.0.0.1 (a free port), recording requests."""

    def __init__(self):
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Request(method, url.path, query)
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):
                    msg = BytesParser(policy=HTTP).parsebytes(
                        f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                    for part in msg.iter_parts():
                        req.files[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
                elif raw:
                    req.body = json.loads(raw)
                api.requests.append(req)
                status, doc = api.route(req)
                self._answer(status, doc)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KfpApi:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests_to(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == PREFIX + path]

    # --- the API

    def _new_version(self, pipeline_id: str, name: str, description: str | None, spec: bytes) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                   "description": description or "", "created_at": _now()}
        self.versions.setdefault(pipeline_id, []).append(version)
        return version

    def route(self, req: Request) -> tuple[int, dict]:
        path, q = req.path.removeprefix(PREFIX), req.query
        if req.method == "GET" and path == "/healthz":
            return 200, {"multi_user": False}
        if req.method == "GET" and path == "/pipelines":
            name = _filter_name(q)
            found = [p for p in self.pipelines.values() if name is None or p["display_name"] == name]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if req.method == "POST" and path == "/pipelines/upload":
            pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": q["name"],
                        "description": q.get("description", ""), "created_at": _now()}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._new_version(pipeline["pipeline_id"], q["name"], q.get("description"), req.files["uploadfile"])
            return 200, pipeline
        if req.method == "POST" and path == "/pipelines/upload_version":
            if q.get("pipelineid") not in self.pipelines:
                return 404, {"error": f"pipeline {q.get('pipelineid')} not found", "code": 5}
            return 200, self._new_version(q["pipelineid"], q["name"], q.get("description"), req.files["uploadfile"])
        if req.method == "GET" and path.startswith("/pipelines/") and path.endswith("/versions"):
            versions = sorted(self.versions.get(path.split("/")[2], []), key=lambda v: v["created_at"],
                              reverse=q.get("sort_by", "").endswith("desc"))
            versions = versions[:int(q.get("page_size", 10))]
            return 200, {"pipeline_versions": versions, "total_size": len(versions)}
        if req.method == "GET" and path == "/experiments":
            name = _filter_name(q)
            found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if req.method == "POST" and path == "/experiments":
            exp = {**req.body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if req.method == "POST" and path == "/runs":
            run = {**req.body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
            self.runs[run["run_id"]] = run
            return 200, run
        if req.method == "GET" and path == "/runs":
            runs = [r for r in self.runs.values() if not q.get("experiment_id") or
                    r.get("experiment_id") == q["experiment_id"]]
            runs.sort(key=lambda r: r["created_at"], reverse=q.get("sort_by", "").endswith("desc"))
            runs = runs[:int(q.get("page_size", 10))]
            return 200, {"runs": runs, "total_size": len(runs)} if runs else {}
        if req.method == "POST" and path == "/recurringruns":
            job = {**req.body, "recurring_run_id": str(uuid.uuid4()),
                   "status": "DISABLED" if req.body.get("mode") == "DISABLE" else "ENABLED", "created_at": _now()}
            self.recurring_runs[job["recurring_run_id"]] = job
            return 200, job
        if req.method == "GET" and path == "/recurringruns":
            found = [j for j in self.recurring_runs.values() if not q.get("experiment_id") or
                     j.get("experiment_id") == q["experiment_id"]]
            name = _filter_name(q)
            found = [j for j in found if name is None or j.get("display_name") == name]
            found.sort(key=lambda j: j["created_at"], reverse=q.get("sort_by", "").endswith("desc"))
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
        if path.startswith("/recurringruns/"):
            job_id, _, action = path.removeprefix("/recurringruns/").partition(":")
            if job_id not in self.recurring_runs:
                return 404, {"error": f"recurring run {job_id} not found", "code": 5}
            if req.method == "GET" and not action:
                return 200, self.recurring_runs[job_id]
            if req.method == "DELETE" and not action:
                del self.recurring_runs[job_id]
                return 200, {}
            if req.method == "POST" and action in ("disable", "enable"):
                job = self.recurring_runs[job_id]
                job["status"], job["mode"] = ("DISABLED", "DISABLE") if action == "disable" else ("ENABLED", "ENABLE")
                return 200, {}
        return 404, {"error": f"{req.method} {req.path} is not part of this test server", "code": 5}
