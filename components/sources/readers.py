"""Reading data files into rows: JSONL, JSON, CSV, Parquet and Arrow, plain or compressed, row by row.

Every reader yields (line, row | RowError) for each row of a file, so every row is accounted for:
- Text is UTF-8, with or without a byte order mark (utf-8-sig: an Excel CSV's header, a .json, line 1 of
  a JSONL). Bytes that are not valid UTF-8 make their row bad ("not valid UTF-8"); they are never replaced.
- gzip (.gz) and zstd (.zst) files are decompressed as a stream, told by their first bytes, so a compressed
  file is read whatever its name and whatever `format` says about the text inside.
- A file that breaks midway (a truncated JSON array, a half-written Parquet or Arrow file, a truncated
  gzip stream, CSV that stops parsing) raises `BrokenFile` when the rows it lost cannot be counted; a Parquet
  row group that cannot be read makes each of its rows (counted from the file's metadata) a bad row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from components.datasets import DataError, RowError

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "datasets")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "datasets"}
COMPRESSED = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
BOM = b"\xef\xbb\xbf"
# What a decompressor raises on a truncated or corrupt stream.
STREAM_ERRORS = (EOFError, OSError, zlib.error)


class BrokenFile(Exception):
    """A file that breaks midway, so the rows after the break cannot be counted: its source fails."""


def file_format(path: Path) -> str | None:
    """The format a file's extension names, looking through a compression extension (a.jsonl.gz: jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def compression(path: Path) -> str | None:
    """gzip or zstd when the file's first bytes say so, else None."""
    with path.open("rb") as f:
        head = f.read(4)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed as a stream when it is gzip or zstd."""
    kind = compression(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        import pyarrow as pa  # pyarrow carries a zstd codec: no extra dependency

        if not pa.Codec.is_available("zstd"):
            raise BrokenFile("zstd-compressed, and this pyarrow has no zstd codec: decompress it first")
        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), "zstd"))
    return path.open("rb")


def _stream_error(e: BaseException, after: str) -> BrokenFile:
    return BrokenFile(f"the compressed stream breaks {after} ({type(e).__name__}: {e}): the rows after it cannot "
                      f"be counted")


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1} of the row)"


_SURROGATE = re.compile("[\ud800-\udfff]")


def bad_text(value, name: str = "") -> str | None:
    """Where a row holds text that is not valid Unicode: bytes that are not UTF-8 (read as lone surrogates
    by surrogateescape) or a JSON escape of a lone surrogate. None when every string is valid."""
    if isinstance(value, str):
        return name if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        key = str(key)
        found = bad_text(v, f"{name}{key}" if key.startswith("[") or not name else f"{name}.{key}")
        if found is not None:
            return found or key
    return None


def _checked(name: str, line: int, row) -> dict | RowError:
    if not isinstance(row, dict):
        return RowError(name, line, "", f"expected an object with named fields (got {type(row).__name__})")
    where = bad_text(row)
    if where is not None:
        return RowError(name, line, where, "not valid UTF-8 (bytes that are no UTF-8 text, or an escaped lone "
                                           "surrogate)")
    return row


def read_jsonl(path: Path, name: str) -> Iterator[tuple[int, dict | RowError]]:
    """One row per non-blank line; a BOM before line 1 is skipped."""
    lineno = 0
    with open_bytes(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, RowError(name, lineno, "", _utf8_error(e))
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    yield lineno, RowError(name, lineno, "", f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    yield lineno, RowError(name, lineno, "", f"expected a JSON object, got {type(row).__name__}")
                    continue
                yield lineno, _checked(name, lineno, row)
        except STREAM_ERRORS as e:
            raise _stream_error(e, f"after line {lineno}") from None


def _complete_items(text: str) -> int:
    """How many complete elements a JSON array (or {"data": [...]}) holds before the text breaks."""
    dec, n = json.JSONDecoder(), 0
    m = re.match(r'\s*(?:\{\s*"data"\s*:\s*)?\[', text)
    if not m:
        return 0
    i = m.end()
    while True:
        i = re.compile(r"\s*,?\s*").match(text, i).end()
        try:
            _, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return n
        n += 1


def read_json(path: Path, name: str) -> Iterator[tuple[int, dict | RowError]]:
    """An array of rows, or {"data": [...]}; a row's line is its 1-based position."""
    try:
        with open_bytes(path) as f:
            data = f.read()
    except STREAM_ERRORS as e:
        raise _stream_error(e, "before its end") from None
    text = data.removeprefix(BOM).decode("utf-8", errors="surrogateescape")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise BrokenFile(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}) after "
                         f"{_complete_items(text)} complete rows: the rows after the break cannot be "
                         f"counted") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise BrokenFile('expected an array of rows or {"data": [...]}: its rows cannot be counted')
    for i, row in enumerate(rows, 1):
        yield i, _checked(name, i, row)


def _strict_error(lines: list[str]) -> str | None:
    """What a strict reading of a record's lines objects to (a quote that does not close where its field
    ends), None if nothing."""
    try:
        for _ in csv.reader(lines, strict=True):
            pass
    except csv.Error as e:
        return str(e)
    return None


def read_csv(path: Path, name: str) -> Iterator[tuple[int, dict | RowError]]:
    """A header, then a row per record; a row's line is the line its record ends on.

    The reading is lenient (a stray quote inside a field is kept as text), but a quote left open would make it
    read on, to the next quote or to the end of the file, swallowing the records after it into one row that
    then lacks its other columns. So a record that spans lines or lacks columns is read again strictly, and
    one that fails breaks the file, naming the line the record starts on and its column."""
    with open_bytes(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                   newline="") as f:
        record: list[str] = []  # the lines read since the last record

        def lines():
            for text in f:
                record.append(text)
                yield text

        reader = csv.DictReader(lines())
        try:
            header = reader.fieldnames  # (reads the header)
            record.clear()
            for row in reader:
                start = 0  # (blank lines before a record are skipped by the reader)
                while start < len(record) - 1 and not record[start].strip("\r\n"):
                    start += 1
                taken, first = record[start:], reader.line_num - len(record) + start + 1
                record.clear()
                if len(taken) > 1 or None in row.values():
                    problem = _strict_error(taken)
                    if problem is not None:
                        opened = [c for c in header if isinstance(row.get(c), str) and "\n" in row[c]]
                        column = (opened or [c for c in header if row.get(c) is not None] or [""])[-1]
                        raise BrokenFile(f"line {first}, column {column!r}: a quote that does not close where its "
                                         f"field ends ({problem}); read on, it swallows the records after it, so "
                                         f"they cannot be counted (close the quote, or double a quote inside a "
                                         f"quoted field)")
                if None in row:  # DictReader files surplus values under the key None
                    yield reader.line_num, RowError(name, reader.line_num, "", f"more values than the header's "
                                                    f"{len(reader.fieldnames)} columns")
                else:
                    yield reader.line_num, _checked(name, reader.line_num, row)
        except csv.Error as e:
            raise BrokenFile(f"not valid CSV at line {reader.line_num} ({e}): the rows after it cannot be "
                             f"counted") from None
        except STREAM_ERRORS as e:
            raise _stream_error(e, f"after line {reader.line_num}") from None


def _uncompressed(path: Path, what: str) -> None:
    if compression(path):
        raise BrokenFile(f"a compressed {what} file: {what} compresses its own columns; decompress it first")


def read_parquet(path: Path, name: str) -> Iterator[tuple[int, dict | RowError]]:
    """Row group by row group: a group that cannot be read makes each of its rows bad (the footer counts them);
    a file whose footer cannot be read (half-written) is broken."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _uncompressed(path, "Parquet")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BrokenFile(f"not a readable Parquet file ({e}): its rows cannot be counted") from None
    line = 0
    for g in range(pf.num_row_groups):
        try:
            rows = pf.read_row_group(g).to_pylist()
        except (pa.ArrowException, OSError) as e:
            for _ in range(pf.metadata.row_group(g).num_rows):
                line += 1
                yield line, RowError(name, line, "", f"in an unreadable Parquet row group ({e})")
            continue
        for row in rows:
            line += 1
            yield line, _checked(name, line, row)


def read_arrow(path: Path, name: str) -> Iterator[tuple[int, dict | RowError]]:
    """A `datasets` .arrow file: Arrow IPC in the stream format (what save_to_disk writes) or the file format,
    batch by batch; a file that breaks midway is broken (an Arrow stream does not say how many rows follow)."""
    import pyarrow as pa

    _uncompressed(path, "Arrow")
    line = 0
    with pa.memory_map(str(path)) as f:
        try:
            try:
                batches = iter(pa.ipc.open_stream(f))
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                for row in batch.to_pylist():
                    line += 1
                    yield line, _checked(name, line, row)
        except (pa.ArrowException, OSError) as e:
            raise BrokenFile(f"not a readable Arrow file after row {line} ({e}): the rows after the break cannot "
                             f"be counted") from None


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet, "datasets": read_arrow}


def _datasets_files(d: Path) -> list[Path]:
    """The .arrow files of a `datasets` save_to_disk directory, in their saved order."""
    if (d / "dataset_dict.json").is_file():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{d} is a DatasetDict with splits {', '.join(splits)}: point uri at one split's directory")
    state = d / "state.json"
    names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])] if state.is_file() else []
    return [d / n for n in names] or sorted(d.glob("*.arrow"))


def source_files(root: Path, fmt: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The files of a source with the format of each, and the files it ignores (unknown extension, or a name
    starting with . or _)."""
    if root.is_file():
        found = fmt if fmt != "auto" else file_format(root)
        if found is None:
            raise DataError(f"cannot tell the format from the extension {''.join(root.suffixes)!r}: set format "
                            f"to one of {', '.join(FORMATS[1:])}")
        return [(root, found)], []
    if not root.is_dir():
        raise DataError("no such file or directory")
    files, ignored = [], []

    def walk(d: Path) -> None:
        if fmt in ("auto", "datasets") and ((d / "state.json").is_file() or (d / "dataset_dict.json").is_file()):
            files.extend((p, "datasets") for p in _datasets_files(d))
            return
        for p in sorted(d.iterdir()):
            found = fmt if fmt != "auto" else file_format(p)
            if p.name.startswith((".", "_")):
                ignored.append(p)
            elif p.is_dir():
                walk(p)
            elif found:
                files.append((p, found))
            else:
                ignored.append(p)
    walk(root)
    return files, ignored
