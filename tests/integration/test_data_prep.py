"""data_prep on real files of every format, with the tiny model's tokenizer: rows checked one by one."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from components.config import ConfigError, from_mapping
from components.data_prep.config import DataPrepConfig
from components.data_prep.main import main, on_eval_side, run
from components.datasets import DataError, prompt_key
from components.models import load_tokenizer
from components.tasks import get_task
from components.training.batching import encode_example


def _jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


def _read(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _arrow_stream(path, rows):
    """Write rows as `datasets` save_to_disk does: an Arrow IPC stream plus state.json."""
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text("{}")


def _prep(tmp_path, tiny_model_dir, sources, **settings):
    cfg = from_mapping(DataPrepConfig, {"tokenizer": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
                                        "sources": sources, **settings})
    return run(cfg), tmp_path / "out"


SYSTEM = {"role": "system", "content": "Be brief."}
LONG = "9" * 100
PREFS = [  # question, good, bad
    ("Say hi", "hi", "bye"), ("Say yes", "yes", "no"), ("Say one", "1", "2"), ("Say up", "up", "down"),
    ("Say hi", "hello", "go away"),  # the same prompt as the first: the same side of the split
    ("Say no", "no", " no "),        # chosen == rejected after normalization: invalid, named by its column 'bad'
    ("Say on", "on", "off"), ("Say in", "in", "out"),
]


@pytest.fixture()
def mixed(tmp_path):
    """A directory of JSONL, Parquet, chat and broken files, an eval CSV overlapping it, preference pairs in a
    JSON file and prompts in a `datasets` directory."""
    train = tmp_path / "data" / "train"
    _jsonl(train / "a.jsonl", [
        {"prompt": "1+1=", "completion": "2", "id": 7},
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "1+1=", "completion": "2"},                       # duplicate of line 1
        {"prompt": "9+9=", "completion": LONG},                      # longer than max_length
    ])
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "3+3=", "completion": "6"},
        {"prompt": " 1+1=  ", "completion": "2 "},                   # duplicate of a.jsonl:1 after normalization
        {"prompt": "5+5=", "completion": None},                      # null: missing
    ]), train / "b.parquet")
    _jsonl(train / "chat.jsonl", [
        {"messages": [SYSTEM, {"role": "user", "content": "4+4="}, {"role": "assistant", "content": "8"}]},
        {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6", "x": 1}]},
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "1+1="}]},
    ])
    _jsonl(train / "broken.jsonl", [
        {"prompt": "6+6=", "completion": "12"},
        '{"prompt": "7+7=", "completion": ',
        {"prompt": "8+8="},
        {"prompt": "8+9=", "completion": "  "},
    ])
    (train / "README.txt").write_text("not data\n")
    (tmp_path / "data" / "eval.csv").write_text("question,answer\n1+1=,2\n  2+2=  ,4\n10+10=,20\n")
    (tmp_path / "data" / "prefs.json").write_text(json.dumps(
        {"data": [{"question": q, "good": g, "bad": b} for q, g, b in PREFS]}))
    _arrow_stream(tmp_path / "data" / "hf_prompts", [{"q": "11+11=", "a": "22"}, {"q": "6+6=", "a": "12"},
                                                     {"q": " ", "a": "0"}])
    d = tmp_path / "data"
    return [
        {"uri": str(d / "train"), "shape": "sft", "role": "train", "name": "train"},
        {"uri": str(d / "eval.csv"), "shape": "sft", "role": "eval", "name": "eval",
         "fields": {"prompt": "question", "completion": "answer"}},
        {"uri": str(d / "prefs.json"), "shape": "preference", "role": "both", "name": "prefs",
         "fields": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        {"uri": str(d / "hf_prompts"), "shape": "prompts", "role": "eval", "split": "ood", "name": "prompts",
         "fields": {"prompt": "q", "answer": "a"}},
    ]


def test_mixed_directory_rows_stats_and_contamination(tmp_path, tiny_model_dir, mixed):
    stats, out = _prep(tmp_path, tiny_model_dir, mixed, max_length=64, eval_fraction=0.5, max_bad_fraction=0.4)
    train = str(tmp_path / "data" / "train")

    # Normalized rows, in source, file and line order; extra columns and message keys are gone.
    assert _read(out / "sft.train.jsonl") == [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "3+3=", "completion": "6"},
        {"prompt": "6+6=", "completion": "12"},
        {"prompt": [SYSTEM, {"role": "user", "content": "4+4="}], "completion": "8"},
        {"prompt": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                    {"role": "user", "content": "and 3+3?"}], "completion": "6"},
    ]
    assert _read(out / "sft.eval.jsonl") == [
        {"prompt": "1+1=", "completion": "2", "contaminated": True},
        {"prompt": "  2+2=  ", "completion": "4", "contaminated": True},   # equal to a training prompt once normalized
        {"prompt": "10+10=", "completion": "20", "contaminated": False},
    ]
    assert _read(out / "prompts.eval.jsonl") == [
        {"prompt": "11+11=", "answer": "22", "split": "ood", "contaminated": False},
        {"prompt": "6+6=", "answer": "12", "split": "ood", "contaminated": True},
    ]
    # Preference pairs split by a hash of the prompt: both sides used, no prompt on both.
    pairs = {side: _read(out / f"preference.{side}.jsonl") for side in ("train", "eval")}
    valid = [{"prompt": q, "chosen": g, "rejected": b} for q, g, b in PREFS if q != "Say no"]
    expected_eval = [p for p in valid if on_eval_side(prompt_key(p["prompt"]), 0, 0.5)]
    assert pairs["eval"] == [{**p, "contaminated": False} for p in expected_eval]
    assert pairs["train"] == [p for p in valid if p not in expected_eval]
    assert pairs["train"] and pairs["eval"]
    assert not {p["prompt"] for p in pairs["train"]} & {p["prompt"] for p in pairs["eval"]}

    # Every removed row, with file, line, field (as the source names it) and reason.
    rejected = [(r["source"], r["file"], r["line"], r["field"], r["reason"]) for r in _read(out / "rejected.jsonl")]
    expect = [
        ("train", f"{train}/a.jsonl", 3, "", f"duplicate (of {train}/a.jsonl:1)"),
        ("train", f"{train}/a.jsonl", 4, "", "longer than max_length ("),
        ("train", f"{train}/b.parquet", 2, "", f"duplicate (of {train}/a.jsonl:1)"),
        ("train", f"{train}/b.parquet", 3, "completion", "missing ("),
        ("train", f"{train}/broken.jsonl", 2, "", "not valid JSON ("),
        ("train", f"{train}/broken.jsonl", 3, "completion", "missing ("),
        ("train", f"{train}/broken.jsonl", 4, "completion", "empty completion"),
        ("train", f"{train}/chat.jsonl", 3, "messages[0].role", "out of order ("),
        ("prefs", str(tmp_path / "data" / "prefs.json"), 6, "bad", "the same as chosen ("),
        ("prompts", str(tmp_path / "data" / "hf_prompts") + "/data-00000-of-00001.arrow", 3, "q", "empty prompt"),
    ]
    assert len(rejected) == len(expect)
    for got, (source, file, line, fld, reason) in zip(rejected, expect):
        assert got[:4] == (source, file, line, fld) and got[4].startswith(reason), got

    # Statistics.
    s = stats["sources"]["train"]
    assert (s["rows"], s["kept"], s["train"], s["eval"], s["duplicates"], s["contaminated"]) == (14, 6, 6, 0, 2, 0)
    assert s["dropped"] == {"duplicate": 2, "longer than max_length": 1, "completion: missing": 2,
                            "not valid JSON": 1, "completion: empty completion": 1,
                            "messages[].role: out of order": 1}
    assert s["files"] == {
        f"{train}/a.jsonl": {"rows": 4, "kept": 2, "dropped": 2,
                             "dropped_by": {"duplicate": 1, "longer than max_length": 1}},
        f"{train}/b.parquet": {"rows": 3, "kept": 1, "dropped": 2,
                               "dropped_by": {"completion: missing": 1, "duplicate": 1}},
        f"{train}/broken.jsonl": {"rows": 4, "kept": 1, "dropped": 3,
                                  "dropped_by": {"completion: empty completion": 1, "completion: missing": 1,
                                                 "not valid JSON": 1}},
        f"{train}/chat.jsonl": {"rows": 3, "kept": 2, "dropped": 1,
                                "dropped_by": {"messages[].role: out of order": 1}}}
    assert s["ignored_files"] == [f"{train}/README.txt"]
    tok = load_tokenizer(tiny_model_dir)
    lengths = [len(encode_example(tok, r["prompt"], r["completion"])) for r in _read(out / "sft.train.jsonl")]
    assert (s["tokens"]["min"], s["tokens"]["max"]) == (min(lengths), max(lengths))
    assert s["tokens"]["mean"] == round(sum(lengths) / len(lengths), 2)
    hist = s["tokens"]["histogram"]
    assert list(hist)[:3] == ["0-15", "16-31", "32-63"] and list(hist)[-1] == "32768+"
    assert hist["0-15"] == sum(n < 16 for n in lengths) and sum(hist.values()) == 6
    assert stats["sources"]["eval"]["contaminated"] == 2 and stats["sources"]["prompts"]["contaminated"] == 1
    assert stats["sources"]["prefs"]["dropped"] == {"bad: the same as chosen": 1}
    assert stats["outputs"] == {"sft.train.jsonl": 6, "sft.eval.jsonl": 3, "prompts.eval.jsonl": 2,
                                "preference.train.jsonl": len(pairs["train"]),
                                "preference.eval.jsonl": len(pairs["eval"])}
    t = stats["totals"]
    assert (t["rows"], t["kept"], t["duplicates"], t["contaminated"]) == (28, 18, 2, 3)
    assert t["rows"] == t["kept"] + sum(t["dropped"].values())
    assert json.loads((out / "stats.json").read_text()) == stats

    # Deterministic: a rerun writes the same bytes; with contamination: drop the flagged rows are removed.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _prep(tmp_path, tiny_model_dir, mixed, max_length=64, eval_fraction=0.5, max_bad_fraction=0.4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    stats, out = _prep(tmp_path, tiny_model_dir, mixed, max_length=64, eval_fraction=0.5, max_bad_fraction=0.4,
                       contamination="drop")
    assert _read(out / "sft.eval.jsonl") == [{"prompt": "10+10=", "completion": "20", "contaminated": False}]
    assert stats["sources"]["eval"]["dropped"] == {"contaminated": 2}
    assert [r["line"] for r in _read(out / "rejected.jsonl") if r["source"] == "eval"] == [2, 3]


def test_too_bad_source_fails_naming_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    _jsonl(bad, [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2="}, {"prompt": "3+3=", "completion": "6"},
                 "not json", {"prompt": "", "completion": "0"}])
    with pytest.raises(DataError) as e:
        _prep(tmp_path, tiny_model_dir, [{"uri": str(bad), "shape": "sft"}], max_bad_fraction=0.4)
    msg = str(e.value)
    assert f"source '{bad}': 3 of 5 rows are unusable (allowed: 40%)" in msg
    assert f"{bad}:2: field 'completion': missing" in msg
    assert f"{bad}:4: not valid JSON" in msg
    assert f"{bad}:5: field 'prompt': empty prompt" in msg
    assert [r["line"] for r in _read(tmp_path / "out" / "rejected.jsonl")] == [2, 4, 5]
    assert not list((tmp_path / "out").glob("*.train.jsonl"))
    # The same rows pass when a per-source override allows them.
    stats, _ = _prep(tmp_path, tiny_model_dir, [{"uri": str(bad), "shape": "sft", "max_bad_fraction": 0.6}])
    assert stats["sources"][str(bad)]["kept"] == 2


def test_bundled_task_sources(tmp_path, tiny_model_dir):
    sources = [{"task": "arithmetic", "rows": 40, "shape": "sft"},
               {"task": "arithmetic", "rows": 10, "shape": "prompts", "part": "test"},
               {"task": "arithmetic", "rows": 10, "shape": "prompts", "split": "ood", "seed": 3}]
    stats, out = _prep(tmp_path, tiny_model_dir, sources)
    task = get_task("arithmetic")
    assert _read(out / "sft.train.jsonl") == [{"prompt": r["prompt"], "completion": r["completion"]}
                                              for r in task.generate(40, seed=0)]
    held_out = task.generate(10, seed=0, part="test") + task.generate(10, seed=3, split="ood")
    assert _read(out / "prompts.eval.jsonl") == [
        {"prompt": r["prompt"], "answer": r["answer"], "task": "arithmetic", "split": r["split"],
         "contaminated": False} for r in held_out]
    assert stats["totals"]["contaminated"] == 0 and stats["totals"]["dropped"] == {}
    assert stats["sources"]["arithmetic/id/train/seed=0"]["files"] == {
        "task:arithmetic/id/train/seed=0": {"rows": 40, "kept": 40, "dropped": 0, "dropped_by": {}}}


def test_role_both_split_is_by_prompt_and_seed(tmp_path, tiny_model_dir):
    def prompts(seed):
        src = [{"task": "arithmetic", "rows": 200, "shape": "sft", "role": "both"}]
        _, out = _prep(tmp_path, tiny_model_dir, src, eval_fraction=0.2, seed=seed)
        return [{r["prompt"] for r in _read(out / f"sft.{side}.jsonl")} for side in ("train", "eval")]

    train, evals = prompts(0)
    assert not train & evals and len(train | evals) == 200 and 20 <= len(evals) <= 60
    assert prompts(0) == [train, evals]
    assert prompts(1)[1] != evals


def test_datasets_save_to_disk_and_arrow_file_format(tmp_path, tiny_model_dir):
    import datasets  # the bench extra's; imported here, not when the module is collected
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    table = pa.Table.from_pylist(rows[:2])
    (tmp_path / "file_format").mkdir()
    with pa.OSFile(str(tmp_path / "file_format" / "rows.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    stats, out = _prep(tmp_path, tiny_model_dir, [
        {"uri": str(tmp_path / "saved"), "shape": "sft", "role": "train"},
        {"uri": str(tmp_path / "file_format"), "shape": "sft", "role": "eval"}])
    assert _read(out / "sft.train.jsonl") == rows
    assert _read(out / "sft.eval.jsonl") == [{**r, "contaminated": True} for r in rows[:2]]
    assert stats["sources"][str(tmp_path / "saved")]["ignored_files"] == []

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="a DatasetDict with splits train: point uri at one split's directory"):
        _prep(tmp_path, tiny_model_dir, [{"uri": str(tmp_path / "dict"), "shape": "sft"}])


def test_cli_runs_a_config_file(tmp_path, tiny_model_dir):
    from pipelines.cli import main as posttrain

    cfg = tmp_path / "data_prep.yaml"
    cfg.write_text(yaml.safe_dump({"tokenizer": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
                                   "sources": [{"task": "arithmetic", "rows": 5, "shape": "sft"}]}))
    main(["--config", str(cfg)])
    assert len(_read(tmp_path / "out" / "sft.train.jsonl")) == 5
    (tmp_path / "out" / "sft.train.jsonl").unlink()
    assert posttrain(["stage", "data_prep", "--config", str(cfg)]) == 0
    assert len(_read(tmp_path / "out" / "sft.train.jsonl")) == 5


@pytest.mark.parametrize("source, message", [
    ({"uri": "d", "shape": "sft", "format": "xml"}, "sources[0]: format='xml' is invalid: one of auto, jsonl"),
    ({"uri": "d", "shape": "pairs"}, "sources[0]: shape='pairs' is invalid: one of sft, preference, prompts"),
    ({"uri": "d", "shape": "sft", "role": "test"}, "sources[0]: role='test' is invalid: one of train, eval, both"),
    ({"uri": "d", "shape": "sft", "fields": {"answer": "a"}},
     "sources[0]: fields: 'answer' is not a column of a sft row: one of prompt, completion, messages, "
     "conversations, instruction, output, input, system"),
    ({"uri": "d", "shape": "sft", "schema": "hh"}, "sources[0]: schema='hh' is invalid for shape sft: one of auto, "
                                                   "sft, messages, sharegpt, alpaca"),
    ({"uri": "d", "shape": "sft", "schema": "orca"}, "sources[0]: schema='orca' is invalid: one of auto, sft,"),
    ({"uri": "d", "shape": "sft", "schema": "alpaca", "fields": {"prompt": "q"}},
     "sources[0]: fields: 'prompt' is not a column of the alpaca schema: one of instruction, output, input, system"),
    ({"uri": "d", "shape": "sft", "alpaca_template": "{instruction}"},
     "alpaca_template='{instruction}' is invalid: it needs both {instruction} and {input}"),
    ({"uri": "s3://bucket/../x", "shape": "sft"}, "'s3://bucket/../x': the key"),
    ({"uri": "d", "shape": "sft", "split": "ood"}, "sources[0]: split='ood' is invalid: id or ood, for a source "
                                                   "of shape prompts only"),
    ({"uri": "d", "shape": "sft", "colums": {}}, "sources[0]: colums: unknown key; allowed:"),
    ({"uri": "d"}, "sources[0]: shape: missing; this key is required"),
    ({"task": "sudoku", "rows": 5, "shape": "sft"}, "sources[0]: unknown task 'sudoku'; known tasks:"),
    ({"task": "arithmetic", "rows": 5, "shape": "preference"}, "shape='preference' is invalid for a task: sft or"),
    ({"task": "arithmetic", "rows": 0, "shape": "sft"}, "sources[0]: rows=0 is invalid: a positive integer"),
    ("data.jsonl", "sources[0]='data.jsonl' is invalid: a mapping with uri (files) or task (a bundled task)"),
])
def test_bad_source_config_is_named(source, message):
    with pytest.raises(ConfigError) as e:
        from_mapping(DataPrepConfig, {"tokenizer": "t", "output_dir": "o", "sources": [source]}, "dp.yaml")
    assert str(e.value).startswith("dp.yaml: ") and message in str(e.value), str(e.value)


def test_duplicate_source_names_and_bad_settings_are_named():
    src = {"uri": "d", "shape": "sft"}
    with pytest.raises(ConfigError, match="the name 'd' is used 2 times"):
        from_mapping(DataPrepConfig, {"tokenizer": "t", "output_dir": "o", "sources": [src, src]})
    for key, value, message in [("eval_fraction", 1.0, "eval_fraction=1.0 is invalid: a number in [0, 1)"),
                                ("contamination", "keep", "contamination='keep' is invalid: one of flag, drop"),
                                ("max_length", 0, "max_length=0 is invalid: a positive integer")]:
        with pytest.raises(ConfigError) as e:
            from_mapping(DataPrepConfig, {"tokenizer": "t", "output_dir": "o", "sources": [src], key: value})
        assert message in str(e.value)


def test_s3_sources_on_a_loopback_endpoint(tmp_path, tiny_model_dir, monkeypatch):
    from moto.server import ThreadedMotoServer

    from components import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
        monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
        storage.client().make_bucket("posttrain-data")
        _jsonl(tmp_path / "up" / "sft" / "a.jsonl", [{"prompt": "1+1=", "completion": "2"}, "{broken"])
        pq.write_table(pa.Table.from_pylist([{"q": "2+2=", "a": "4"}]), tmp_path / "up" / "sft" / "b.parquet")
        _jsonl(tmp_path / "up" / "eval.jsonl", [{"q": "2+2=", "a": "4"}])
        storage.upload(tmp_path / "up" / "sft", "s3://posttrain-data/sets/sft")
        storage.upload(tmp_path / "up" / "eval.jsonl", "s3://posttrain-data/sets/eval.jsonl")

        stats, out = _prep(tmp_path, tiny_model_dir, [
            {"uri": "s3://posttrain-data/sets/sft", "shape": "sft", "role": "train", "max_bad_fraction": 0.7,
             "fields": {"prompt": "q", "completion": "a"}},
            {"uri": "s3://posttrain-data/sets/eval.jsonl", "shape": "prompts", "role": "eval",
             "fields": {"prompt": "q", "answer": "a"}}])
    finally:
        server.stop()
    assert _read(out / "sft.train.jsonl") == [{"prompt": "2+2=", "completion": "4"}]
    assert _read(out / "prompts.eval.jsonl") == [{"prompt": "2+2=", "answer": "4", "contaminated": True}]
    [bad1, bad2] = _read(out / "rejected.jsonl")
    assert (bad1["file"], bad1["line"], bad1["field"]) == ("s3://posttrain-data/sets/sft/a.jsonl", 1, "q")
    assert (bad2["file"], bad2["line"], bad2["reason"][:14]) == ("s3://posttrain-data/sets/sft/a.jsonl", 2,
                                                                 "not valid JSON")
    assert set(stats["sources"]["s3://posttrain-data/sets/sft"]["files"]) == {
        "s3://posttrain-data/sets/sft/a.jsonl", "s3://posttrain-data/sets/sft/b.parquet"}
