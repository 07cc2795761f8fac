"""data_prep stage: read every data source, normalize it to the three row shapes, filter, split and check it.

    python -m components.data_prep --config data_prep.yaml      (or: posttrain stage data_prep --config …)

A source is a file or a directory of files (JSONL, JSON, Parquet, CSV, or a `datasets` save_to_disk
directory; gzip or zstd compressed or not: components/sources/readers.py), local or s3://, or a bundled
task by name. Its rows, in one of the named input formats (sft, messages, sharegpt, alpaca, preference,
preference_messages, hh, prompts: components/sources/formats.py), become rows of one shape (sft,
preference or prompts; see components/datasets.py), and every row is validated and rendered through the
tokenizer's chat template. Then, in this order: rows of a `role: both` source go to train or eval by a
hash of their prompt, so one prompt never lands on both sides; exact duplicates (equal after whitespace
and Unicode normalization) are removed; rows longer than `max_length` tokens, counted exactly as training
counts them, are removed; eval rows whose prompt also occurs in any training row are marked
`contaminated: true` (or removed).

Nothing is skipped silently: every removed row is in rejected.jsonl with its file, line, field and reason,
and counted in stats.json. A source with more than `max_bad_fraction` invalid rows fails the stage with the
first of them listed by file:line.

Outputs in `output_dir`: <shape>.<role>.jsonl (sft.train.jsonl, preference.eval.jsonl, prompts.eval.jsonl,
...; eval rows carry `contaminated`), stats.json and rejected.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jinja2 import TemplateError
from tqdm import tqdm

from components.config import stage_main
from components.data_prep.config import DataPrepConfig, FileSource, TaskSource
from components.datasets import (
    DataError,
    RowError,
    check_bad_fraction,
    prompt_key,
    reason_key,
    row_key,
    write_jsonl,
)
from components.models import load_tokenizer
from components.sources.formats import ALPACA_TEMPLATE, RowReader
from components.sources.readers import READERS, BrokenFile, source_files
from components.templates import render_prompt_completion

log = logging.getLogger("components.data_prep")

# Fixed token-length bin edges, so histograms of different runs and datasets compare bin by bin.
LENGTH_BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# The completion fields of each shape: a row's length is its prompt plus its longest completion.
COMPLETIONS = {"sft": ("completion",), "preference": ("chosen", "rejected"), "prompts": ()}


# --- Reading (components/sources/readers.py): every file yields (line, row | RowError); a file that breaks
# where its lost rows cannot be counted fails its source.

def _local(uri: str) -> Path:
    if uri.startswith("s3://"):
        from components.storage import localize  # only S3 sources need the storage client

        return Path(localize(uri))
    return Path(uri)


def read_source(src: FileSource | TaskSource, report: SourceReport) -> Iterator[tuple[str, int, dict | RowError]]:
    """(file, line, raw row or what is wrong with it) for every row of a source, files named as the uri names
    them; files read and ignored are recorded in `report`."""
    if isinstance(src, TaskSource):
        from components.tasks import get_task

        rows = get_task(src.task).generate(src.rows, seed=src.seed, split=src.split, part=src.part)
        for line, row in enumerate(rows, 1):
            yield f"task:{src.name}", line, row
        return
    where = f"source {src.name!r}" + (f" ({src.uri})" if src.name != src.uri else "")
    try:
        root = _local(src.uri)
        files, ignored = source_files(root, src.format)
    except (DataError, FileNotFoundError) as e:
        raise DataError(f"{where}: {e}") from None

    def display(p: Path) -> str:
        return src.uri if p == root else f"{src.uri.rstrip('/')}/{p.relative_to(root).as_posix()}"

    report.ignored = [display(p) for p in ignored]
    for p in report.ignored:
        log.warning("source %r: ignored %s (unknown extension or hidden name; set format to read it)", src.name, p)
    for path, fmt in files:
        name = display(path)
        report.files[name] = 0
        try:
            for line, row in READERS[fmt](path, name):
                yield name, line, row
        except BrokenFile as e:  # the other files are still read: every broken one is named
            report.broken[name] = str(e)
        except OSError as e:
            report.broken[name] = f"cannot be read ({e})"


# --- Rows on their way to the outputs.

@dataclass(slots=True)
class Row:
    """A valid row in normal form, with where it came from and what it measures."""
    data: dict
    file: str
    line: int
    key: str              # prompt_key of its prompt: identity for splitting and contamination
    texts: list[str]      # the rendered prompt, then each rendered completion
    role: str = ""
    tokens: int = 0


@dataclass
class SourceReport:
    """What happened to every row of one source."""
    src: FileSource | TaskSource
    files: Counter = field(default_factory=Counter)      # file → rows read
    ignored: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # file → why its lost rows cannot be counted
    invalid: list[RowError] = field(default_factory=list)
    removed: list[RowError] = field(default_factory=list)  # valid rows removed: duplicates, overlong, contaminated
    rows: list[Row] = field(default_factory=list)
    contaminated: int = 0


def render(tokenizer, shape: str, row: dict) -> list[str]:
    """The row as training sees it: the rendered prompt, then each rendered completion."""
    completions = [row[c] for c in COMPLETIONS[shape]]
    prompt_text = render_prompt_completion(tokenizer, row["prompt"], completions[0] if completions else "")[0]
    return [prompt_text] + [render_prompt_completion(tokenizer, row["prompt"], c)[1] for c in completions]


def count_tokens(tokenizer, texts: list[str], chunk: int = 4096) -> list[int]:
    """Token counts as training encodes texts: no special tokens added, the chat template wrote them."""
    counts: list[int] = []
    for i in range(0, len(texts), chunk):
        counts += [len(ids) for ids in tokenizer(texts[i:i + chunk], add_special_tokens=False)["input_ids"]]
    return counts


def on_eval_side(key: str, seed: int, eval_fraction: float) -> bool:
    """Whether a prompt goes to eval: sha256 of (seed, prompt) below eval_fraction of the hash range, the same
    in every process and on every machine."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


def validate_source(report: SourceReport, cfg: DataPrepConfig, tokenizer) -> None:
    """Read, map, validate and render every row of a source; fail when too many are invalid."""
    src = report.src
    parse = RowReader(src.shape, getattr(src, "schema", "auto"), getattr(src, "fields", {}),
                      getattr(src, "split", None), getattr(src, "alpaca_template", None) or ALPACA_TEMPLATE)
    for file, line, raw in tqdm(read_source(src, report), desc=src.name, unit=" rows", disable=None):
        report.files[file] += 1
        row = raw if isinstance(raw, RowError) else parse(raw, file, line)
        if not isinstance(row, RowError):
            try:
                texts = render(tokenizer, src.shape, row)
            except (ValueError, TypeError, TemplateError) as e:
                row = RowError(file, line, parse.fields.get("prompt", "prompt"),
                               f"the chat template cannot render it ({e})")
        if isinstance(row, RowError):
            report.invalid.append(row)
        else:
            report.rows.append(Row(row, file, line, prompt_key(row["prompt"]), texts))
    total = sum(report.files.values())
    if report.broken:
        listed = "\n  ".join(f"{f}: {why} ({report.files[f]} rows read before it)" for f, why in report.broken.items())
        raise DataError(f"source {src.name!r}: {len(report.broken)} file(s) break midway, and the rows they lost "
                        f"cannot be counted (fix, re-export or remove them):\n  {listed}")
    if total == 0:
        raise DataError(f"source {src.name!r}: no rows found")
    limit = cfg.max_bad_fraction if src.max_bad_fraction is None else src.max_bad_fraction
    check_bad_fraction(report.invalid, total, limit, f"source {src.name!r}")


def filter_source(report: SourceReport, cfg: DataPrepConfig, tokenizer, seen: dict[tuple, str]) -> None:
    """Give each row its role, then remove exact duplicates (of any earlier row of the same shape and role,
    `seen`) and rows longer than max_length."""
    src, rows = report.src, report.rows
    for r in rows:
        r.role = src.role if src.role != "both" else (
            "eval" if on_eval_side(r.key, cfg.seed, cfg.eval_fraction) else "train")
    unique = []
    for r in rows:
        first = seen.setdefault((src.shape, r.role, row_key(r.data)), f"{r.file}:{r.line}")
        if first != f"{r.file}:{r.line}":
            report.removed.append(RowError(r.file, r.line, "", f"duplicate (of {first})"))
        else:
            unique.append(r)
    counts = iter(count_tokens(tokenizer, [t for r in unique for t in r.texts]))
    report.rows = []
    for r in unique:
        r.tokens = next(counts) + max((next(counts) for _ in r.texts[1:]), default=0)
        r.texts = []
        if r.tokens > cfg.max_length:
            report.removed.append(RowError(r.file, r.line, "", f"longer than max_length ({r.tokens} tokens > "
                                                               f"{cfg.max_length})"))
        else:
            report.rows.append(r)


def mark_contamination(reports: list[SourceReport], mode: str) -> None:
    """Mark every eval row whose prompt occurs in training data (`contaminated`), or remove it (mode drop)."""
    trained: dict[str, str] = {}
    for rep in reports:
        for r in rep.rows:
            if r.role == "train":
                trained.setdefault(r.key, f"{r.file}:{r.line}")
    for rep in reports:
        kept = []
        for r in rep.rows:
            if r.role == "eval":
                hit = trained.get(r.key)
                r.data["contaminated"] = hit is not None
                rep.contaminated += hit is not None
                if hit and mode == "drop":
                    rep.removed.append(RowError(r.file, r.line, "", f"contaminated (its prompt is in training "
                                                                    f"data at {hit})"))
                    continue
            kept.append(r)
        rep.rows = kept


# --- Statistics.

def length_stats(lengths: list[int]) -> dict:
    """Min, max, mean and a histogram over the fixed LENGTH_BINS (every bin listed, empty ones too)."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:])] + [f"{LENGTH_BINS[-1]}+"]
    hist = dict.fromkeys(labels, 0)
    for n in lengths:
        hist[labels[sum(n >= edge for edge in LENGTH_BINS[1:])]] += 1
    mean = round(sum(lengths) / len(lengths), 2) if lengths else None
    return {"min": min(lengths, default=None), "max": max(lengths, default=None), "mean": mean, "histogram": hist}


def source_stats(rep: SourceReport) -> dict:
    errors = rep.invalid + rep.removed
    dropped = Counter(reason_key(e) for e in errors)
    dropped_in = Counter(e.file for e in errors)
    causes: dict[str, Counter] = {}
    for e in errors:
        causes.setdefault(e.file, Counter())[reason_key(e)] += 1
    return {
        "source": asdict(rep.src),
        "rows": sum(rep.files.values()),
        "kept": len(rep.rows),
        "train": sum(r.role == "train" for r in rep.rows),
        "eval": sum(r.role == "eval" for r in rep.rows),
        "dropped": dict(sorted(dropped.items())),
        "duplicates": dropped["duplicate"],
        "contaminated": rep.contaminated,
        "tokens": length_stats([r.tokens for r in rep.rows]),
        "files": {f: {"rows": n, "kept": n - dropped_in[f], "dropped": dropped_in[f],
                      "dropped_by": dict(sorted(causes.get(f, Counter()).items()))} for f, n in rep.files.items()},
        "ignored_files": rep.ignored,
    }


def _write_rejected(path: Path, reports: list[SourceReport]) -> None:
    write_jsonl(path, ({"source": rep.src.name, **asdict(e)} for rep in reports
                       for e in sorted(rep.invalid + rep.removed, key=lambda e: (e.file, e.line))))


# --- The stage.

def run(cfg: DataPrepConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.train.jsonl"), *out.glob("*.eval.jsonl"), out / "stats.json", out / "rejected.jsonl"]:
        stale.unlink(missing_ok=True)  # a rerun never leaves an earlier run's files behind
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)

    reports = [SourceReport(src) for src in cfg.sources]
    seen: dict[tuple, str] = {}
    try:
        for rep in reports:
            validate_source(rep, cfg, tokenizer)
            filter_source(rep, cfg, tokenizer, seen)
            log.info("source %r: %d rows read, %d invalid, %d removed, %d kept", rep.src.name,
                     sum(rep.files.values()), len(rep.invalid), len(rep.removed), len(rep.rows))
    except DataError as e:
        _write_rejected(out / "rejected.jsonl", reports)
        if any(rep.invalid or rep.removed for rep in reports):
            raise DataError(f"{e}\nevery rejected row so far: {out / 'rejected.jsonl'}") from None
        raise
    mark_contamination(reports, cfg.contamination)

    outputs: dict[str, list[dict]] = {}
    for rep in reports:
        for r in rep.rows:
            outputs.setdefault(f"{rep.src.shape}.{r.role}.jsonl", []).append(r.data)
    if not outputs:
        raise DataError("no rows kept from any source (see the counts in the log)")
    for name, rows in outputs.items():
        write_jsonl(out / name, rows)
    _write_rejected(out / "rejected.jsonl", reports)

    sources = {rep.src.name: source_stats(rep) for rep in reports}
    dropped = sum((Counter(s["dropped"]) for s in sources.values()), Counter())
    stats = {
        "outputs": {name: len(rows) for name, rows in sorted(outputs.items())},
        "totals": {"rows": sum(s["rows"] for s in sources.values()), "kept": sum(s["kept"] for s in sources.values()),
                   "dropped": dict(sorted(dropped.items())), "duplicates": dropped["duplicate"],
                   "contaminated": sum(s["contaminated"] for s in sources.values()),
                   "tokens": length_stats([r.tokens for rep in reports for r in rep.rows])},
        "sources": sources,
        "settings": {"tokenizer": cfg.tokenizer, "max_length": cfg.max_length, "eval_fraction": cfg.eval_fraction,
                     "seed": cfg.seed, "contamination": cfg.contamination, "length_bins": list(LENGTH_BINS)},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    log.info("wrote %s", ", ".join(f"{n} ({c} rows)" for n, c in stats["outputs"].items()))
    return stats


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, DataPrepConfig, run, argv)


if __name__ == "__main__":
    main()
