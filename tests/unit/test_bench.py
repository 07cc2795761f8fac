"""`posttrain bench`: the JSON lines it prints, and the workload it shares with the peer anchors."""

import importlib.util
import json
import random
import sys

import pytest

from pipelines import bench

SMALL = ["--size", "tiny", "--json", "--steps", "2", "--warmup", "1", "--max-len", "64", "--min-len", "16"]


def _lines(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _anchor_rows(bs, steps, min_len, max_len, vocab):
    """peer_anchors.sft()'s row loop and text(), verbatim."""
    def text(n, vocab, rng):
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))
    rng = random.Random(0); V = vocab  # noqa: E702
    rows = []
    for _ in range(bs * (steps + 2)):
        n = rng.randint(min_len, max_len); p = n // 4  # noqa: E702
        rows.append({"prompt": text(p, V, rng), "completion": text(n - p, V, rng)})
    return rows


def test_json_lines_for_sft_and_psft(capsys):
    assert bench.main(SMALL + ["--objectives", "sft,psft"]) == 0
    lines = _lines(capsys)
    assert [r["what"] for r in lines] == ["posttrain_sft", "posttrain_psft"]
    for r in lines:
        assert "error" not in r, r
        assert (r["size"], r["bs"], r["steps"], r["warmup"], r["device"]) == ("tiny", 8, 2, 1, "cpu")
        assert r["tokens_per_s"] > 0 and r["sec_per_step"] > 0
        # 2 measured steps of 8 sequences of 17..65 tokens (prompt + completion + EOS)
        assert 2 * 8 * 17 <= r["tokens"] <= 2 * 8 * 65
        assert 0 < r["trained_tokens"] < r["tokens"]
        assert r["mfu"] is None  # CPU, no PEAK_TFLOPS
        assert r["peak_mem_gb"] is None and r["peak_rss_gb"] > 0
        assert "speedup_vs_trl" not in r
    assert lines[1]["updates_per_batch"] == 8


def test_mfu_with_peak_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("PEAK_TFLOPS", "1")
    assert bench.main(SMALL + ["--objectives", "sft", "--steps", "1", "--warmup", "0"]) == 0
    (r,) = _lines(capsys)
    assert 0 < r["mfu"] < 1


def test_unknown_objective_names_the_known_ones(capsys):
    assert bench.main(SMALL + ["--objectives", "sft,dpo"]) == 2
    err = capsys.readouterr().err
    assert "dpo" in err and "sft, psft" in err


def test_table_without_json(capsys):
    assert bench.main([a for a in SMALL if a != "--json"] + ["--objectives", "sft", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["what", "size"] and "posttrain_sft" in out
    assert not out.lstrip().startswith("{")


@pytest.mark.parametrize("vocab,min_len,max_len", [(512, 16, 64), (512, 128, 1024), (151936, 128, 1024)])
def test_rows_are_the_peer_anchors_rows(vocab, min_len, max_len):
    bs, steps = 8, 3
    rows = bench.workload_rows(vocab, bs * (steps + 2), min_len, max_len)
    assert rows == _anchor_rows(bs, steps, min_len, max_len, vocab)
    # prefix-stable: fewer rows are the first rows of more
    assert bench.workload_rows(vocab, 5, min_len, max_len) == rows[:5]
    for r in rows:
        p, c = r["prompt"].split(), r["completion"].split()
        n = len(p) + len(c)
        assert min_len <= n <= max_len and len(p) == n // 4
        assert all(3 <= int(w[1:]) < vocab for w in p + c)


def test_examples_are_the_row_tokens_plus_eos():
    row = {"prompt": "t5 t17", "completion": "t200 t3 t42"}
    ex = bench.row_example(row)
    assert ex.input_ids == [5, 17, 200, 3, 42, bench.EOS_ID] and ex.completion_start == 2


def test_peer_tokenizer_reads_every_word_as_one_token():
    vocab = 512
    tok = bench.peer_tokenizer(vocab)
    rows = bench.workload_rows(vocab, 4, 16, 64)
    for r in rows:
        ex = bench.row_example(r)
        peer = bench.peer_row(r)
        ids = tok(peer["prompt"] + peer["completion"], add_special_tokens=False)["input_ids"]
        assert ids == ex.input_ids  # "t200" stays one token; no merge at the boundary or before EOS
        assert tok(peer["prompt"], add_special_tokens=False)["input_ids"] == ex.input_ids[:ex.completion_start]
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (bench.UNK_ID, bench.PAD_ID, bench.EOS_ID)


def test_missing_trl_is_reported_and_the_rest_runs(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    assert bench.main(SMALL + ["--objectives", "sft", "--peers", "trl", "--steps", "1", "--warmup", "0"]) == 0
    trl_line, ours = _lines(capsys)
    assert trl_line == {**trl_line, "what": "trl_sft", "error": bench.TRL_MISSING}
    assert ours["what"] == "posttrain_sft" and ours["tokens_per_s"] > 0 and "speedup_vs_trl" not in ours


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (pip install -e '.[bench]')")
def test_trl_peer_on_the_same_tokens(capsys):
    assert bench.main(SMALL + ["--objectives", "sft", "--peers", "trl"]) == 0
    trl_line, ours = _lines(capsys)
    assert trl_line["what"] == "trl_sft" and "error" not in trl_line, trl_line
    assert trl_line["same_tokens"] is True
    assert trl_line["tokens_per_s"] > 0 and 2 * 8 * 17 <= trl_line["tokens"] <= 2 * 8 * 65
    assert 0 < trl_line["trained_tokens"] < trl_line["tokens"]
    assert ours["speedup_vs_trl"] == pytest.approx(ours["tokens_per_s"] / trl_line["tokens_per_s"])
