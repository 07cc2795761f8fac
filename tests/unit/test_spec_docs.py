"""docs/spec.md documents every key of the spec; it is generated from the field docstrings and must be current.

Regenerate: `python -m pipelines.spec docs > docs/spec.md` (or run this test with POSTTRAIN_UPDATE_DOCS=1).
"""

import dataclasses
import os
from pathlib import Path

from pipelines.spec.docs import SPEC_CLASSES, field_docs, reference_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def test_every_field_has_a_docstring():
    for cls in SPEC_CLASSES:
        missing = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_reference_page_is_current():
    expected = reference_markdown()
    if os.environ.get("POSTTRAIN_UPDATE_DOCS"):
        DOC.write_text(expected)
    assert DOC.read_text() == expected, "docs/spec.md is stale: python -m pipelines.spec docs > docs/spec.md"
    for cls in SPEC_CLASSES:
        assert f"## {cls.__name__}\n" in expected
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in expected
