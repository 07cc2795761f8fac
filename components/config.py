"""Stage configs: YAML files read into dataclasses, with errors that name the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or mapping is invalid; the message names the file, the key and what is allowed."""


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def from_mapping(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a mapping: unknown keys, wrong types and failed validation are ConfigErrors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
    for name, value in data.items():
        if not _type_ok(value, hints[name]):
            raise ConfigError(f"{where}: key '{name}' has value {value!r} of type {type(value).__name__}; "
                              f"expected {getattr(hints[name], '__name__', str(hints[name]))}")
    try:
        return cls(**data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config(cls, path: str | Path):
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {e}") from e
    return from_mapping(cls, data, str(path))


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(cls, args.config)
    except ConfigError as e:  # the user's to fix: the message (file, key, what is allowed), not a traceback
        print(f"{p.prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(cfg)
