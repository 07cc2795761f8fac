"""Bad rows are named by file, line and field; nothing is skipped silently."""

import json

import pytest

from components.datasets import DataError, load_sft_examples
from components.models import load_tokenizer


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _ok(i):
    return json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)})


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("bad, field, reason", [
    ('{"prompt": "1+1=", "completion": "2"', "", "not valid JSON"),
    ('{"prompt": "1+1="}', "completion", "missing"),
    ('{"completion": "2"}', "prompt", "missing"),
    ('{"prompt": "1+1=", "completion": "  "}', "completion", "empty completion"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
     "messages[1].content", "empty completion"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages[0].role", "must be the assistant"),
    ('[1, 2]', "", "expected a JSON object"),
])
def test_bad_row_is_named(tmp_path, tok, bad, field, reason):
    f = _write(tmp_path / "d.jsonl", [_ok(1), _ok(2), bad, _ok(3)])
    with pytest.raises(DataError) as e:
        load_sft_examples(f, tok, max_length=64)
    msg = str(e.value)
    assert f"{f}:3" in msg and reason in msg
    if field:
        assert f"field '{field}'" in msg


def test_bad_rows_dropped_and_counted_when_allowed(tmp_path, tok, caplog):
    f = _write(tmp_path / "d.jsonl", [_ok(i) for i in range(8)] + ["not json", '{"prompt": "x"}'])
    examples, stats = load_sft_examples(f, tok, max_length=64, max_bad_fraction=0.25)
    assert len(examples) == 8 and stats.rows == 10 and stats.kept == 8
    assert sum(stats.dropped.values()) == 2
    assert f"{f}:9" in caplog.text and f"{f}:10" in caplog.text


def test_overlong_rows_dropped_or_truncated_and_counted(tmp_path, tok):
    long = json.dumps({"prompt": "1+1=", "completion": "9" * 100})
    f = _write(tmp_path / "d.jsonl", [_ok(1), long, _ok(2)])
    examples, stats = load_sft_examples(f, tok, max_length=32, overlong="drop")
    assert len(examples) == 2 and stats.dropped == {"longer than max_length=32": 1}
    examples, stats = load_sft_examples(f, tok, max_length=32, overlong="truncate")
    assert len(examples) == 3 and stats.truncated == 1 and max(len(e) for e in examples) == 32
    assert examples[1].source == f"{f}:2"


def test_chat_rows_load(tmp_path, tok):
    row = {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="},
                        {"role": "assistant", "content": "2"}]}
    f = _write(tmp_path / "d.jsonl", [json.dumps(row)])
    (ex,), _ = load_sft_examples(f, tok, max_length=64)
    assert tok.decode(ex.input_ids[ex.completion_start:]) == "2<|end|>"
