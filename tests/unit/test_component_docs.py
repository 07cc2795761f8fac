"""The docs' config key tables are those of the config classes: each registered stage's README lists its keys
with their real defaults, and components/README.md lists every part's keys (components.config_docs)."""

from __future__ import annotations

import pytest

from components.config_docs import expected_docs


@pytest.mark.parametrize("path, text", sorted(expected_docs().items()), ids=lambda v: getattr(v, "parent", v).name
                         if hasattr(v, "parent") else "")
def test_generated_key_tables_are_current(path, text):
    assert path.read_text() == text, f"{path}: run `python -m components.config_docs` to update its key tables"
