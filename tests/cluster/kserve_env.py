"""The emulated cluster with KServe for the deploy tests: an install as its docs build it plus k8s/overlays/kserve,
the reader Secret as an operator creates it, and MinIO (the session's S3) behind the network's policies."""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager
from pathlib import Path

from cluster import installs
from cluster.kube import KubeApi
from cluster.network import Network
from components.trainjob import API_ENV

REPO = Path(__file__).resolve().parents[2]
NS, RUNNER, READER = "posttrain", "posttrain-pipeline-runner", "posttrain-minio-reader"


def _validate():
    spec = importlib.util.spec_from_file_location("k8s_validate", REPO / "k8s" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _validate()


def kserve_objects(install: str = "plain") -> tuple[list[dict], dict]:
    """An install as its docs build it (tests/cluster/installs.py), then `kubectl apply -k k8s/overlays/kserve`."""
    rendered = installs.render(install)
    objects = {installs._key(o): o for o in copy.deepcopy(rendered.objects)}
    for obj in validate.render(REPO / "k8s" / "overlays" / "kserve"):
        objects[installs._key(obj)] = obj
    return list(objects.values()), rendered.namespaces


def reader_secret(objects: list[dict], secrets: dict) -> None:
    """The posttrain-minio-reader Secret as an operator creates it: the template's annotations, real keys."""
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == READER)
    secret["stringData"] = {k: secrets[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


@contextmanager
def emulated_kserve(workdir: Path, s3_endpoint: str, secrets: dict, monkeypatch):
    """The emulated API (plain install + kserve overlay) with MinIO at `s3_endpoint` behind the network's policies;
    this process (and the steps it starts) talks to it as the pipeline runner."""
    objects, namespaces = kserve_objects("plain")
    reader_secret(objects, secrets)
    host, _, port = s3_endpoint.removeprefix("http://").partition(":")
    net = Network(objects, namespaces)
    minio = installs.render("plain").services["minio"]
    net.add_service(minio.host, minio.port, minio.namespace, minio.labels, (host, int(port)))
    api = KubeApi(objects, namespaces, workdir=workdir)
    api.network = net
    with api, net:
        monkeypatch.setenv(API_ENV, api.proxy(NS, RUNNER))
        yield api
