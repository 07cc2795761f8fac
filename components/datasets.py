"""Dataset files: JSONL reading and the SFT row shape, with errors that name file, line and field.

Row shapes (see ARCHITECTURE.md), each with a parser that returns the row in normal form or a RowError:
- SFT (`sft_row`): `{"prompt": str | messages, "completion": str}` or `{"messages": [...]}` whose last message
  is the assistant's completion.
- preference (`preference_row`): `{"prompt": str | messages, "chosen": str, "rejected": str}`.
- prompts (`prompt_row`): `{"prompt": str | messages, "answer"?: str, "task"?: str, "split"?: "id" | "ood"}`.
Messages are `{role, content}` strings: an optional system message, then user and assistant turns
alternating from the user's; a prompt given as messages ends with the user's turn.

Nothing is skipped silently. A row that is not JSON, lacks a field or has an empty completion is a
`RowError`; a stage either fails on the first ones (listing them) or, when `max_bad_fraction` allows,
drops them and counts each with its reason. A row longer than `max_length` tokens is dropped or
truncated (per config) and counted.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from components.config import UserError, require

log = logging.getLogger(__name__)


class DataError(UserError):
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
    """Yield (line number, row) for each non-blank line; a line that is not a JSON object, or not UTF-8 text,
    yields a RowError (a byte order mark before line 1 is skipped; bad bytes are never replaced)."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError(str(path), lineno, "", f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} "
                                                              f"at byte {e.start + 1} of the line)")
                continue
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


MESSAGE_ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "function_call", "function_response", "observation", "ipython", "tool_call",
              "tool_response")
"""Roles of tool turns (OpenAI, ShareGPT/glaive, Llama 3): refused by name, not trained as text."""
PROMPT_SPLITS = ("id", "ood")


def _check_messages(messages, where: tuple[str, int], name: str) -> RowError | None:
    """Check a conversation's structure; only a final assistant message may be empty (its caller decides)."""
    if not isinstance(messages, list) or not messages:
        return RowError(*where, name, "must be a non-empty list of {role, content} messages")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"].lower() in TOOL_ROLES:
            return RowError(*where, f"{name}[{i}].role", f"tool turns are not supported (got {m['role']!r}): give "
                                                         "conversations of system, user and assistant turns only")
        if isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call")):
            return RowError(*where, f"{name}[{i}].tool_calls", "tool calls are not supported: give conversations of "
                                                               "system, user and assistant text turns only")
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            return RowError(*where, f"{name}[{i}].content", "list-valued content (content parts) is not supported: "
                                                            "give each message's text as one string")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return RowError(*where, f"{name}[{i}]", "each message needs a string 'role' and a string 'content'")
    offset = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in MESSAGE_ROLES:
            return RowError(*where, f"{name}[{i}].role",
                            f"unknown role (got {role!r}; allowed: {', '.join(MESSAGE_ROLES)})")
        expected = "system" if i < offset else ("user", "assistant")[(i - offset) % 2]
        if role != expected:
            return RowError(*where, f"{name}[{i}].role",
                            f"out of order (got {role!r}, expected {expected!r}: an optional system message "
                            f"first, then user and assistant turns alternating from the user's)")
        if not m["content"].strip() and not (i == len(messages) - 1 and role == "assistant"):
            return RowError(*where, f"{name}[{i}].content", "empty message")
    return None


def check_prompt(prompt, where: tuple[str, int], name: str = "prompt") -> RowError | None:
    """A prompt is a non-empty string, or messages ending with the user's turn (the model answers next)."""
    if isinstance(prompt, list):
        if err := _check_messages(prompt, where, name):
            return err
        if prompt[-1]["role"] != "user":
            last = f"{name}[{len(prompt) - 1}].role"
            return RowError(*where, last, "the last message of a prompt must be the user's")
        return None
    if not isinstance(prompt, str):
        return RowError(*where, name, f"must be a string or a list of messages (got {type(prompt).__name__})")
    if not prompt.strip():
        return RowError(*where, name, "empty prompt")
    return None


def _string(row: dict, name: str, where: tuple[str, int], empty: str = "empty") -> str | RowError:
    value = row[name]
    if not isinstance(value, str):
        return RowError(*where, name, f"must be a string (got {type(value).__name__})")
    if not value.strip():
        return RowError(*where, name, empty)
    return value


def _missing(row: dict, names: tuple[str, ...], where: tuple[str, int], needs: str) -> RowError | None:
    """A field that is absent or null is missing (Parquet and Arrow write absent values as null)."""
    for name in names:
        if row.get(name) is None:
            return RowError(*where, name, f"missing ({needs})")
    return None


def _plain_prompt(prompt):
    """The prompt with only role and content kept in each message."""
    return [{"role": m["role"], "content": m["content"]} for m in prompt] if isinstance(prompt, list) else prompt


def sft_prompt_completion(row: dict, file: str, line: int) -> tuple[object, str] | RowError:
    """Split an SFT row into (prompt, completion), or say precisely what is wrong with it."""
    where = (file, line)
    if "messages" in row:
        msgs = row["messages"]
        if err := _check_messages(msgs, where, "messages"):
            return err
        if msgs[-1]["role"] != "assistant":
            return RowError(*where, f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's")
        prompt, completion, cfield = msgs[:-1], msgs[-1]["content"], f"messages[{len(msgs) - 1}].content"
    else:
        needs = "an SFT row needs 'prompt' and 'completion', or 'messages'"
        if err := _missing(row, ("prompt", "completion"), where, needs) or check_prompt(row["prompt"], where):
            return err
        prompt, completion, cfield = row["prompt"], row["completion"], "completion"
        if not isinstance(completion, str):
            return RowError(*where, "completion", f"must be a string (got {type(completion).__name__})")
    if not completion.strip():
        return RowError(*where, cfield, "empty completion")
    return prompt, completion


def sft_row(row: dict, file: str, line: int) -> dict | RowError:
    """An SFT row in normal form `{"prompt": str | messages, "completion": str}` (a `{"messages"}` row becomes
    the conversation before its last message, and that message's content), or what is wrong with it."""
    parsed = sft_prompt_completion(row, file, line)
    if isinstance(parsed, RowError):
        return parsed
    return {"prompt": _plain_prompt(parsed[0]), "completion": parsed[1]}


def preference_row(row: dict, file: str, line: int) -> dict | RowError:
    """A preference pair in normal form `{"prompt", "chosen", "rejected"}`, or what is wrong with it."""
    where = (file, line)
    needs = "a preference row needs 'prompt', 'chosen' and 'rejected'"
    if err := _missing(row, ("prompt", "chosen", "rejected"), where, needs) or check_prompt(row["prompt"], where):
        return err
    chosen, rejected = (_string(row, name, where, "empty completion") for name in ("chosen", "rejected"))
    for value in (chosen, rejected):
        if isinstance(value, RowError):
            return value
    if normalize_text(chosen) == normalize_text(rejected):
        return RowError(*where, "rejected", "the same as chosen (a pair needs two different completions)")
    return {"prompt": _plain_prompt(row["prompt"]), "chosen": chosen, "rejected": rejected}


def prompt_row(row: dict, file: str, line: int) -> dict | RowError:
    """A prompt for RL or evaluation in normal form `{"prompt", "answer"?, "task"?, "split"?}` (a null optional
    field is left out), or what is wrong with it."""
    where = (file, line)
    if err := _missing(row, ("prompt",), where, "a prompts row needs 'prompt'") or check_prompt(row["prompt"], where):
        return err
    out = {"prompt": _plain_prompt(row["prompt"])}
    for name in ("answer", "task", "split"):
        if row.get(name) is None:
            continue
        value = _string(row, name, where)
        if isinstance(value, RowError):
            return value
        if name == "split" and value not in PROMPT_SPLITS:
            return RowError(*where, name, f"not a split (got {value!r}; allowed: {', '.join(PROMPT_SPLITS)})")
        out[name] = value
    return out


# The three row shapes: the fields a source may map onto, and the parser of each.
ROW_FIELDS = {"sft": ("prompt", "completion", "messages"), "preference": ("prompt", "chosen", "rejected"),
              "prompts": ("prompt", "answer", "task", "split")}
ROW_PARSERS = {"sft": sft_row, "preference": preference_row, "prompts": prompt_row}


def normalize_text(text: str) -> str:
    """The form two texts are compared in: Unicode NFKC, whitespace runs collapsed to one space, stripped.
    Case and punctuation are kept, since they can change what a prompt asks."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def prompt_key(prompt) -> str:
    """A prompt's identity for deduplication, train/eval splitting and contamination checks. A string and the
    same text as a single user message are one prompt: the chat template renders them alike."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return json.dumps([[m["role"], normalize_text(m["content"])] for m in messages], ensure_ascii=False)


def row_key(row: dict) -> str:
    """A normal-form row's identity: rows equal after `normalize_text` are exact duplicates."""
    norm = {k: prompt_key(v) if k == "prompt" else normalize_text(v) if isinstance(v, str) else v
            for k, v in row.items()}
    return json.dumps(norm, sort_keys=True, ensure_ascii=False)


def reason_key(error: RowError) -> str:
    """What a dropped row is counted under: its field (indices elided) and the reason without its details."""
    head = error.reason.split(" (")[0]
    field = re.sub(r"\[\d+\]", "[]", error.field)
    return f"{field}: {head}" if field else head


def check_max_bad_fraction(value: float) -> None:
    """A config's share of invalid rows tolerated must be a number in [0, 1)."""
    require(isinstance(value, (int, float)) and 0 <= value < 1, "max_bad_fraction", value, "a number in [0, 1)")


def check_bad_fraction(errors: list[RowError], rows: int, max_bad_fraction: float, what: str) -> None:
    """Raise a DataError listing the first errors when they are more than `max_bad_fraction` of `rows`."""
    bad = len(errors)
    if bad and bad > max_bad_fraction * max(rows, 1):
        shown = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {bad - 20} more" if bad > 20 else ""
        raise DataError(f"{what}: {bad} of {rows} rows are unusable (allowed: {max_bad_fraction:.0%}):\n"
                        f"  {shown}{more}")


def fail_or_drop(stats: LoadStats, errors: list[RowError], max_bad_fraction: float, what: str) -> None:
    """Record row errors; raise a DataError listing them when they exceed `max_bad_fraction` of the rows."""
    stats.errors += errors
    for e in errors:
        stats.dropped[reason_key(e)] += 1
    check_bad_fraction(stats.errors, stats.rows, max_bad_fraction, what)
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


def load_rows(path: str | Path, parse, *, max_bad_fraction: float = 0.0) -> list[dict]:
    """Read a JSONL file of prompt rows (parse=prompt_row) or preference pairs (parse=preference_row).

    Every bad row is reported by file and line; more than `max_bad_fraction` of them fails the load.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, errors, n = [], [], 0
    for lineno, raw in read_jsonl(path):
        n += 1
        parsed = raw if isinstance(raw, RowError) else parse(raw, str(path), lineno)
        (errors if isinstance(parsed, RowError) else rows).append(parsed)
    check_bad_fraction(errors, n, max_bad_fraction, str(path))
    for e in errors:
        log.warning("%s (row skipped)", e)
    if not rows:
        raise DataError(f"{path}: no usable rows")
    return rows
