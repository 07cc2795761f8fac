"""data_prep on the shapes of public corpora, compressed and oddly encoded files, and files that break midway:
every fixture is written here, then read with the tiny model's tokenizer."""

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import from_mapping
from components.data_prep.config import DataPrepConfig
from components.data_prep.main import run
from components.datasets import DataError
from components.models import load_tokenizer
from components.templates import render_prompt_completion
from components.training.batching import encode_example

SYSTEM = "Be brief."
# CJK, emoji (with a skin tone and a ZWJ sequence) and combining marks (e + U+0301, not the precomposed é)
TEXT = "日本語の質問 👍🏽 👩‍💻 cafe\u0301 n\u0303"


def _jsonl(path, rows, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def _read(path):
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def _prep(tmp_path, tok_dir, sources, **settings):
    cfg = from_mapping(DataPrepConfig, {"tokenizer": str(tok_dir), "output_dir": str(tmp_path / "out"),
                                        "sources": sources, "eval_fraction": 0.0, **settings})
    return run(cfg), tmp_path / "out"


def _rejected(out):
    return [(r["file"].rsplit("/", 1)[-1], r["line"], r["field"], r["reason"]) for r in _read(out / "rejected.jsonl")]


def _m(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_every_named_format_auto_detected(tmp_path, tiny_model_dir):
    d = tmp_path / "d"
    _jsonl(d / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    _jsonl(d / "messages.jsonl", [{"messages": _m(("system", SYSTEM), ("user", "2+2="), ("assistant", "4"))}])
    _jsonl(d / "sharegpt.jsonl", [{"conversations": [
        {"from": "system", "value": SYSTEM}, {"from": "human", "value": TEXT}, {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": TEXT}]}])
    _jsonl(d / "alpaca.jsonl", [
        {"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Summarize", "input": "A long text.", "output": "Short.", "system": SYSTEM}])
    _jsonl(d / "pref.jsonl", [{"prompt": "3+3=", "chosen": "6", "rejected": "7"}])
    _jsonl(d / "ultrafeedback.jsonl", [
        {"prompt": "4+4=", "chosen": _m(("user", "4+4="), ("assistant", "8")),
         "rejected": _m(("user", "4+4="), ("assistant", "9")), "score_chosen": 9.0},
        {"prompt": "5+5=", "chosen": _m(("assistant", "10")), "rejected": _m(("assistant", "11"))}])
    _jsonl(d / "hh.jsonl", [{"chosen": f"\n\nHuman: {TEXT}\n\nAssistant: yes\n\nHuman: sure?\n\nAssistant: {TEXT}",
                             "rejected": f"\n\nHuman: {TEXT}\n\nAssistant: yes\n\nHuman: sure?\n\nAssistant: no"}])
    _jsonl(d / "prompts.jsonl", [
        {"prompt": "6+6=", "answer": "12"},
        {"conversations": [{"from": "human", "value": "7+7="}, {"from": "gpt", "value": "14"}]}])
    sft = [{"uri": str(d / n), "shape": "sft", "name": n} for n in ("sft.jsonl", "messages.jsonl", "sharegpt.jsonl",
                                                                    "alpaca.jsonl")]
    pref = [{"uri": str(d / n), "shape": "preference", "name": n} for n in ("pref.jsonl", "ultrafeedback.jsonl",
                                                                            "hh.jsonl")]
    stats, out = _prep(tmp_path, tiny_model_dir, sft + pref + [{"uri": str(d / "prompts.jsonl"), "shape": "prompts",
                                                                "name": "prompts"}])
    assert stats["totals"]["dropped"] == {}
    sft_rows = _read(out / "sft.train.jsonl")
    assert sft_rows == [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": _m(("system", SYSTEM), ("user", "2+2=")), "completion": "4"},
        {"prompt": _m(("system", SYSTEM), ("user", TEXT), ("assistant", "ok"), ("user", "and 3+3?")),
         "completion": TEXT},
        {"prompt": "Translate to French\n\nGood morning", "completion": "Bonjour"},  # the input is kept
        {"prompt": "Say hi", "completion": "hi"},
        {"prompt": _m(("system", SYSTEM), ("user", "Summarize\n\nA long text.")), "completion": "Short."},
    ]
    assert _read(out / "preference.train.jsonl") == [
        {"prompt": "3+3=", "chosen": "6", "rejected": "7"},
        {"prompt": _m(("user", "4+4=")), "chosen": "8", "rejected": "9"},
        {"prompt": "5+5=", "chosen": "10", "rejected": "11"},
        {"prompt": _m(("user", TEXT), ("assistant", "yes"), ("user", "sure?")), "chosen": TEXT, "rejected": "no"},
    ]
    assert _read(out / "prompts.train.jsonl") == [{"prompt": "6+6=", "answer": "12"},
                                                 {"prompt": _m(("user", "7+7="))}]

    # Training renders them through the chat template: the system turn is there, and only the answer (the last
    # assistant turn, with its end of turn) is trained.
    tok = load_tokenizer(tiny_model_dir)
    end_of_turn = render_prompt_completion(tok, "q", "a")[1][1:]
    for row in sft_rows:
        prompt_text, trained_text = render_prompt_completion(tok, row["prompt"], row["completion"])
        assert trained_text == row["completion"] + end_of_turn  # the answer and its end of turn, nothing else
        ex = encode_example(tok, row["prompt"], row["completion"])
        assert ex.input_ids[ex.completion_start:] == tok(trained_text, add_special_tokens=False)["input_ids"]
        if isinstance(row["prompt"], list) and row["prompt"][0]["role"] == "system":
            assert SYSTEM in prompt_text
        if "ok" in json.dumps(row["prompt"]):
            assert "ok" in prompt_text  # an earlier assistant turn is context, not trained


def test_output_text_is_byte_identical(tmp_path, tiny_model_dir):
    """CJK, emoji and combining marks pass through unnormalized (NFKC is only how rows are compared)."""
    data = _jsonl(tmp_path / "u.jsonl", [{"prompt": TEXT, "completion": TEXT + "\u0301"}])
    _, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(data), "shape": "sft"}])
    raw = (out / "sft.train.jsonl").read_bytes()
    assert raw == (json.dumps({"prompt": TEXT, "completion": TEXT + "\u0301"}, ensure_ascii=False) + "\n").encode()
    assert TEXT.encode() in raw and "cafe\u0301".encode() in raw and "café".encode() not in raw


def test_explicit_schema_fields_and_nested_paths(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "d.jsonl", [
        {"meta": {"question": "1+1=", "tags": ["x"]}, "answers": [{"text": "2"}]},
        {"meta": {"question": "2+2="}, "answers": []},                           # no answers.0.text: missing
        {"dialog": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Translate", "input": "Good morning", "output": "Bonjour"}])
    stats, out = _prep(tmp_path, tiny_model_dir, [
        {"uri": str(data), "shape": "sft", "schema": "sft", "name": "nested",
         "fields": {"prompt": "meta.question", "completion": "answers.0.text"}},
        {"uri": str(data), "shape": "sft", "schema": "sharegpt", "name": "renamed", "role": "eval",
         "fields": {"conversations": "dialog"}},
        # the attempt: ShareGPT turns under `messages` are read as well
        {"uri": str(data), "shape": "sft", "name": "as-messages", "role": "eval", "fields": {"messages": "dialog"}},
        {"uri": str(tmp_path / "alpaca.jsonl"), "shape": "sft", "schema": "alpaca", "name": "alpaca",
         "alpaca_template": "### Instruction:\n{instruction}\n\n### Input:\n{input}"},
    ], max_bad_fraction=0.7)
    assert _read(out / "sft.train.jsonl") == [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "### Instruction:\nTranslate\n\n### Input:\nGood morning", "completion": "Bonjour"}]
    assert _read(out / "sft.eval.jsonl") == [
        {"prompt": _m(("user", "hi")), "completion": "hello", "contaminated": False},
        {"prompt": _m(("user", "hi")), "completion": "hello", "contaminated": False}]
    rejected = [(r["source"], r["line"], r["field"], r["reason"].split(" (")[0]) for r in _read(out / "rejected.jsonl")]
    assert ("nested", 2, "answers.0.text", "missing") in rejected
    assert ("nested", 3, "meta.question", "missing") in rejected
    assert ("renamed", 1, "dialog", "missing") in rejected


@pytest.mark.parametrize("row, field, reason", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"},
                        {"from": "gpt", "value": "x"}]}, "conversations[1].from", "tool turns are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"},
                   {"role": "assistant", "content": "x"}]}, "messages[1].role", "tool turns are not supported"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[1].tool_calls", "tool calls are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": "x"}]},
     "messages[0].content", "list-valued content (content parts) is not supported"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]},
     "conversations[1].from", "unknown role"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "x"}]},
     "conversations[1].from", "out of order"),
    ({"instruction": "Say", "input": 3, "output": "x"}, "input", "must be a string"),
    ({"instruction": " ", "input": "x", "output": "y"}, "instruction", "empty"),
])
def test_tool_turns_and_bad_chat_rows_are_named(tmp_path, tiny_model_dir, row, field, reason):
    data = _jsonl(tmp_path / "chat.jsonl", [{"prompt": "1+1=", "completion": "2"}, row])
    _, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(data), "shape": "sft"}], max_bad_fraction=0.5)
    [(file, line, got_field, got_reason)] = _rejected(out)
    assert (file, line, got_field) == ("chat.jsonl", 2, field) and got_reason.startswith(reason), got_reason


@pytest.mark.parametrize("row, field, reason", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}, "rejected",
     "its turns before the last Assistant turn differ from chosen's"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns at all"}, "rejected",
     'expected "\\n\\nHuman: ..." and'),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: d"}, "chosen",
     "the last turn must be the Assistant's"),
    ({"chosen": _m(("user", "a"), ("assistant", "b")), "rejected": _m(("user", "z"), ("assistant", "c"))},
     "rejected", "its conversation before the answer differs from chosen's"),
    ({"chosen": _m(("user", "a"), ("assistant", "b")), "rejected": _m(("user", "a"))}, "rejected",
     "must be a list of messages ending with the assistant's answer"),
])
def test_bad_pairs_are_named(tmp_path, tiny_model_dir, row, field, reason):
    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    _, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(data), "shape": "preference"}], max_bad_fraction=0.5)
    [(file, line, got_field, got_reason)] = _rejected(out)
    assert (line, got_field) == (2, field) and got_reason.startswith(reason), got_reason


ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)]


def test_gzip_single_file_in_a_directory_and_with_format_forced(tmp_path, tiny_model_dir):
    _jsonl(tmp_path / "one.jsonl.gz", ROWS[:2], gzip.open)
    d = tmp_path / "dir"
    _jsonl(d / "a.jsonl", ROWS[2:3])
    with gzip.open(d / "b.json.gz", "wt", encoding="utf-8") as f:
        json.dump(ROWS[3:4], f)
    with gzip.open(d / "c.csv.gz", "wt", encoding="utf-8", newline="") as f:
        f.write("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS[4:5]))
    _jsonl(tmp_path / "forced.data", ROWS[5:], gzip.open)  # a name that says nothing, format named
    stats, out = _prep(tmp_path, tiny_model_dir, [
        {"uri": str(tmp_path / "one.jsonl.gz"), "shape": "sft", "name": "one"},
        {"uri": str(d), "shape": "sft", "name": "dir"},
        {"uri": str(tmp_path / "forced.data"), "shape": "sft", "format": "jsonl", "name": "forced"}])
    assert _read(out / "sft.train.jsonl") == ROWS
    assert stats["totals"]["dropped"] == {} and stats["sources"]["dir"]["ignored_files"] == []
    assert sorted(f.rsplit("/", 1)[1] for f in stats["sources"]["dir"]["files"]) == ["a.jsonl", "b.json.gz", "c.csv.gz"]


def test_zstd_file(tmp_path, tiny_model_dir):
    if not pa.Codec.is_available("zstd"):
        pytest.skip("this pyarrow has no zstd codec")
    with pa.CompressedOutputStream(str(tmp_path / "d.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS).encode())
    _, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(tmp_path / "d.jsonl.zst"), "shape": "sft"}])
    assert _read(out / "sft.train.jsonl") == ROWS


def test_truncated_gzip_fails_the_source(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "d.jsonl.gz", [{"prompt": f"{i}=", "completion": "x" * 50 + str(i)} for i in range(400)],
                  gzip.open)
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"1 file\(s\) break midway.*\n  .*d.jsonl.gz: the compressed stream breaks "
                                        r"after line \d+ \(EOFError"):
        _prep(tmp_path, tiny_model_dir, [{"uri": str(data), "shape": "sft"}], max_bad_fraction=0.9)


def test_byte_order_marks_are_read(tmp_path, tiny_model_dir):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"prompt": "1+1=", "completion": "2"}\n')
    (tmp_path / "b.json").write_bytes(bom + json.dumps([{"prompt": "2+2=", "completion": "4"}]).encode())
    (tmp_path / "c.csv").write_bytes(bom + b"prompt,completion\r\n3+3=,6\r\n")  # what Excel writes
    stats, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(tmp_path), "shape": "sft"}])
    assert _read(out / "sft.train.jsonl") == [{"prompt": "1+1=", "completion": "2"},
                                             {"prompt": "2+2=", "completion": "4"},
                                             {"prompt": "3+3=", "completion": "6"}]
    assert stats["totals"]["dropped"] == {}


def test_invalid_utf8_is_a_bad_row_never_replaced(tmp_path, tiny_model_dir):
    good = b'{"prompt": "1+1=", "completion": "2"}\n'
    broken = b'{"prompt": "caf\xe9", "completion": "x"}\n'  # Latin-1 é: not UTF-8
    (tmp_path / "a.jsonl").write_bytes(good + broken + good.replace(b"1+1", b"2+2"))
    (tmp_path / "b.csv").write_bytes(b"prompt,completion\n3+3=,6\n4+4=,\xff8\n")
    (tmp_path / "c.json").write_bytes(b'[{"prompt": "5+5=", "completion": "10"}, {"prompt": "\xc3", "completion": "y"},'
                                      b' {"prompt": "6+6=", "completion": "\\udc80"}]')
    stats, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(tmp_path), "shape": "sft", "name": "s"}],
                       max_bad_fraction=0.5)
    assert [r["prompt"] for r in _read(out / "sft.train.jsonl")] == ["1+1=", "2+2=", "3+3=", "5+5="]
    assert "\ufffd" not in (out / "sft.train.jsonl").read_text()
    rejected = _rejected(out)
    assert [(f, line, field) for f, line, field, _ in rejected] == [
        ("a.jsonl", 2, ""), ("b.csv", 3, "completion"), ("c.json", 2, "prompt"), ("c.json", 3, "completion")]
    assert all(reason.startswith("not valid UTF-8") for *_, reason in rejected)
    s = stats["sources"]["s"]
    assert s["rows"] == 8 and s["kept"] == 4 and s["dropped"] == {"completion: not valid UTF-8": 2,
                                                                   "not valid UTF-8": 1, "prompt: not valid UTF-8": 1}


def _half_written_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_broken_files_lose_no_rows_silently(tmp_path, tiny_model_dir):
    """The issue's case: 1000 good rows, a truncated 500-row JSON array and a half-written Parquet file, with
    max_bad_fraction 0.01, used to pass reporting 2 bad rows; the source fails, naming both files."""
    d = tmp_path / "d"
    _jsonl(d / "good.jsonl", [{"prompt": f"{i}+0=", "completion": str(i)} for i in range(1000)])
    text = json.dumps([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(500)])
    (d / "truncated.json").write_text(text[:len(text) // 2])
    _half_written_parquet(d / "half.parquet", [{"prompt": f"{i}+2=", "completion": str(i + 2)} for i in range(500)])
    with pytest.raises(DataError) as e:
        _prep(tmp_path, tiny_model_dir, [{"uri": str(d), "shape": "sft", "name": "d"}], max_bad_fraction=0.01)
    msg = str(e.value)
    assert "source 'd': 2 file(s) break midway, and the rows they lost cannot be counted" in msg
    assert f"{d}/half.parquet: not a readable Parquet file (" in msg
    assert f"{d}/truncated.json: not valid JSON (" in msg and "after 2" in msg  # complete rows before the break
    assert msg.count("\n") == 2, msg  # once each, no chained copies


def test_unreadable_parquet_row_group_counts_its_rows(tmp_path, tiny_model_dir):
    path = tmp_path / "rg.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"{i}+3=", "completion": str(i + 3)} for i in range(300)]), path,
                   row_group_size=100, compression="zstd" if pa.Codec.is_available("zstd") else "snappy")
    data = bytearray(path.read_bytes())
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[offset:offset + 40] = b"\xab" * 40  # the second row group's first page header
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"source 'rg': 100 of 300 rows are unusable \(allowed: 10%\)"):
        _prep(tmp_path, tiny_model_dir, [{"uri": str(path), "shape": "sft", "name": "rg"}], max_bad_fraction=0.1)
    stats, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(path), "shape": "sft", "name": "rg"}],
                       max_bad_fraction=0.5)
    s = stats["sources"]["rg"]
    assert (s["rows"], s["kept"]) == (300, 200) and s["dropped"] == {"in an unreadable Parquet row group": 100}
    assert s["files"][str(path)]["dropped_by"] == {"in an unreadable Parquet row group": 100}
    assert [r["line"] for r in _read(out / "rejected.jsonl")] == list(range(101, 201))


def test_unused_rows_are_counted_by_cause_and_file(tmp_path, tiny_model_dir):
    d = tmp_path / "d"
    _jsonl(d / "a.jsonl", [{"prompt": "1+1=", "completion": "2"}, "{not json", {"prompt": "1+1=", "completion": "2"}])
    _jsonl(d / "b.jsonl", [{"prompt": "2+2="}, {"prompt": "3+3=", "completion": "6"}])
    stats, _ = _prep(tmp_path, tiny_model_dir, [{"uri": str(d), "shape": "sft", "name": "d"}], max_bad_fraction=0.5)
    files = stats["sources"]["d"]["files"]
    assert files[f"{d}/a.jsonl"] == {"rows": 3, "kept": 1, "dropped": 2,
                                     "dropped_by": {"duplicate": 1, "not valid JSON": 1}}
    assert files[f"{d}/b.jsonl"] == {"rows": 2, "kept": 1, "dropped": 1, "dropped_by": {"completion: missing": 1}}
    t = stats["totals"]
    assert t["rows"] == t["kept"] + sum(t["dropped"].values()) == 5


def test_a_source_error_is_printed_once(tmp_path, tiny_model_dir, helpers):
    """A compressed file whose inner extension names no format: one message, printed once (no chained copies)."""
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"{}\n"))
    cfg = tmp_path / "dp.yaml"
    cfg.write_text(json.dumps({"tokenizer": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
                               "sources": [{"uri": str(tmp_path / "d.txt.gz"), "shape": "sft"}]}))
    proc = subprocess.run([sys.executable, "-m", "components.data_prep", "--config", str(cfg)], cwd=helpers.repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("cannot tell the format from the extension '.txt.gz'") == 1, proc.stderr[-3000:]
    assert proc.stderr.count(str(tmp_path / "d.txt.gz")) == 1, proc.stderr[-3000:]


def test_an_alpaca_fields_mapping_keeps_the_input(tmp_path, tiny_model_dir):
    """`fields: {prompt: instruction, completion: output}` (how alpaca data was read before the alpaca schema) used
    to drop the input column silently; it joins the instruction as the alpaca schema joins it."""
    data = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "Good morning", "output": "Bonjour"},
                                         {"instruction": "Say hi", "input": "", "output": "hi"}])
    _, out = _prep(tmp_path, tiny_model_dir, [{"uri": str(data), "shape": "sft", "name": "a",
                                               "fields": {"prompt": "instruction", "completion": "output"}}])
    assert _read(out / "sft.train.jsonl") == [{"prompt": "Translate\n\nGood morning", "completion": "Bonjour"},
                                             {"prompt": "Say hi", "completion": "hi"}]


def test_an_unterminated_csv_quote_names_the_file_line_and_column(tmp_path, tiny_model_dir):
    """A quote left open used to swallow the records after it into one row (counted as "completion missing");
    the file breaks instead, naming the line the record starts on and its column."""
    (tmp_path / "q.csv").write_text('prompt,completion\n1+1=,2\n"What is 2+2,4\n3+3=,6\n5+5=,10\n')
    with pytest.raises(DataError) as e:
        _prep(tmp_path, tiny_model_dir, [{"uri": str(tmp_path / "q.csv"), "shape": "sft", "name": "q"}],
              max_bad_fraction=0.5)
    assert f"{tmp_path / 'q.csv'}: line 3, column 'prompt': a quote that does not close" in str(e.value)
    # a quoted field that spans lines, closed, is still read
    (tmp_path / "ok.csv").write_text('prompt,completion\n"two\nlines",2\n"say ""hi""",hi\n')
    (tmp_path / "again").mkdir()
    _, out = _prep(tmp_path / "again", tiny_model_dir, [{"uri": str(tmp_path / "ok.csv"), "shape": "sft",
                                                         "name": "ok"}])
    assert _read(out / "sft.train.jsonl") == [{"prompt": "two\nlines", "completion": "2"},
                                             {"prompt": 'say "hi"', "completion": "hi"}]
