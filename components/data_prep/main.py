"""data_prep stage: read every data source, normalize it to the three row shapes, filter, split and check it.

    python -m components.data_prep --config data_prep.yaml      (or: posttrain stage data_prep --config …)

A source is a file or a directory of files (JSONL, JSON, Parquet, CSV, or a `datasets` save_to_disk
directory; gzip or zstd compressed or not: components/data_prep/readers.py), local or s3://, or a bundled
task by name. Its rows, in one of the named input formats (sft, messages, sharegpt, alpaca, preference,
preference_messages, hh, prompts: components/data_prep/formats.py), become rows of one shape (sft,
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

from components.config import from_mapping, stage_main
from components.data_prep.formats import ALPACA_TEMPLATE, SCHEMAS, SHAPE_SCHEMAS, RowReader, columns
from components.data_prep.readers import FORMATS, READERS, BrokenFile, source_files  # noqa: F401
from components.datasets import (
    PROMPT_SPLITS,
    ROW_FIELDS,
    DataError,
    RowError,
    check_bad_fraction,
    check_max_bad_fraction,
    prompt_key,
    reason_key,
    row_key,
    write_jsonl,
)
from components.models import load_tokenizer
from components.training.batching import render_prompt_completion

log = logging.getLogger("components.data_prep")

SHAPES = tuple(ROW_FIELDS)
ROLES = ("train", "eval", "both")
CONTAMINATION = ("flag", "drop")
# Fixed token-length bin edges, so histograms of different runs and datasets compare bin by bin.
LENGTH_BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# The completion fields of each shape: a row's length is its prompt plus its longest completion.
COMPLETIONS = {"sft": ("completion",), "preference": ("chosen", "rejected"), "prompts": ()}


def _check_common(src) -> None:
    if src.shape not in SHAPES:
        raise ValueError(f"shape={src.shape!r} is invalid: one of {', '.join(SHAPES)}")
    if src.role not in ROLES:
        raise ValueError(f"role={src.role!r} is invalid: one of {', '.join(ROLES)}")
    if src.max_bad_fraction is not None:
        check_max_bad_fraction(src.max_bad_fraction)


@dataclass(kw_only=True)
class FileSource:
    """Rows from a file or a directory of files, local or s3://."""

    uri: str
    """A file, or a directory read recursively in sorted order (names starting with . or _ are ignored);
    a local path or s3://bucket/key."""
    shape: str
    """The row shape the rows map onto: sft, preference or prompts."""
    format: str = "auto"
    """The file format: jsonl, json (an array, or {"data": [...]}), parquet, csv (with a header), datasets (a
    save_to_disk directory), or auto: by extension (through .gz or .zst: a.jsonl.gz is jsonl), and a directory
    holding state.json is a datasets directory. A named format reads every file of a directory in that format.
    gzip and zstd files are decompressed whatever their name."""
    schema: str = "auto"
    """The rows' layout: sft, messages, sharegpt, alpaca, preference, preference_messages, hh, prompts (see the
    table of input formats in components/data_prep/README.md), or auto: told per row from its columns."""
    fields: dict[str, str] = field(default_factory=dict)
    """Schema column → the source's column, e.g. {prompt: question, completion: answer}, or a dotted path into
    nested objects ({prompt: meta.question}); a column not named here is read from the column of its own
    name."""
    alpaca_template: str | None = None
    """alpaca: the prompt of a row whose input is not empty, from its {instruction} and {input}, both of which
    must appear (default: the instruction, a blank line, the input); a row with an empty input is prompted with
    its instruction alone."""
    split: str | None = None
    """prompts: the split (id or ood) of every row that has none."""
    role: str = "both"
    """train, eval, or both: a row goes to eval when the hash of its prompt falls within eval_fraction."""
    name: str | None = None
    """The source's name in stats.json and errors (default: the uri)."""
    max_bad_fraction: float | None = None
    """This source's share of invalid rows tolerated (default: the stage's max_bad_fraction)."""

    def __post_init__(self):
        _check_common(self)
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is invalid: one of {', '.join(FORMATS)}")
        if self.schema not in SCHEMAS:
            raise ValueError(f"schema={self.schema!r} is invalid: one of {', '.join(SCHEMAS)}")
        if self.schema != "auto" and self.schema not in SHAPE_SCHEMAS[self.shape]:
            raise ValueError(f"schema={self.schema!r} is invalid for shape {self.shape}: one of auto, "
                             f"{', '.join(SHAPE_SCHEMAS[self.shape])}")
        allowed = columns(self.shape, self.schema)
        for key, column in self.fields.items():
            if key not in allowed:
                what = f"a {self.shape} row" if self.schema == "auto" else f"the {self.schema} schema"
                raise ValueError(f"fields: {key!r} is not a column of {what}: one of {', '.join(allowed)}")
            if not isinstance(column, str) or not column:
                raise ValueError(f"fields: {key}={column!r} is invalid: a column name (a non-empty string)")
        template = ALPACA_TEMPLATE if self.alpaca_template is None else self.alpaca_template
        if not isinstance(template, str) or "{instruction}" not in template or "{input}" not in template:
            raise ValueError(f"alpaca_template={self.alpaca_template!r} is invalid: it needs both {{instruction}} "
                             f"and {{input}}")
        if self.uri.startswith("s3://"):
            from components.storage import split_s3  # refuses a key that could escape the local cache

            split_s3(self.uri)
        if self.split is not None and (self.shape != "prompts" or self.split not in PROMPT_SPLITS):
            raise ValueError(f"split={self.split!r} is invalid: {' or '.join(PROMPT_SPLITS)}, "
                             f"for a source of shape prompts only")
        self.name = self.name or self.uri


@dataclass(kw_only=True)
class TaskSource:
    """Rows generated by a bundled task (components.tasks): prompt, completion, answer, task and split."""

    task: str
    """The task's name (components.tasks: arithmetic, arithmetic_length, general_points)."""
    rows: int
    """How many rows to generate."""
    shape: str
    """sft (prompt and completion) or prompts (prompt, answer, task and split)."""
    seed: int = 0
    """The task generator's seed."""
    split: str = "id"
    """id (in-domain) or ood (out-of-domain, test part only)."""
    part: str = "train"
    """train or test: disjoint parts of the in-domain problems."""
    role: str | None = None
    """train, eval or both (default: train for id/train rows, eval otherwise)."""
    name: str | None = None
    """The source's name in stats.json and errors (default: task/split/part/seed)."""
    max_bad_fraction: float | None = None
    """This source's share of invalid rows tolerated (default: the stage's max_bad_fraction)."""

    def __post_init__(self):
        from components.tasks import PARTS, SPLITS, get_task

        get_task(self.task)  # an unknown task raises ValueError listing the known ones
        if self.rows < 1:
            raise ValueError(f"rows={self.rows} is invalid: a positive integer")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is invalid: one of {', '.join(SPLITS)}")
        if self.part not in PARTS:
            raise ValueError(f"part={self.part!r} is invalid: one of {', '.join(PARTS)}")
        if self.shape not in ("sft", "prompts"):
            raise ValueError(f"shape={self.shape!r} is invalid for a task: sft or prompts")
        self.role = self.role or ("train" if (self.split, self.part) == ("id", "train") else "eval")
        _check_common(self)
        self.name = self.name or f"{self.task}/{self.split}/{self.part}/seed={self.seed}"


def parse_source(item, i: int) -> FileSource | TaskSource:
    """Source `i` of a config's `sources` (a mapping: with `task` a bundled task, else a file source), checked."""
    if isinstance(item, (FileSource, TaskSource)):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"sources[{i}]={item!r} is invalid: a mapping with uri (files) or task (a bundled task)")
    return from_mapping(TaskSource if "task" in item else FileSource, item, f"sources[{i}]")


@dataclass(kw_only=True)
class DataPrepConfig:
    """A data_prep stage: the sources, the tokenizer that measures rows, and the filters."""

    sources: list[FileSource | TaskSource]
    """The data, in order: each a file source (with `uri`) or a bundled task (with `task`); their keys are
    listed in components/data_prep/README.md."""
    tokenizer: str
    """A model directory whose tokenizer and chat template render and count the rows."""
    output_dir: str
    """Where <shape>.<role>.jsonl, stats.json and rejected.jsonl go."""
    max_length: int = 2048
    """Longest row in tokens (prompt and its longest completion, rendered by the chat template); longer rows
    are removed and counted."""
    eval_fraction: float = 0.1
    """Share of the prompts of role-both sources that go to eval, decided by a hash of the prompt."""
    max_bad_fraction: float = 0.0
    """Share of a source's rows that may be invalid (bad JSON, missing or empty fields, bad messages) before
    the stage fails; duplicates and overlong rows do not count."""
    contamination: str = "flag"
    """An eval row whose prompt is also in training data: flag (kept, contaminated: true) or drop."""
    seed: int = 0
    """Salt of the train/eval hash: another seed gives another, equally deterministic, split."""
    trust_remote_code: bool = False
    """Allow tokenizer code from the tokenizer directory (only for models you trust)."""

    def __post_init__(self):
        if not self.sources:
            raise ValueError("sources=[] is invalid: at least one source")
        self.sources = [parse_source(s, i) for i, s in enumerate(self.sources)]
        names = Counter(s.name for s in self.sources)
        if dup := [n for n, c in names.items() if c > 1]:
            raise ValueError(f"sources: the name {dup[0]!r} is used {names[dup[0]]} times: give each source "
                             f"its own name")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} is invalid: a positive integer")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} is invalid: a number in [0, 1)")
        check_max_bad_fraction(self.max_bad_fraction)
        if self.contamination not in CONTAMINATION:
            raise ValueError(f"contamination={self.contamination!r} is invalid: one of {', '.join(CONTAMINATION)}")



# --- Reading (components/data_prep/readers.py): every file yields (line, row | RowError); a file that breaks
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
