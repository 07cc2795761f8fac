"""Storage: URIs that are local paths or `s3://bucket/key` (MinIO or any S3), through the `minio` client.

    localize(uri, cache_dir=None) -> Path   a local path as is; an s3:// file or directory downloaded (cached)
    upload(local_path, uri) -> str          a file to one object, a directory to objects under a prefix
    download(uri, dest, include=None) -> Path  an s3:// file or directory (or the files `include` keeps) to `dest`
    read_range(uri, offset, length) -> bytes   part of one object (a safetensors header)
    digest(uri) -> list                     what identifies the contents of a URI: S3 ETags and sizes, local sha256s
    bytes_downloaded() -> int               bytes this process has read from S3 (a step logs it)
    is_s3(uri) -> bool

Credentials come from the environment only (filled from the Kubernetes Secret `posttrain-minio`),
never from arguments that could end up in a pipeline parameter or a log: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, optionally AWS_DEFAULT_REGION; the endpoint from MLFLOW_S3_ENDPOINT_URL
(e.g. http://minio.posttrain:9000; `client(endpoint)` takes one explicitly for tools that check a given one).

A directory upload is atomic for readers. Files go up in parallel (a thread pool over files, and
multipart with parallel parts inside a large file), each carrying its sha256 as object metadata; then
`<prefix>/.posttrain-manifest.json` (every file's size and sha256); then, last, the completion marker
`<prefix>/.posttrain-complete` holding the manifest's sha256. A download refuses a prefix without the
marker, so a half-uploaded model is never read as complete, and verifies every file against the
manifest. Re-uploading to a prefix first removes its marker (objects of an earlier upload that the new
manifest does not list are left and never read); a rerun of an interrupted upload skips the files
already there with the right size and sha256. Every request is retried with exponential backoff
on transient errors (connection refused or reset, timeouts, 5xx, SlowDown). A manifest path that would
land outside the download directory is refused.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import io
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MANIFEST = ".posttrain-manifest.json"
COMPLETE = ".posttrain-complete"
RESERVED = (MANIFEST, COMPLETE)
PART_SIZE = 16 * 2**20
"""Multipart part size, and the chunk size of parallel ranged downloads."""
PARALLEL_PARTS = 4
"""Parts of one large file in flight at once (memory: workers × PARALLEL_PARTS × PART_SIZE)."""
WORKERS = 8
"""Files (or download chunks) transferred at once."""
RETRIES = 8
"""Attempts per request before an error is raised; waits double from 0.5 s up to 8 s (about 40 s in all)."""
TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}

T = TypeVar("T")

_received = [0]
_received_lock = threading.Lock()


def _count(n: int) -> None:
    with _received_lock:
        _received[0] += n


def bytes_downloaded() -> int:
    """Bytes this process has read from S3 (objects and manifests), for the step's log and metrics."""
    return _received[0]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def not_weights(path: str) -> bool:
    """An `include` filter for `download`: a model directory's config and tokenizer files, not its weights."""
    return not path.endswith(WEIGHT_SUFFIXES)


class IncompleteUploadError(FileNotFoundError):
    """A prefix holds objects but no completion marker: an upload is in progress or was interrupted."""


class IntegrityError(IOError):
    """Downloaded bytes do not match the manifest (size or sha256)."""


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> ("bucket", "a/b"); the key has no leading or trailing slash.

    A key with a `.` or `..` segment, an empty segment (`a//b`) or a backslash is refused: S3 keeps such keys
    literally, while the local cache path built from them (`<cache>/s3/<bucket>/<key>`) would mean another
    place, possibly outside the cache."""
    if not is_s3(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or bucket in (".", "..") or "\\" in bucket:
        raise ValueError(f"{uri!r} has no bucket: expected s3://bucket/key")
    key = key.strip("/")
    if key and ("\\" in key or any(part in ("", ".", "..") for part in key.split("/"))):
        raise ValueError(f"{uri!r}: the key {key!r} has an empty, '.' or '..' segment or a backslash; "
                         "expected s3://bucket/a/b with plain segments")
    return bucket, key


# ----------------------------------------------------------------------------------------------------
# Client and retries

def client(endpoint: str | None = None):
    """A Minio client for `endpoint` (default: MLFLOW_S3_ENDPOINT_URL), credentials from the environment."""
    import urllib3
    from minio import Minio

    url = urlparse(endpoint or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "https://s3.amazonaws.com")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"S3 endpoint {url.scheme}://{url.hostname}:{url.port} is invalid: "
                         "expected http(s)://host[:port] in MLFLOW_S3_ENDPOINT_URL")
    # few retries here: the loop in `_retry` owns the backoff, so an outage is seen and logged
    retries = urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504])
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=300), maxsize=WORKERS * PARALLEL_PARTS,
                               retries=retries)
    return Minio(url.netloc, access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                 secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"), secure=url.scheme == "https",
                 region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                 http_client=http)


def _transient(e: BaseException) -> bool:
    import urllib3
    from minio.error import S3Error, ServerError

    if isinstance(e, S3Error):
        return e.code in TRANSIENT_CODES
    return isinstance(e, (ServerError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _retry(fn: Callable[[], T], what: str) -> T:
    """Call `fn`, retrying transient errors with exponential backoff and jitter; other errors are raised at once."""
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            if attempt == RETRIES or not _transient(e):
                raise
            wait = min(0.5 * 2 ** (attempt - 1), 8.0) * random.uniform(0.8, 1.2)
            log.warning("%s: %s: %s; retry %d/%d in %.1fs", what, type(e).__name__, e, attempt, RETRIES - 1, wait)
            time.sleep(wait)
            attempt += 1


def _missing(e: BaseException) -> bool:
    from minio.error import S3Error

    return isinstance(e, S3Error) and e.code in ("NoSuchKey", "NoSuchObject", "NotFound")


# ----------------------------------------------------------------------------------------------------
# Manifest and paths

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def safe_relpath(rel: str, root: Path, where: str) -> Path:
    """`root / rel`, refusing a path that is absolute, has `..` or a backslash, or resolves outside `root`."""
    p = PurePosixPath(rel)
    target = (root / p).resolve()
    if (not rel or p.is_absolute() or ".." in p.parts or "\\" in rel
            or not target.is_relative_to(root.resolve())):
        raise ValueError(f"{where}: path {rel!r} would escape {root}; allowed: relative paths without '..'")
    return root / p


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    sha256: str


def _local_files(root: Path, workers: int, include: Callable[[str], bool] | None = None) -> list[Entry]:
    """Every file under `root` (symlinks followed; those `include` keeps) with its size and sha256, hashed in
    parallel."""
    paths = sorted(Path(d) / n for d, _, names in os.walk(root, followlinks=True) for n in names)
    paths = [p for p in paths if p.relative_to(root).as_posix() not in RESERVED  # a downloaded copy carries one
             and (include is None or include(p.relative_to(root).as_posix()))]
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        shas = list(pool.map(sha256_file, paths))
    return [Entry(p.relative_to(root).as_posix(), p.stat().st_size, sha) for p, sha in zip(paths, shas)]


def _manifest_bytes(entries: list[Entry]) -> bytes:
    return json.dumps({"version": 1, "files": [e.__dict__ for e in entries]}, indent=1).encode()


def _parse_manifest(data: bytes, where: str, root: Path) -> list[Entry]:
    try:
        files = json.loads(data)["files"]
        entries = [Entry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in files]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a posttrain manifest ({type(e).__name__}: {e})") from e
    for e in entries:
        safe_relpath(e.path, root, where)
    return entries


# ----------------------------------------------------------------------------------------------------
# Upload

def upload(local_path: str | Path, uri: str, *, workers: int = WORKERS) -> str:
    """Upload a file to the object `uri`, or a directory to the prefix `uri` (manifest, then marker last)."""
    src = Path(local_path)
    if not src.exists():
        raise FileNotFoundError(f"upload: {src} does not exist")
    if not is_s3(uri):
        dest = Path(uri)
        if src.resolve() != dest.resolve():
            _copy_local(src, dest)
        return str(dest)
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"upload: {uri!r} names a whole bucket; give a key: s3://{bucket}/some/path")
    c = client()
    if src.is_file():
        _put(c, bucket, key, src, sha256_file(src))
        return uri
    entries = _local_files(src, workers)
    _retry(lambda: c.remove_object(bucket, f"{key}/{COMPLETE}"), f"DELETE s3://{bucket}/{key}/{COMPLETE}")
    present = _existing(c, bucket, key, entries, workers)
    todo = [e for e in entries if e.path not in present]
    log.info("upload %s -> %s: %d files (%d already there), %.1f MB", src, uri, len(entries),
             len(entries) - len(todo), sum(e.size for e in todo) / 1e6)
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for f in futures.as_completed([pool.submit(_put, c, bucket, f"{key}/{e.path}", src / e.path, e.sha256)
                                       for e in todo]):
            f.result()
    manifest = _manifest_bytes(entries)
    _put_bytes(c, bucket, f"{key}/{MANIFEST}", manifest)
    _put_bytes(c, bucket, f"{key}/{COMPLETE}", hashlib.sha256(manifest).hexdigest().encode())
    return uri


def _existing(c, bucket: str, key: str, entries: list[Entry], workers: int) -> set[str]:
    """Paths of `entries` already uploaded under `key` with the same size and sha256 (a rerun skips them)."""
    by_path = {e.path: e for e in entries}
    listed = _retry(lambda: [(o.object_name, o.size) for o in c.list_objects(bucket, prefix=key + "/", recursive=True)],
                    f"LIST s3://{bucket}/{key}/")
    candidates = [rel for rel, size in ((name[len(key) + 1:], size) for name, size in listed)
                  if rel in by_path and by_path[rel].size == size]

    def matches(rel: str) -> bool:
        meta = _retry(lambda: c.stat_object(bucket, f"{key}/{rel}").metadata, f"HEAD s3://{bucket}/{key}/{rel}")
        return meta.get("x-amz-meta-sha256") == by_path[rel].sha256
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        return {rel for rel, ok in zip(candidates, pool.map(matches, candidates)) if ok}


def _put(c, bucket: str, key: str, path: Path, sha: str) -> None:
    _retry(lambda: c.fput_object(bucket, key, str(path), metadata={"sha256": sha}, part_size=PART_SIZE,
                                 num_parallel_uploads=PARALLEL_PARTS), f"PUT s3://{bucket}/{key}")


def _put_bytes(c, bucket: str, key: str, data: bytes) -> None:
    _retry(lambda: c.put_object(bucket, key, io.BytesIO(data), len(data),
                                metadata={"sha256": hashlib.sha256(data).hexdigest()}), f"PUT s3://{bucket}/{key}")


def _copy_local(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copy2(src, dest)
    else:
        shutil.copytree(src, dest, dirs_exist_ok=True)


# ----------------------------------------------------------------------------------------------------
# Download

def download(uri: str, dest: str | Path, *, workers: int = WORKERS,
             include: Callable[[str], bool] | None = None) -> Path:
    """Download the object or complete directory `uri` to `dest` (replaced when there); returns `dest`.

    `include` (a directory only) keeps the files whose path in the directory it accepts (e.g. `not_weights`);
    such a partial copy holds no manifest, so `localize` never takes it for a complete one.

    Raises IncompleteUploadError for a prefix without its completion marker, FileNotFoundError when
    nothing is there, IntegrityError when a file does not match its recorded size and sha256.
    """
    dest = Path(dest)
    if not is_s3(uri):
        _copy_local(Path(uri), dest)
        return dest
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"download: {uri!r} names a whole bucket; give an object or a prefix")
    c = client()
    kind, sha = _kind(c, bucket, key)
    tmp = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "file":
            size = _retry(lambda: c.stat_object(bucket, key).size, f"HEAD {uri}")
            _fetch(c, bucket, [(key, tmp, size)], workers)
            _verify(tmp, size, sha, uri)
        else:
            manifest = _get_bytes(c, bucket, f"{key}/{MANIFEST}")
            if hashlib.sha256(manifest).hexdigest() != sha:
                raise IntegrityError(f"{uri}: the manifest does not match the completion marker (an upload to "
                                     "this prefix is running); retry when it has finished")
            entries = _parse_manifest(manifest, f"{uri}/{MANIFEST}", tmp)
            if include is not None:
                entries = [e for e in entries if include(e.path)]
            tmp.mkdir()
            _fetch(c, bucket, [(f"{key}/{e.path}", tmp / e.path, e.size) for e in entries], workers)
            for e in entries:
                _verify(tmp / e.path, e.size, e.sha256, f"{uri}/{e.path}")
            if include is None:
                (tmp / MANIFEST).write_bytes(manifest)
        _remove(dest)
        tmp.rename(dest)
    finally:
        _remove(tmp)
    return dest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _kind(c, bucket: str, key: str) -> tuple[str, str | None]:
    """("file", its sha256 or None) for an object, ("dir", the manifest's sha256) for a complete prefix."""
    uri = f"s3://{bucket}/{key}"
    try:
        stat = _retry(lambda: c.stat_object(bucket, key), f"HEAD {uri}")
        return "file", stat.metadata.get("x-amz-meta-sha256")
    except Exception as e:
        if not _missing(e):
            raise
    try:
        return "dir", _get_bytes(c, bucket, f"{key}/{COMPLETE}").decode().strip()
    except Exception as e:
        if not _missing(e):
            raise
    first = _retry(lambda: next(iter(c.list_objects(bucket, prefix=key + "/", recursive=True)), None), f"LIST {uri}/")
    if first is not None:
        raise IncompleteUploadError(f"{uri}: objects are there but no completion marker ({COMPLETE}): an upload "
                                    "is running or was interrupted; rerun the upload to complete it")
    raise FileNotFoundError(f"{uri}: no such object or directory")


def _read_object(c, bucket: str, key: str, **byte_range) -> bytes:
    """One GET of an object (or of `offset`/`length` of it), its connection released, its bytes counted."""
    r = c.get_object(bucket, key, **byte_range)
    try:
        data = r.read()
    finally:
        r.close()
        r.release_conn()
    _count(len(data))
    return data


def _get_bytes(c, bucket: str, key: str) -> bytes:
    return _retry(lambda: _read_object(c, bucket, key), f"GET s3://{bucket}/{key}")


def _get_range(c, bucket: str, key: str, path: Path, offset: int, length: int) -> None:
    def get() -> None:
        data = _read_object(c, bucket, key, offset=offset, length=length)
        if len(data) != length:
            raise ConnectionError(f"short read: {len(data)} of {length} bytes")
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    _retry(get, f"GET s3://{bucket}/{key} [{offset}:{offset + length}]")


def _fetch(c, bucket: str, items: list[tuple[str, Path, int]], workers: int) -> None:
    """Parallel ranged GETs of every (object key, local path, size), in chunks of PART_SIZE."""
    chunks = []
    for obj, path, size in items:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        chunks += [(obj, path, off, min(PART_SIZE, size - off)) for off in range(0, size, PART_SIZE)]
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for f in futures.as_completed([pool.submit(_get_range, c, bucket, *ch) for ch in chunks]):
            f.result()


def _verify(path: Path, size: int, sha: str | None, where: str) -> None:
    """Size and (when recorded; objects written by other tools have none) sha256 must match."""
    got = path.stat().st_size
    if got != size or (sha and sha256_file(path) != sha):
        raise IntegrityError(f"{where}: downloaded bytes do not match the recorded size {size} and sha256 "
                             f"(got {got} bytes): the object was changed or corrupted")


# ----------------------------------------------------------------------------------------------------
# Localize

def default_cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain")


def localize(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local path for `uri`: a local path as is; an s3:// file or directory downloaded under `cache_dir`.

    A cached copy is reused when it still matches the remote (the manifest's sha256 for a directory,
    the object's sha256 for a file).
    """
    if not is_s3(uri):
        path = Path(str(uri).removeprefix("file://"))
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return path
    bucket, key = split_s3(str(uri))  # no '..' in the key: dest stays under the cache
    dest = Path(cache_dir or default_cache_dir()) / "s3" / bucket / key
    if dest.exists():
        kind, sha = _kind(client(), bucket, key)
        local = dest / MANIFEST if kind == "dir" else dest
        if sha and local.is_file() and (hashlib.sha256(local.read_bytes()).hexdigest() if kind == "dir"
                                        else sha256_file(local)) == sha:
            return dest
    return download(str(uri), dest)


# ----------------------------------------------------------------------------------------------------
# Partial reads and fingerprints

def read_range(uri: str, offset: int, length: int) -> bytes:
    """`length` bytes of the object `uri` from `offset` (fewer at its end); a local file is read in place."""
    if not is_s3(uri):
        with open(str(uri).removeprefix("file://"), "rb") as f:
            f.seek(offset)
            return f.read(length)
    bucket, key = split_s3(uri)
    c = client()

    return _retry(lambda: _read_object(c, bucket, key, offset=offset, length=length),
                  f"GET {uri} [{offset}:{offset + length}]")


def digest(uri: str, endpoint: str | None = None, include: Callable[[str], bool] | None = None) -> list[list]:
    """What identifies the contents of a file or a directory: [path, size, tag] per file (those `include`
    keeps), sorted by path.

    s3://: each object's ETag and size from one listing (nothing is downloaded; an object rewritten with other
    bytes gets another ETag). A local path: each file's sha256, so a copy or a checkout with new mtimes but the
    same bytes keeps its digest, and an edit that keeps size and mtime does not.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        c = client(endpoint)
        objects = _retry(lambda: [(o.object_name, o.size, o.etag) for o in c.list_objects(bucket, prefix=key,
                                                                                           recursive=True)],
                         f"LIST {uri}")
        found = [[name[len(key):].lstrip("/"), size, (etag or "").strip('"')] for name, size, etag in objects
                 if name == key or name.startswith(key.rstrip("/") + "/") or not key]
        if not found:
            raise FileNotFoundError(f"{uri}: no such object or prefix")
        return sorted(f for f in found if f[0] not in RESERVED and (include is None or include(f[0])))
    root = Path(str(uri).removeprefix("file://"))
    if root.is_file():
        return [["", root.stat().st_size, sha256_file(root)]]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    return [[e.path, e.size, e.sha256] for e in _local_files(root, WORKERS, include)]
