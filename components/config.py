"""Typed configs: YAML mappings read into dataclasses, with errors that name the file, the key's path, the bad
value and what is allowed.

One reader serves every stage config and the workflow spec (pipelines/spec). A config is a dataclass whose
parts are dataclass fields (composition: an SFT stage holds `train`, a GRPO stage `train`, `prompts`,
`sampling`, `loading`), each part validating its own keys in `__post_init__` with `require`:

    read(GRPOConfig, {"model": "m", "output_dir": "o", "train": {"lr": 1e-5}}, where="grpo.yaml")

- a part given as a mapping is built on top of the field's default part, so a stage's own defaults (GRPO's
  `train.batch_size` 128) survive a mapping that sets other keys;
- an unknown key that is a key of one of the parts says where it goes (`lr` → `train: {lr: ...}`), and one the
  class lists in its `REMOVED` (key → reason) says why it is gone;
- a float key takes an int, and a string YAML leaves unparsed such as `1e-4`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml


class UserError(ValueError):
    """A mistake in what the user gave (a config, a file, a path): the message says what and where, and the
    command line prints it alone, as one line, with exit status 2 (`--debug` shows the traceback)."""

    MAX_CHARS = 1000
    """A longer message is cut in the middle (where a quoted value is): its start names the file and the key, its
    end what is allowed, and a pasted megabyte is never printed back."""

    def __init__(self, message="", *args):
        if isinstance(message, str) and len(message) > self.MAX_CHARS:
            message = f"{message[:700]}…[{len(message) - 950} characters cut]…{message[-250:]}"
        super().__init__(message, *args)


class ConfigError(UserError):
    """A config file or mapping is invalid; the message names the file, the key's path and what is allowed."""


class Invalid(ValueError):
    """Raised by a config dataclass's __post_init__: `key` (relative to the dataclass) holds `value`, not `allowed`."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def require(ok: bool, key: str, value, allowed: str) -> None:
    """The one validation helper of config classes: raise Invalid(key, value, allowed) unless `ok`."""
    if not ok:
        raise Invalid(key, value, allowed)


def positive_ints(obj, *names: str) -> None:
    """Each named field of `obj` is an int ≥ 1."""
    for name in names:
        value = getattr(obj, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
                "a positive integer")


def join(path: str, key: str | int) -> str:
    """`path` extended by a mapping key (a.b) or a list index (a[0])."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def type_name(hint) -> str:
    """How a type hint reads in an error message."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def parts(cls) -> dict[str, type]:
    """The fields of config class `cls` that are themselves config classes (its parts), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def default_of(f: dataclasses.Field):
    """A field's default value (its factory called), or dataclasses.MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


class Reader:
    """Builds config dataclasses from YAML data; every error is a ConfigError naming `where` and a key path."""

    def __init__(self, where: str, error_cls: type[ConfigError] = ConfigError):
        self.where, self.error_cls = where, error_cls

    def error(self, path: str, message: str) -> ConfigError:
        return self.error_cls(f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}")

    def build(self, cls, data, path: str = "", base=None):
        """`cls` from mapping `data`; `base` (an instance of cls) gives the values of the keys data leaves out."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise self.error(path or "(top level)", f"{data!r} is invalid: a mapping with keys {', '.join(fields)}")
        for key in data:
            if key not in fields:
                raise self.error(join(path, key), self._unknown(cls, key, data[key]))
        hints = typing.get_type_hints(cls)
        values = {}
        for name, f in fields.items():
            if name in data:
                default = getattr(base, name) if base is not None else default_of(f)
                values[name] = self.value(hints[name], data[name], join(path, name), default)
            elif base is not None:
                values[name] = getattr(base, name)
            elif default_of(f) is dataclasses.MISSING:
                raise self.error(join(path, name), "missing; this key is required")
        try:
            return cls(**values)
        except Invalid as e:
            raise self.error(join(path, e.key), f"{e.value!r} is invalid: {e.allowed}") from None
        except (ValueError, TypeError) as e:
            raise self.error(path, str(e)) from None

    @staticmethod
    def _unknown(cls, key: str, value) -> str:
        if key in getattr(cls, "REMOVED", {}):  # a key the class dropped: say why, not only that it is unknown
            return cls.REMOVED[key]
        for part, part_cls in parts(cls).items():
            if key in {f.name for f in dataclasses.fields(part_cls)}:
                return (f"unknown key here; it is a key of `{part}`: write {part}: {{{key}: "
                        f"{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}}}")
        return f"unknown key; allowed: {', '.join(sorted(f.name for f in dataclasses.fields(cls)))}"

    def value(self, hint, value, path: str, default=dataclasses.MISSING):
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) > 1:  # e.g. a source of either kind: the dataclass's __post_init__ decides
                if any(dataclasses.is_dataclass(a) for a in inner) or any(self._ok(a, value) for a in inner):
                    return value
                raise self.error(path, f"{value!r} is invalid: {type_name(hint)}")
            return self.value(inner[0], value, path, default)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path, default if dataclasses.is_dataclass(default) else None)
        if origin in (list, tuple) or hint in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self.error(path, f"{value!r} is invalid: {type_name(hint)}")
            if origin is list and args:
                return [self.value(args[0], v, join(path, i)) for i, v in enumerate(value)]
            return value
        if origin is dict or hint is dict:
            if not isinstance(value, dict):
                raise self.error(path, f"{value!r} is invalid: {type_name(hint)}")
            if args:
                for k, v in value.items():
                    if not isinstance(k, str) or not self._ok(args[1], v):
                        raise self.error(join(path, str(k)), f"{v!r} is invalid: {type_name(args[1])}")
            return value
        if hint is float and isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if not self._ok(hint, value):
            raise self.error(path, f"{value!r} is invalid: {type_name(hint)}")
        return float(value) if hint is float else value

    @staticmethod
    def _ok(hint, value) -> bool:
        if hint is typing.Any:
            return True
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        origin = typing.get_origin(hint)
        if origin is not None:
            return isinstance(value, origin)
        return isinstance(value, hint) if isinstance(hint, type) else True


def from_mapping(cls, data: dict, where: str = "config"):
    """Build config class `cls` from a mapping: unknown keys, wrong types and failed validation are ConfigErrors."""
    return Reader(where).build(cls, data)


def load_config(cls, path: str | Path):
    """Read a YAML file into config class `cls`."""
    from components.yamlread import read_yaml  # bounded: no alias bomb, repeated key or deep nesting

    path = Path(path)
    return from_mapping(cls, read_yaml(path, ConfigError) or {}, str(path))


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, part by part: {"train": {"lr": 1}} over {"train": {"max_steps": 5}} keeps both."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_main(module_name: str, cls, run, argv: list[str] | None = None):
    """The command line of every stage: `python -m components.<stage> --config FILE.yaml`; returns run's result."""
    import argparse
    import logging
    import sys

    module = sys.modules[module_name]
    stage = (module.__spec__.name if module.__spec__ else module_name).split(".")[1]
    doc = (module.__doc__ or stage).strip().split("\n")[0]
    p = argparse.ArgumentParser(prog=f"python -m components.{stage}", description=doc)
    p.add_argument("--config", required=True, help=f"stage config YAML (see components/{stage}/README.md)")
    p.add_argument("--debug", action="store_true", help="a user error's traceback too, not only its message")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(cls, args.config)
        if getattr(cfg, "output_dir", None):
            check_writable(cfg.output_dir, f"{args.config}: output_dir")
        from components.locks import writer_lock  # one writer per output_dir: a second stage is refused at once
        with writer_lock(getattr(cfg, "output_dir", None), f"{args.config}: output_dir"):
            return run(cfg)
    except UserError as e:  # the user's to fix: the message (file, key or row, what is allowed), not a traceback
        if args.debug:
            raise
        print(f"{p.prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_writable(directory: str | Path, what: str) -> None:
    """Create `directory` and write a file in it, before any work: a read-only or full target fails now, not
    after the data and the model have loaded. The file gets CHECK_BYTES of data, flushed to the device: an empty
    file takes no data blocks, so creating one succeeds on a full disk."""
    import errno
    import os
    import shutil
    import tempfile

    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-") as f:
            f.write(b"\0" * CHECK_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path).free if path.is_dir() else None
            raise UserError(f"{what} {path}: no space left on the device ({free} bytes free; a check write of "
                            f"{CHECK_BYTES} bytes failed)") from None
        raise UserError(f"{what} {path}: not writable ({e.strerror or e})") from None


CHECK_BYTES = 1 << 20
"""What check_writable writes: a disk with less free is full for any stage."""
