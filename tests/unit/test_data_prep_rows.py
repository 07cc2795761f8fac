"""Row shapes, prompt identity, the hash split, histograms and the file readers of data_prep."""

import json

import pytest

from components.data_prep.main import LENGTH_BINS, READERS, length_stats, on_eval_side, source_files
from components.datasets import (
    DataError,
    RowError,
    preference_row,
    prompt_key,
    prompt_row,
    reason_key,
    row_key,
    sft_row,
)
from components.sources.readers import BrokenFile

U, A, S = "user", "assistant", "system"


def _m(*turns):
    return [{"role": r, "content": c} for r, c in turns]


@pytest.mark.parametrize("messages, field, reason", [
    (_m((U, "hi"), ("tool", "x"), (A, "ok")), "messages[1].role", "tool turns are not supported (got 'tool')"),
    (_m((U, "hi"), ("narrator", "x"), (A, "ok")), "messages[1].role", "unknown role (got 'narrator'"),
    ([{"role": U, "content": "hi"}, {"role": A, "content": "", "tool_calls": [{"name": "f"}]}],
     "messages[1].tool_calls", "tool calls are not supported"),
    (_m((U, "hi"), (U, "again"), (A, "ok")), "messages[1].role", "out of order (got 'user', expected 'assistant'"),
    (_m((U, "hi"), (S, "late"), (A, "ok")), "messages[1].role", "out of order (got 'system'"),
    (_m((A, "first"), (U, "hi"), (A, "ok")), "messages[0].role", "out of order (got 'assistant', expected 'user'"),
    (_m((U, " "), (A, "ok")), "messages[0].content", "empty message"),
    (_m((U, "hi"), (A, "")), "messages[1].content", "empty completion"),
    ([{"role": U, "content": [{"type": "text", "text": "hi"}]}], "messages[0].content",
     "list-valued content (content parts) is not supported"),
    ([{"role": U, "content": 3}], "messages[0]", "each message needs a string 'role' and a string 'content'"),
])
def test_bad_messages_are_named(messages, field, reason):
    err = sft_row({"messages": messages}, "f.jsonl", 3)
    assert isinstance(err, RowError) and (err.file, err.line, err.field) == ("f.jsonl", 3, field)
    assert err.reason.startswith(reason), err.reason


def test_sft_rows_take_one_normal_form():
    chat = sft_row({"messages": _m((S, "s"), (U, "q"), (A, "a")), "id": 1}, "f", 1)
    assert chat == {"prompt": _m((S, "s"), (U, "q")), "completion": "a"}
    assert sft_row({"prompt": "q", "completion": "a", "extra": 1}, "f", 1) == {"prompt": "q", "completion": "a"}
    err = sft_row({"prompt": _m((U, "q"), (A, "a")), "completion": "b"}, "f", 1)
    assert (err.field, err.reason) == ("prompt[1].role", "the last message of a prompt must be the user's")
    err = sft_row({"prompt": 5, "completion": "b"}, "f", 1)
    assert (err.field, err.reason) == ("prompt", "must be a string or a list of messages (got int)")


@pytest.mark.parametrize("row, field, reason", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing (a preference row needs 'prompt', 'chosen' and"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "chosen", "must be a string (got int)"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "rejected", "empty completion"),
    ({"prompt": "q", "chosen": "a  b", "rejected": "a b"}, "rejected", "the same as chosen"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
])
def test_bad_preference_rows(row, field, reason):
    err = preference_row(row, "p.json", 2)
    assert isinstance(err, RowError) and err.field == field and err.reason.startswith(reason), err


def test_prompt_rows():
    assert prompt_row({"prompt": "q", "answer": None, "split": "ood", "x": 1}, "f", 1) == {"prompt": "q",
                                                                                          "split": "ood"}
    assert prompt_row({"prompt": "q", "answer": 4}, "f", 1).reason == "must be a string (got int)"
    assert prompt_row({"prompt": "q", "split": "test"}, "f", 1).reason == "not a split (got 'test'; allowed: id, ood)"
    assert prompt_row({"answer": "4"}, "f", 1).field == "prompt"


def test_prompt_identity():
    assert prompt_key("  What is\n2+2? ") == prompt_key(_m((U, "What is 2+2?")))
    assert prompt_key("What is 2+2?") != prompt_key("what is 2+2?")
    assert prompt_key("q") != prompt_key(_m((S, "s"), (U, "q")))
    assert row_key({"prompt": "q ", "completion": "a"}) == row_key({"completion": " a", "prompt": _m((U, "q"))})
    err = RowError("f", 1, "messages[12].role", "out of order (got 'user')")
    assert reason_key(err) == "messages[].role: out of order"
    assert reason_key(RowError("f", 1, "", "not valid JSON (x)")) == "not valid JSON"


def test_length_histogram_has_fixed_bins():
    stats = length_stats([0, 15, 16, 40_000])
    assert len(stats["histogram"]) == len(LENGTH_BINS)
    assert stats["histogram"]["0-15"] == 2 and stats["histogram"]["16-31"] == 1
    assert stats["histogram"]["32768+"] == 1 and sum(stats["histogram"].values()) == 4
    assert (stats["min"], stats["max"], stats["mean"]) == (0, 40_000, 10_007.75)
    assert length_stats([]) == {**length_stats([]), "min": None, "max": None, "mean": None}


def test_eval_side_is_a_stable_share_of_prompts():
    keys = [prompt_key(f"{i}+{i}=") for i in range(5000)]
    share = sum(on_eval_side(k, 0, 0.1) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert not any(on_eval_side(k, 0, 0.0) for k in keys)
    assert [on_eval_side(k, 0, 0.5) for k in keys[:50]] == [on_eval_side(k, 0, 0.5) for k in keys[:50]]
    assert [on_eval_side(k, 0, 0.5) for k in keys[:50]] != [on_eval_side(k, 1, 0.5) for k in keys[:50]]


def test_source_files_by_extension_or_named_format(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "sub/a.csv", "notes.md", ".hidden.jsonl", "_SUCCESS", "part-0"):
        (tmp_path / name).write_text("")
    files, ignored = source_files(tmp_path, "auto")
    assert [(p.relative_to(tmp_path).as_posix(), f) for p, f in files] == [("b.jsonl", "jsonl"), ("sub/a.csv", "csv")]
    assert sorted(p.name for p in ignored) == [".hidden.jsonl", "_SUCCESS", "notes.md", "part-0"]
    files, _ = source_files(tmp_path, "jsonl")
    assert sorted(p.name for p, f in files) == ["a.csv", "b.jsonl", "notes.md", "part-0"]
    with pytest.raises(DataError, match="cannot tell the format from the extension '.md': set format to one of"):
        source_files(tmp_path / "notes.md", "auto")
    with pytest.raises(DataError, match="no such file or directory"):
        source_files(tmp_path / "missing", "auto")


def test_csv_and_json_readers_name_lines(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\n1+1=,2\n"multi\nline",x\n2+2=,4,extra\n3+3=\n')
    rows = list(READERS["csv"](f, "d.csv"))
    assert rows[0] == (2, {"prompt": "1+1=", "completion": "2"})
    assert rows[1] == (4, {"prompt": "multi\nline", "completion": "x"})
    assert rows[2][0] == 5 and rows[2][1].reason == "more values than the header's 2 columns"
    assert rows[3] == (6, {"prompt": "3+3=", "completion": None})

    j = tmp_path / "d.json"
    j.write_text(json.dumps({"rows": []}))
    with pytest.raises(BrokenFile, match=r'expected an array of rows or \{"data": \[...\]\}: its rows cannot be'):
        list(READERS["json"](j, "d.json"))
    j.write_text('[{"prompt": "q"},\n 3,\n {"prompt": ')  # truncated: the rows it lost cannot be counted
    with pytest.raises(BrokenFile, match="not valid JSON .* at line 3 column 13.* after 2 complete rows"):
        list(READERS["json"](j, "d.json"))
    j.write_text('[{"prompt": "q"}, 3]')
    rows = list(READERS["json"](j, "d.json"))
    assert rows[0] == (1, {"prompt": "q"}) and rows[1][1].reason == "expected an object with named fields (got int)"


def test_template_failure_is_a_named_row_error(tmp_path, tiny_model_dir):
    from components.config import from_mapping
    from components.data_prep.config import DataPrepConfig
    from components.data_prep.main import run
    from components.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n"
                    + json.dumps({"messages": _m((U, "q"), (A, "a"))}) + "\n")
    cfg = from_mapping(DataPrepConfig, {"tokenizer": str(tmp_path / "plain"), "output_dir": str(tmp_path / "out"),
                                        "sources": [{"uri": str(data), "shape": "sft"}], "max_bad_fraction": 0.5})
    stats = run(cfg)
    [rejected] = [json.loads(ln) for ln in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert (rejected["line"], rejected["field"]) == (2, "prompt")
    assert rejected["reason"].startswith("the chat template cannot render it (chat messages need a tokenizer")
    assert stats["totals"]["kept"] == 1


def test_readme_documents_every_key_and_its_example_loads():
    import dataclasses
    import re
    from pathlib import Path

    import yaml

    from components.config import from_mapping
    from components.data_prep.config import DataPrepConfig, FileSource, TaskSource

    readme = (Path(__file__).parents[2] / "components" / "data_prep" / "README.md").read_text()
    for cls in (DataPrepConfig, FileSource, TaskSource):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in readme, f"{cls.__name__}.{f.name} is not in the README"
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    cfg = from_mapping(DataPrepConfig, example, "README example")
    assert [type(s).__name__ for s in cfg.sources] == ["FileSource"] * 4 + ["TaskSource"] * 2


def test_unreadable_table_file_is_a_broken_file(tmp_path):
    f = tmp_path / "d.parquet"
    f.write_text("not parquet")
    with pytest.raises(BrokenFile, match=r"not a readable Parquet file \(.*\): its rows cannot be counted"):
        list(READERS["parquet"](f, "s3://b/d.parquet"))
    with pytest.raises(BrokenFile, match=r"not a readable Arrow file after row 0 \("):
        list(READERS["datasets"](f, "d.arrow"))
