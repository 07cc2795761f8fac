"""components.storage against a real S3 endpoint on loopback (moto server, or MinIO when configured):
verified round trips, the completion marker, an outage during an upload, an upload killed midway."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

BUCKET = "posttrain-data"


@pytest.fixture
def model_like(tmp_path):
    """A directory shaped like a model: one file bigger than a multipart part, small files, a subdirectory."""
    from components import storage

    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(storage.PART_SIZE + 123_457))
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "tokenizer.json").write_text("{}" * 1000)
    (d / "empty.txt").write_bytes(b"")
    return d


def _uri(tag: str) -> str:
    return f"s3://{BUCKET}/tests/{tag}-{uuid.uuid4().hex[:8]}"


def _same_tree(a, b) -> bool:
    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}

    fa, fb = files(a), files(b)
    fb.pop(".posttrain-manifest.json", None)
    return fa == fb


def test_directory_round_trip_is_verified_and_cached(s3_env, model_like, tmp_path):
    from components import storage

    uri = _uri("roundtrip")
    assert storage.upload(model_like, uri) == uri
    c = storage.client()
    manifest = json.loads(c.get_object(BUCKET, uri.split("/", 3)[3] + "/" + storage.MANIFEST).read())
    assert {f["path"]: f["size"] for f in manifest["files"]} == {
        "config.json": 8, "empty.txt": 0, "model.safetensors": storage.PART_SIZE + 123_457, "sub/tokenizer.json": 2000}
    out = storage.download(uri, tmp_path / "out")
    assert _same_tree(model_like, out)

    cached = storage.localize(uri, cache_dir=tmp_path / "cache")
    assert _same_tree(model_like, cached)
    mtime = (cached / "model.safetensors").stat().st_mtime_ns
    assert storage.localize(uri, cache_dir=tmp_path / "cache") == cached  # unchanged remote: no new download
    assert (cached / "model.safetensors").stat().st_mtime_ns == mtime
    assert storage.localize(model_like) == model_like  # a local path is returned as is

    # a single file keeps its sha256 as metadata and is verified too
    storage.upload(model_like / "config.json", uri + "-file.json")
    assert storage.download(uri + "-file.json", tmp_path / "one.json").read_text() == '{"a": 1}'
    with pytest.raises(FileNotFoundError, match="no such object or directory"):
        storage.download(_uri("missing"), tmp_path / "nothing")


def test_reader_refuses_incomplete_tampered_and_escaping(s3_env, model_like, tmp_path):
    import io

    from components import storage

    c = storage.client()
    uri = _uri("guarded")
    key = uri.split("/", 3)[3]
    storage.upload(model_like, uri)
    c.put_object(BUCKET, f"{key}/config.json", io.BytesIO(b'{"a": 2}'), 8)  # same size, other bytes
    with pytest.raises(storage.IntegrityError, match="config.json: downloaded bytes do not match"):
        storage.download(uri, tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()

    c.remove_object(BUCKET, f"{key}/{storage.COMPLETE}")
    with pytest.raises(storage.IncompleteUploadError, match="no completion marker"):
        storage.localize(uri, cache_dir=tmp_path / "cache")

    evil = json.dumps({"version": 1, "files": [{"path": "../../escaped.txt", "size": 2, "sha256": "0" * 64}]}).encode()
    c.put_object(BUCKET, f"{key}/{storage.MANIFEST}", io.BytesIO(evil), len(evil))
    marker = hashlib.sha256(evil).hexdigest().encode()
    c.put_object(BUCKET, f"{key}/{storage.COMPLETE}", io.BytesIO(marker), len(marker))
    with pytest.raises(ValueError, match=r"path '../../escaped.txt' would escape"):
        storage.download(uri, tmp_path / "x" / "y")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_upload_rides_out_an_s3_outage(s3_env, s3_proxy, monkeypatch, tmp_path, caplog):
    """The endpoint refuses and cuts every connection for 3 s in the middle of an upload; the upload completes."""
    from components import storage

    src = tmp_path / "many"
    src.mkdir()
    for i in range(60):
        (src / f"shard-{i:03d}.bin").write_bytes(os.urandom(50_000))
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_proxy.endpoint)
    s3_proxy.delay = 0.02
    uri = _uri("outage")
    key = uri.split("/", 3)[3]
    direct = storage.client(s3_env)
    result: dict = {}

    def upload() -> None:
        try:
            result["uri"] = storage.upload(src, uri, workers=2)
        except Exception as e:  # reported below
            result["error"] = e
    caplog.set_level(logging.WARNING, logger="components.storage")
    t = threading.Thread(target=upload)
    t.start()
    deadline = time.monotonic() + 60
    while len(list(direct.list_objects(BUCKET, prefix=key + "/", recursive=True))) < 10:
        assert time.monotonic() < deadline and t.is_alive(), result
        time.sleep(0.05)
    s3_proxy.pause()
    paused_at = len(list(direct.list_objects(BUCKET, prefix=key + "/", recursive=True)))
    time.sleep(3)
    s3_proxy.resume()
    t.join(timeout=120)
    assert result.get("uri") == uri, result
    assert paused_at < 60  # the outage began in the middle of the upload
    assert any("retry" in r.getMessage() for r in caplog.records)  # the outage was seen and retried
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env)
    assert _same_tree(src, storage.download(uri, tmp_path / "back"))


def test_killed_upload_is_invisible_and_a_rerun_completes_it(s3_env, s3_proxy, model_like, tmp_path, helpers,
                                                             caplog):
    from components import storage

    for i in range(150):
        (model_like / f"extra-{i:03d}.bin").write_bytes(os.urandom(4_000))
    uri = _uri("killed")
    key = uri.split("/", 3)[3]
    s3_proxy.delay = 0.03  # slow enough to be killed in the middle
    code = f"from components import storage; storage.upload({str(model_like)!r}, {uri!r}, workers=1)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=helpers.repo, stderr=subprocess.PIPE,
                            env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_proxy.endpoint})
    c = storage.client()
    deadline = time.monotonic() + 60
    while len(list(c.list_objects(BUCKET, prefix=key + "/", recursive=True))) < 10:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    there = len(list(c.list_objects(BUCKET, prefix=key + "/", recursive=True)))
    assert 10 <= there < 155  # a part of the files, and no marker
    with pytest.raises(storage.IncompleteUploadError):
        storage.download(uri, tmp_path / "half")
    assert not (tmp_path / "half").exists()

    s3_proxy.delay = 0
    caplog.set_level(logging.INFO, logger="components.storage")
    storage.upload(model_like, uri)
    skipped = int(re.search(r"154 files \((\d+) already there\)", caplog.text).group(1))
    assert skipped >= there  # the rerun skips what the killed upload finished (a request in flight may have landed)
    assert _same_tree(model_like, storage.download(uri, tmp_path / "whole"))


def test_model_steps_fetch_config_tokenizer_and_headers_only(s3_env, tiny_model_dir, tmp_path):
    """preflight and data_prep read the base model's config and tokenizer (preflight also each safetensors
    header): the weights are never downloaded, and the bytes read are counted."""
    from components import storage
    from components.models import model_files
    from components.preflight.main import check_model, sources_digest

    uri = storage.upload(tiny_model_dir, _uri("model"))
    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    before = storage.bytes_downloaded()
    part = model_files(uri, tmp_path / "part")
    assert (part / "config.json").is_file() and (part / "tokenizer.json").is_file()
    assert not list(part.glob("*.safetensors")) and not (part / storage.MANIFEST).exists()
    assert "tensors in safetensors" in check_model(uri)
    moved = storage.bytes_downloaded() - before
    assert 0 < moved < weights / 2, (moved, weights)

    # the fingerprint: ETags and sizes from a listing; other bytes under the same key change it
    data = _uri("data")
    storage.upload(_write(tmp_path / "a.jsonl", b'{"prompt": "1", "completion": "2"}\n'), data + "/a.jsonl")
    first, files = sources_digest([{"uri": data, "shape": "sft"}], uri)
    assert files >= 2 and sources_digest([{"uri": data, "shape": "sft"}], uri)[0] == first
    storage.upload(_write(tmp_path / "a.jsonl", b'{"prompt": "1", "completion": "3"}\n'), data + "/a.jsonl")
    assert sources_digest([{"uri": data, "shape": "sft"}], uri)[0] != first


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
