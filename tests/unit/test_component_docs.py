"""Each stage's README documents every key of its config with the key's real default."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["data_prep", "sft", "reward_scoring", "dpo", "grpo", "evaluate", "register"]
ROW = re.compile(r"^\| `([A-Za-z_0-9]+)` \| ([^|]*) \|", re.M)


def _normal(text: str) -> str:
    text = text.strip().strip("`").strip()
    if text in ("(required)", "**required**"):
        return "required"
    return text.strip("'\"")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return str(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return str(f.default_factory())
    return "required"


@pytest.mark.parametrize("stage", STAGES)
def test_readme_lists_every_config_key_with_its_default(stage):
    config = importlib.import_module(f"components.{stage}.main").CONFIG
    rows: dict[str, set[str]] = {}
    for key, default in ROW.findall((ROOT / "components" / stage / "README.md").read_text()):
        rows.setdefault(key, set()).add(_normal(default))
    problems = []
    for f in dataclasses.fields(config):
        if f.name not in rows:
            problems.append(f"{f.name}: not in the README's key table")
        elif _normal(_default(f)) not in rows[f.name]:
            problems.append(f"{f.name}: README says {sorted(rows[f.name])}, the config's default is {_default(f)!r}")
    assert not problems, f"components/{stage}/README.md: " + "; ".join(problems)
