"""The demo, shortened: the same path as `posttrain demo` (tiny model, generated task, SFT and PSFT through
the stage entrypoint, held-out evaluation), with fewer steps and prompts so it fits in CI."""

import json

from pipelines.demo import run_demo


def test_demo_short(tmp_path, capsys):
    results = run_demo(tmp_path, overrides={"max_steps": 120, "eval_prompts": 60, "train_rows": 4000})
    table = capsys.readouterr().out
    assert "psft" in table and "id acc" in table
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert set(summary) == {"base", "sft", "psft"}
    assert summary["base"]["eval"]["id"]["accuracy"] < 0.05
    for name in ("sft", "psft"):
        lines = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, 121))
        assert lines[-1]["nll"] < 0.6 * lines[0]["nll"]  # it learned
        ev = results[name]["eval"]
        assert ev["id"]["entropy"] < summary["base"]["eval"]["id"]["entropy"]
        assert 0 <= ev["ood"]["accuracy"] <= 1 and ev["id"]["n"] == 60
    assert "clip_ratio/high" in lines[-1] and "kl_old" in lines[-1]  # PSFT reports its clip statistics
