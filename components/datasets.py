"""Dataset files: JSONL reading and the SFT row shape, with errors that name file, line and field.

Row shapes (see ARCHITECTURE.md):
- SFT: `{"prompt": str | messages, "completion": str}` or `{"messages": [...]}` whose last message is the
  assistant's completion.

Nothing is skipped silently. A row that is not JSON, lacks a field or has an empty completion is a
`RowError`; a stage either fails on the first ones (listing them) or, when `max_bad_fraction` allows,
drops them and counts each with its reason. A row longer than `max_length` tokens is dropped or
truncated (per config) and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset cannot be used; the message lists the offending rows by file, line and field."""


@dataclass(slots=True)
class RowError:
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: field '{self.field}': {self.reason}" if self.field else f"{where}: {self.reason}"


@dataclass
class LoadStats:
    """What happened to every row of a file: kept, or dropped/truncated with a reason."""
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    errors: list[RowError] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, "dropped": dict(self.dropped)}


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | RowError]]:
    """Yield (line number, row) for each non-blank line; a line that is not a JSON object yields a RowError."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, RowError(str(path), lineno, "", f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield lineno, RowError(str(path), lineno, "", f"expected a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row


def write_jsonl(path: str | Path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _check_messages(messages, where: tuple[str, int], name: str) -> RowError | None:
    if not isinstance(messages, list) or not messages:
        return RowError(*where, name, "must be a non-empty list of {role, content} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return RowError(*where, f"{name}[{i}]", "each message needs a string 'role' and a string 'content'")
    return None


def sft_prompt_completion(row: dict, file: str, line: int) -> tuple[object, str] | RowError:
    """Split an SFT row into (prompt, completion), or say precisely what is wrong with it."""
    where = (file, line)
    if "messages" in row:
        msgs = row["messages"]
        if err := _check_messages(msgs, where, "messages"):
            return err
        if msgs[-1]["role"] != "assistant":
            return RowError(*where, f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's")
        if len(msgs) < 2:
            return RowError(*where, "messages", "needs at least one message before the assistant's")
        prompt, completion, cfield = msgs[:-1], msgs[-1]["content"], f"messages[{len(msgs) - 1}].content"
    else:
        for name in ("prompt", "completion"):
            if name not in row:
                return RowError(*where, name, "missing (an SFT row needs 'prompt' and 'completion', or 'messages')")
        prompt, completion, cfield = row["prompt"], row["completion"], "completion"
        if isinstance(prompt, list):
            if err := _check_messages(prompt, where, "prompt"):
                return err
        elif not isinstance(prompt, str) or not prompt.strip():
            return RowError(*where, "prompt", "must be a non-empty string or a list of messages")
        if not isinstance(completion, str):
            return RowError(*where, "completion", f"must be a string, got {type(completion).__name__}")
    if not completion.strip():
        return RowError(*where, cfield, "empty completion")
    return prompt, completion


def fail_or_drop(stats: LoadStats, errors: list[RowError], max_bad_fraction: float, what: str) -> None:
    """Record row errors; raise a DataError listing them when they exceed `max_bad_fraction` of the rows."""
    stats.errors += errors
    for e in errors:
        stats.dropped[e.reason.split(" (")[0]] += 1
    bad = len(stats.errors)
    if bad and bad > max_bad_fraction * max(stats.rows, 1):
        shown = "\n  ".join(str(e) for e in stats.errors[:20])
        more = f"\n  ... and {bad - 20} more" if bad > 20 else ""
        raise DataError(f"{what}: {bad} of {stats.rows} rows are unusable (allowed: {max_bad_fraction:.0%}):\n"
                        f"  {shown}{more}")
    for e in errors:
        log.warning("dropped %s", e)


def load_sft_examples(path: str | Path, tokenizer, *, max_length: int, overlong: str = "drop",
                      max_bad_fraction: float = 0.0):
    """Read an SFT JSONL file into tokenized Examples.

    overlong: "drop" removes a row longer than `max_length` tokens, "truncate" cuts its completion;
    either way the row is counted (and a prompt that alone fills `max_length` is always dropped).
    Returns (examples, stats).
    """
    from components.training.batching import Example, encode_example

    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    stats, errors, examples = LoadStats(), [], []
    for lineno, row in read_jsonl(path):
        stats.rows += 1
        parsed = row if isinstance(row, RowError) else sft_prompt_completion(row, str(path), lineno)
        if isinstance(parsed, RowError):
            errors.append(parsed)
            continue
        ex: Example = encode_example(tokenizer, *parsed, source=f"{path}:{lineno}")
        if len(ex) > max_length:
            if overlong == "truncate" and ex.completion_start < max_length:
                log.info("%s: truncated from %d to %d tokens", ex.source, len(ex), max_length)
                ex.input_ids = ex.input_ids[:max_length]
                stats.truncated += 1
            else:
                stats.dropped[f"longer than max_length={max_length}"] += 1
                log.info("%s: dropped, %d tokens > max_length=%d", ex.source, len(ex), max_length)
                continue
        examples.append(ex)
    fail_or_drop(stats, errors, max_bad_fraction, str(path))
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable rows ({stats.as_dict()})")
    return examples, stats
