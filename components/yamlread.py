"""YAML files read within bounds: the one reader of specs, stage configs and demo settings.

A spec is something a user pastes (the KFP UI, a chat, a ticket), so reading one must cost little whatever it
holds. `yaml.safe_load` alone expands a 1.5 kB alias bomb into gigabytes, recurses once per nesting level (a
5000-deep list is a RecursionError), keeps the last of two equal keys, and reports a syntax error in several
lines about `<unicode string>`. Here a file is refused, in one line naming it, when it

- is larger than MAX_BYTES (checked before it is parsed: only MAX_BYTES + 1 bytes are ever read);
- nests mappings and lists deeper than MAX_DEPTH;
- would be larger than MAX_EXPANDED once its aliases are expanded (each node counts 1, each scalar also its
  length), or has an alias inside the node it names (a cycle);
- repeats a key in one mapping (naming the key, its line and the line of the first one);
- is not UTF-8 (or UTF-16 with a byte-order mark), or is not YAML: `FILE: line L, column C: what is wrong`.

The limits are checked on the event stream, which the parser produces one event at a time without recursion,
before anything is built; the document is then loaded with libyaml's loader where PyYAML has it (the same
result as the pure-Python one, faster), with the duplicate-key check in the constructor.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode, ScalarNode

MAX_BYTES = 1 << 20
"""The largest YAML file read (1 MiB); the bundled specs are a few kB."""

MAX_DEPTH = 64
"""How deeply mappings and lists may nest (a spec nests about 5 levels)."""

MAX_EXPANDED = 4 << 20
"""The largest a document may be once aliases are expanded, in nodes plus scalar characters (a file without
aliases stays near its size in bytes)."""


class _NoDuplicateKeys:
    """Mixed into yaml's safe loader: a key repeated in one mapping is refused instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<` merges (its keys may be set again); a non-scalar key is refused as unhashable
                key = self.construct_object(key_node)  # a scalar: hashable
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key)} (first at line {first[key].line + 1}): a key may "
                        f"appear once in a mapping", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def loaders(base: type | None = None) -> tuple[type, type]:
    """(the loader whose events are checked, the loader that builds the document) on top of `base`: libyaml's
    safe loader where PyYAML was built with it, else the pure-Python one (tests use both)."""
    base = base or getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return base, type("BoundedLoader", (_NoDuplicateKeys, base), {})


_BASE_LOADER, _Loader = loaders()


def _short(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: an error quotes a value, never a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def read_yaml(path: str | Path, error_cls: type[Exception] = ValueError):
    """The one document of YAML file `path`, read within the bounds above; each refusal is one line raised as
    `error_cls`, naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise error_cls(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        what = f"{size} bytes" if size > MAX_BYTES else f"more than {MAX_BYTES} bytes"
        raise error_cls(f"{path}: {what}; a YAML file here may have at most {MAX_BYTES} bytes (1 MiB)")
    return parse_yaml(raw, str(path), error_cls)


def parse_yaml(text: str | bytes, where: str = "<yaml>", error_cls: type[Exception] = ValueError):
    """The one document of YAML `text` (bytes: UTF-8, or UTF-16 with a byte-order mark), read within the bounds
    above; `where` names it in the one-line errors, raised as `error_cls`."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise error_cls(f"{where}: {len(text)} bytes; a YAML document here may have at most {MAX_BYTES} bytes")
        text = _decode(text, where, error_cls)
    elif len(text) > MAX_BYTES:
        raise error_cls(f"{where}: {len(text)} characters; a YAML document here may have at most {MAX_BYTES}")
    try:
        _check_bounds(text, where, error_cls)
        loader = _Loader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise error_cls(_one_line(e, text, where)) from None
    except RecursionError:  # not reached within MAX_DEPTH; kept so that no input gives a traceback
        raise error_cls(f"{where}: nested too deeply to read") from None


def _decode(raw: bytes, where: str, error_cls) -> str:
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error_cls(f"{where}: line {line}: not {encoding.upper()} text (byte {e.start}: {e.reason})") from None


def _check_bounds(text: str, where: str, error_cls) -> None:
    """Walk the event stream: depth, alias expansion and alias cycles, before a node is built."""
    expanded = 0
    sizes: dict[str, tuple[int, int]] = {}  # anchor → (expanded size, height) of the node it names
    stack: list[list] = []  # per open collection: [anchor, expanded size before it, height of its tallest child]

    def refuse(event, problem: str):
        mark = event.start_mark
        raise error_cls(f"{where}: line {mark.line + 1}, column {mark.column + 1}: {problem}")

    def close(anchor, size: int, height: int) -> None:
        if stack:
            stack[-1][2] = max(stack[-1][2], height)
        if anchor is not None:
            sizes[anchor] = (size, height)

    for event in yaml.parse(text, Loader=_BASE_LOADER):
        if isinstance(event, CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                refuse(event, f"nested more than {MAX_DEPTH} levels deep; a YAML file here may nest at most "
                              f"{MAX_DEPTH} mappings and lists")
            stack.append([event.anchor, expanded, 0])
            expanded += 1
        elif isinstance(event, CollectionEndEvent):
            anchor, before, tallest = stack.pop()
            close(anchor, expanded - before, tallest + 1)
        elif isinstance(event, ScalarEvent):
            expanded += 1 + len(event.value)
            close(event.anchor, 1 + len(event.value), 0)
        elif isinstance(event, AliasEvent):
            if any(entry[0] == event.anchor for entry in stack):
                refuse(event, f"alias *{event.anchor} inside the node &{event.anchor} it names: a cycle")
            if event.anchor not in sizes:
                refuse(event, f"alias *{event.anchor} names no anchor before it")
            size, height = sizes[event.anchor]
            if len(stack) + height > MAX_DEPTH:
                refuse(event, f"alias *{event.anchor} nests more than {MAX_DEPTH} levels deep")
            expanded += size
            close(None, size, height)
        else:
            continue
        if expanded > MAX_EXPANDED:
            refuse(event, f"more than {MAX_EXPANDED} nodes and characters once aliases are expanded (an alias "
                          f"bomb?); write the values out, or use fewer aliases")


def _one_line(e: yaml.YAMLError, text: str, where: str) -> str:
    """A YAML error as `FILE: line L, column C: problem (context at line L', column C')`."""
    if isinstance(e, yaml.reader.ReaderError):
        position = e.position if isinstance(e.position, int) else 0
        if _BASE_LOADER is not yaml.SafeLoader:  # libyaml counts bytes of the UTF-8 text, not characters
            position = len(text.encode("utf-8")[:position].decode("utf-8", "ignore"))
        before = text[:position]
        line, column = before.count("\n"), len(before) - (before.rfind("\n") + 1)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return f"{where}: line {line + 1}, column {column + 1}: character {char} is not allowed in YAML ({e.reason})"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        message = e.problem or e.context or "invalid YAML"
        if e.problem == "second occurrence" and e.context_mark is not None:  # the composer's duplicate anchor
            message = f"an anchor defined twice (first at line {e.context_mark.line + 1})"
        elif e.context and e.problem:
            cm = e.context_mark
            where_context = f" at line {cm.line + 1}, column {cm.column + 1}" if cm is not None else ""
            message += f" ({e.context}{where_context})"
        return f"{where}: {at}{_flat(message)}"
    return f"{where}: {_flat(str(e))}"


def _flat(message: str) -> str:
    return " ".join(message.replace("<unicode string>", "the file").split())
