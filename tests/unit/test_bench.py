"""`posttrain bench`: the JSON lines it prints, and the reference workload it draws (docs/bench.md)."""

import json
import random
import sys

import pytest
import torch

from pipelines.bench import main
from pipelines.bench.trl_peer import TRL_MISSING
from pipelines.bench.workloads import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    dpo_rows,
    pair_ids,
    peer_row,
    peer_tokenizer,
    rm_pair_row,
    row_example,
    save_model,
    stage_pair_row,
    workload_rows,
)

SMALL = ["--size", "tiny", "--json", "--steps", "2", "--warmup", "1", "--max-len", "64", "--min-len", "16"]


def _lines(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _reference_rows(bs, steps, min_len, max_len, vocab):
    """The reference SFT workload's row loop and text draw, written out independently of workloads.py."""
    def text(n, vocab, rng):
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))
    rng = random.Random(0); V = vocab  # noqa: E702
    rows = []
    for _ in range(bs * (steps + 2)):
        n = rng.randint(min_len, max_len); p = n // 4  # noqa: E702
        rows.append({"prompt": text(p, V, rng), "completion": text(n - p, V, rng)})
    return rows


def test_json_lines_for_sft_and_psft(capsys):
    assert main(SMALL + ["--objectives", "sft,psft"]) == 0
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
    assert main(SMALL + ["--objectives", "sft", "--steps", "1", "--warmup", "0"]) == 0
    (r,) = _lines(capsys)
    assert 0 < r["mfu"] < 1


def test_unknown_objective_names_the_known_ones(capsys):
    assert main(SMALL + ["--objectives", "sft,kto"]) == 2
    err = capsys.readouterr().err
    assert "kto" in err and "sft, psft, dpo, grpo, rm, ppo" in err


def test_table_without_json(capsys):
    assert main([a for a in SMALL if a != "--json"] + ["--objectives", "sft", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["what", "size"] and "posttrain_sft" in out
    assert not out.lstrip().startswith("{")


@pytest.mark.parametrize("vocab,min_len,max_len", [(512, 16, 64), (512, 128, 1024), (151936, 128, 1024)])
def test_rows_are_the_reference_workload_rows(vocab, min_len, max_len):
    bs, steps = 8, 3
    rows = workload_rows(vocab, bs * (steps + 2), min_len, max_len)
    assert rows == _reference_rows(bs, steps, min_len, max_len, vocab)
    # prefix-stable: fewer rows are the first rows of more
    assert workload_rows(vocab, 5, min_len, max_len) == rows[:5]
    for r in rows:
        p, c = r["prompt"].split(), r["completion"].split()
        n = len(p) + len(c)
        assert min_len <= n <= max_len and len(p) == n // 4
        assert all(3 <= int(w[1:]) < vocab for w in p + c)


def test_examples_are_the_row_tokens_plus_eos():
    row = {"prompt": "t5 t17", "completion": "t200 t3 t42"}
    ex = row_example(row)
    assert ex.input_ids == [5, 17, 200, 3, 42, EOS_ID] and ex.completion_start == 2


def test_peer_tokenizer_reads_every_word_as_one_token():
    vocab = 512
    tok = peer_tokenizer(vocab)
    rows = workload_rows(vocab, 4, 16, 64)
    for r in rows:
        ex = row_example(r)
        peer = peer_row(r)
        ids = tok(peer["prompt"] + peer["completion"], add_special_tokens=False)["input_ids"]
        assert ids == ex.input_ids  # "t200" stays one token; no merge at the boundary or before EOS
        assert tok(peer["prompt"], add_special_tokens=False)["input_ids"] == ex.input_ids[:ex.completion_start]
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (UNK_ID, PAD_ID, EOS_ID)


def test_missing_trl_is_reported_and_the_rest_runs(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    monkeypatch.setenv("POSTTRAIN_THREADS", "1")  # every line, the error's too, says the threads it ran with
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    took = torch.get_num_threads()  # 1, or the count that stays where vLLM ran in this process (components/threads.py)
    torch.set_num_threads(before)
    assert main(SMALL + ["--objectives", "sft", "--peers", "trl", "--steps", "1", "--warmup", "0"]) == 0
    trl_line, ours = _lines(capsys)
    assert trl_line == {**trl_line, "what": "trl_sft", "error": TRL_MISSING, "threads": took}
    assert ours["threads"] == took
    assert ours["what"] == "posttrain_sft" and ours["tokens_per_s"] > 0 and "speedup_vs_trl" not in ours


def test_trl_peer_on_the_same_tokens(capsys):
    assert main(SMALL + ["--objectives", "sft", "--peers", "trl"]) == 0
    trl_line, ours = _lines(capsys)
    assert trl_line["what"] == "trl_sft" and "error" not in trl_line, trl_line
    assert trl_line["same_tokens"] is True
    assert trl_line["threads"] == ours["threads"] >= 1  # one count for both, chosen at the start
    assert trl_line["tokens_per_s"] > 0 and 2 * 8 * 17 <= trl_line["tokens"] <= 2 * 8 * 65
    assert 0 < trl_line["trained_tokens"] < trl_line["tokens"]
    assert ours["speedup_vs_trl"] == pytest.approx(ours["tokens_per_s"] / trl_line["tokens_per_s"])


RL = SMALL + ["--steps", "2", "--warmup", "1", "--prompt-len", "16", "--new-tokens", "12", "--grpo-steps", "2",
              "--grpo-batch-size", "16", "--group", "4"]


def test_json_lines_for_dpo_and_grpo(capsys):
    assert main(RL + ["--objectives", "dpo,grpo"]) == 0
    dpo, grpo = _lines(capsys)
    assert dpo["what"] == "posttrain_dpo" and "error" not in dpo, dpo
    # 2 measured steps × 8 pairs × (chosen, rejected) of 16 prompt + 16 completion words + EOS
    assert dpo["tokens"] == 2 * 8 * 2 * 33 and (dpo["prompt_len"], dpo["completion_len"]) == (16, 16)
    assert 0 < dpo["pairs_per_s"] < dpo["pairs_per_s_steps_only"]  # the reference pass's share is counted
    assert dpo["pairs_per_s"] == pytest.approx(2 * 8 / (2 * dpo["sec_per_step"]))
    assert grpo["what"] == "posttrain_grpo" and "error" not in grpo, grpo
    assert (grpo["bs"], grpo["group"], grpo["steps"], grpo["new_tokens"]) == (16, 4, 2, 12)
    # 2 measured steps of 16 sequences: 16 prompt tokens each, 1..12 completion tokens (EOS may end one early)
    assert 2 * 16 <= grpo["completion_tokens"] <= 2 * 16 * 12
    assert grpo["tokens"] == 2 * 16 * 16 + grpo["completion_tokens"]
    assert grpo["completion_tokens_per_s"] == pytest.approx(grpo["completion_tokens"] / (2 * grpo["sec_per_step"]))
    assert 0 < grpo["rollout_s"] < 2 * grpo["sec_per_step"]
    _assert_ranks(grpo, 1)


def test_grpo_workload_is_checked(capsys):
    assert main(RL + ["--objectives", "grpo", "--group", "5"]) == 2  # 5 does not divide 16
    assert main(RL + ["--objectives", "grpo", "--steps-per-rollout", "2", "--grpo-steps", "3"]) == 2
    assert "--steps-per-rollout" in capsys.readouterr().err


def test_dpo_stage_reads_the_pair_ids(tmp_path):
    """What the dpo stage tokenizes from its JSONL (through the saved tokenizer) is the reference pair, word by
    word, plus EOS: the same ids TRL is checked against (same_tokens)."""
    from components.dpo.main import encode_pairs
    from components.models import load_tokenizer

    save_model("tiny", str(tmp_path / "model"))
    tok = load_tokenizer(tmp_path / "model")
    rows = dpo_rows(512, 6, 64)
    pairs, dropped = encode_pairs([stage_pair_row(r) for r in rows], tok, 65, "pairs.jsonl")
    assert dropped == 0
    for (chosen, rejected), row in zip(pairs, rows):
        prompt, c, r = pair_ids(row)
        assert chosen.input_ids == prompt + c and rejected.input_ids == prompt + r
        assert chosen.completion_start == rejected.completion_start == len(prompt) == 16


def test_trl_dpo_and_grpo_peers(capsys):
    assert main(RL + ["--objectives", "dpo,grpo", "--peers", "trl"]) == 0
    trl_dpo, trl_grpo, dpo, grpo = _lines(capsys)
    assert [r["what"] for r in (trl_dpo, trl_grpo)] == ["trl_dpo", "trl_grpo"]
    for r in (trl_dpo, trl_grpo):
        assert "error" not in r, r
        assert r["activation_checkpointing"] is True  # TRL's default, as the reference measurements ran it
    assert trl_dpo["same_tokens"] is True and trl_dpo["tokens"] == dpo["tokens"]
    assert dpo["speedup_vs_trl"] == pytest.approx(dpo["pairs_per_s"] / trl_dpo["pairs_per_s"])
    assert dpo["vs"] == "trl_dpo" and grpo["vs"] == "trl_grpo"
    assert 2 * 16 <= trl_grpo["completion_tokens"] <= 2 * 16 * 12
    assert trl_grpo["tokens"] == 2 * 16 * 16 + trl_grpo["completion_tokens"]
    assert grpo["speedup_vs_trl"] == pytest.approx(
        grpo["completion_tokens_per_s"] / trl_grpo["completion_tokens_per_s"])


def test_small_size_is_25m_parameters_over_the_tiny_vocabulary():
    from pipelines.bench.workloads import SIZES, build_model

    assert SIZES["small"]["vocab_size"] == SIZES["tiny"]["vocab_size"]
    assert 24e6 < sum(p.numel() for p in build_model("small").parameters()) < 26e6


def test_json_lines_for_rm_and_ppo(capsys):
    assert main(RL + ["--objectives", "rm,ppo"]) == 0
    rm, ppo = _lines(capsys)
    assert rm["what"] == "posttrain_rm" and "error" not in rm, rm
    # the DPO workload: 2 measured steps × 8 pairs × (chosen, rejected) of 16 prompt + 16 completion words + EOS
    assert rm["tokens"] == 2 * 8 * 2 * 33 and (rm["bs"], rm["steps"], rm["prompt_len"]) == (8, 2, 16)
    assert rm["pairs_per_s"] == pytest.approx(2 * 8 / (2 * rm["sec_per_step"]))
    assert rm["tokens_per_s"] == pytest.approx(rm["tokens"] / (2 * rm["sec_per_step"]))
    assert 0 <= rm["accuracy"] <= 1 and "speedup_vs_trl" not in rm
    assert ppo["what"] == "posttrain_ppo" and "error" not in ppo, ppo
    # 2 measured rounds of 16 prompts, one completion each, 4 optimizer steps per round
    assert (ppo["bs"], ppo["rounds"], ppo["steps"], ppo["ppo_epochs"], ppo["new_tokens"]) == (16, 2, 8, 4, 12)
    assert 2 * 16 <= ppo["completion_tokens"] <= 2 * 16 * 12
    # each of the 8 steps trains every sequence of its round: 16 prompt tokens + its completion
    assert ppo["tokens"] == 4 * (2 * 16 * 16 + ppo["completion_tokens"])
    assert ppo["completion_tokens_per_s"] == pytest.approx(ppo["completion_tokens"] / (8 * ppo["sec_per_step"]))
    assert 0 < ppo["rollout_s"] < 8 * ppo["sec_per_step"]
    assert "peer" not in ppo and "speedup_vs_trl" not in ppo
    _assert_ranks(ppo, 1)


def test_ppo_row_runs_the_stage_defaults():
    from components.ppo.config import PRESETS
    from pipelines.bench.ours import PPO_EPOCHS

    assert (PPO_EPOCHS, 1) == (PRESETS["ppo"]["ppo_epochs"], PRESETS["ppo"]["num_minibatches"])


def test_rm_stage_reads_the_pair_ids(tmp_path):
    """What the reward_model stage tokenizes from its JSONL (through the saved tokenizer) is the reference pair
    word by word plus EOS, scored at the EOS: the ids TRL's RewardTrainer is checked against (same_tokens)."""
    from components.models import load_tokenizer
    from components.reward_model.main import encode

    save_model("tiny", str(tmp_path / "model"))
    tok = load_tokenizer(tmp_path / "model")
    tok.truncation_side = "left"
    for row in dpo_rows(512, 6, 64):
        pair = rm_pair_row(row)
        prompt, chosen, rejected = pair_ids(row)
        for completion, ids in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
            example = encode(tok, pair["prompt"], completion, 65)
            assert example.input_ids == prompt + ids and example.completion_start == len(prompt + ids) - 1
            assert example.input_ids[-1] == EOS_ID


def test_trl_rm_peer_and_no_ppo_peer(capsys):
    assert main(RL + ["--objectives", "rm,ppo", "--peers", "trl"]) == 0
    trl_rm, rm, ppo = _lines(capsys)  # no trl_ppo line: there is no peer to run
    assert trl_rm["what"] == "trl_rm" and "error" not in trl_rm, trl_rm
    assert trl_rm["same_tokens"] is True and trl_rm["tokens"] == rm["tokens"] == 2 * 8 * 2 * 33
    assert trl_rm["activation_checkpointing"] is True  # TRL's default
    assert trl_rm["pairs_per_s"] == pytest.approx(2 * 8 / (2 * trl_rm["sec_per_step"]))
    assert rm["vs"] == "trl_rm" and rm["speedup_vs_trl"] == pytest.approx(rm["pairs_per_s"] / trl_rm["pairs_per_s"])
    assert ppo["what"] == "posttrain_ppo" and "no PPO trainer" in ppo["peer"] and "speedup_vs_trl" not in ppo


def test_rollout_engines_and_nproc_are_checked(capsys):
    assert main(RL + ["--objectives", "grpo", "--rollout", "hf,sglang"]) == 2
    assert "unknown rollout engine(s) sglang; known: hf, vllm" in capsys.readouterr().err
    assert main(RL + ["--objectives", "grpo", "--rollout", ","]) == 2
    assert main(RL + ["--objectives", "grpo", "--nproc", "0"]) == 2
    assert main(RL + ["--objectives", "sft,grpo", "--nproc", "2"]) == 2  # sft runs in one process only
    assert "--nproc > 1 measures grpo and ppo only" in capsys.readouterr().err


def test_one_grpo_and_one_ppo_line_per_rollout_engine(capsys, monkeypatch):
    """--rollout hf,vllm measures each rollout objective once per engine, in the order given, each line naming its
    engine; the objectives without a rollout are measured once."""
    import pipelines.bench.cli as cli

    ran = []

    def fake(objective):
        def run(a, work, dev, token_budget):
            ran.append((objective, a.rollout))
            return {"completion_tokens_per_s": 1.0}
        return run

    monkeypatch.setattr(cli, "run_ours_grpo", fake("grpo"))
    monkeypatch.setattr(cli, "run_ours_ppo", fake("ppo"))
    monkeypatch.setattr(cli, "run_ours_dpo", lambda a, work, dev, token_budget: ran.append(("dpo", a.rollout)) or {})
    assert main(RL + ["--objectives", "grpo,dpo,ppo", "--rollout", "hf,vllm"]) == 0
    assert ran == [("grpo", "hf"), ("grpo", "vllm"), ("dpo", None), ("ppo", "hf"), ("ppo", "vllm")]
    lines = _lines(capsys)
    assert [(r["what"], r.get("rollout")) for r in lines] == [
        ("posttrain_grpo", "hf"), ("posttrain_grpo", "vllm"), ("posttrain_dpo", None), ("posttrain_ppo", "hf"),
        ("posttrain_ppo", "vllm")]


def _assert_ranks(line: dict, nproc: int):
    """The line's per-rank numbers: every rank sampled its share of the measured rounds (together, every sampled
    token: μ = 1 and one PPO minibatch train each once), each its own rate, sync seconds and peak memory."""
    assert "error" not in line, line
    assert line["nproc"] == nproc and [r["rank"] for r in line["ranks"]] == list(range(nproc))
    assert line["threads"] == line["ranks"][0]["threads"] and all(r["threads"] >= 1 for r in line["ranks"])
    assert sum(r["completion_tokens"] for r in line["ranks"]) == line["completion_tokens"]
    for r in line["ranks"]:
        assert r["completion_tokens"] > 0 and r["peak_rss_gb"] > 0 and r["sync_s"] >= 0
        assert r["completion_tokens_per_s"] == pytest.approx(r["completion_tokens"] / line["measured_s"])
        # from the first measured round on, a sync after each round but the last (hf: a call that copies nothing)
        rounds = line["rounds"] if "rounds" in line else line["steps"] // line["steps_per_rollout"]
        assert r["syncs"] == rounds - 1
    assert sum(r["completion_tokens_per_s"] for r in line["ranks"]) == pytest.approx(line["completion_tokens_per_s"])
    assert line["peak_rss_gb"] == max(r["peak_rss_gb"] for r in line["ranks"])
