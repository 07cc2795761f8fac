"""The data_prep stage's config and its sources (file and bundled-task sources), light: `python -m pipelines.spec
check` builds it without importing torch or a tokenizer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from components.config import from_mapping
from components.datasets import PROMPT_SPLITS, ROW_FIELDS, check_max_bad_fraction
from components.sources.formats import ALPACA_TEMPLATE, SCHEMAS, SHAPE_SCHEMAS, columns
from components.sources.readers import FORMATS

SHAPES = tuple(ROW_FIELDS)
ROLES = ("train", "eval", "both")
CONTAMINATION = ("flag", "drop")


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
