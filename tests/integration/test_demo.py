"""The demo, shortened: the same path as `posttrain demo --stages sft,psft,dpo,grpo` (tiny model, generated
task, every stage through its entrypoint, one evaluate-stage run with its report), with fewer steps and
prompts so it fits in CI. The report is opened in headless Chromium and every figure must have rendered."""

import json
import shutil

import pytest
from test_report import rendered  # the Chromium check of the report test

from pipelines.demo import DEMO_SPEC, run_demo


def test_demo_short(tmp_path, capsys):
    results = run_demo(tmp_path, overrides={"max_steps": 120, "eval_prompts": 60, "train_rows": 4000,
                                            "reward_scoring": {"prompts": {"task_rows": 64}},
                                            "dpo": {"train": {"max_steps": 6}},
                                            "grpo": {"prompts_per_round": 8,
                                                     "train": {"max_steps": 4, "batch_size": 64}}},
                       stages=("sft", "psft", "dpo", "grpo"))
    table = capsys.readouterr().out
    assert "psft" in table and "grpo" in table and "id acc" in table
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert list(summary) == ["base", "sft", "psft", "dpo", "grpo"]
    assert summary["base"]["eval"]["id"]["accuracy"] < 0.05
    for name in ("sft", "psft"):
        lines = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, 121))
        assert lines[-1]["nll"] < 0.6 * lines[0]["nll"]  # it learned
        ev = results[name]["eval"]
        assert ev["id"]["entropy"] < summary["base"]["eval"]["id"]["entropy"]
        assert 0 <= ev["ood"]["accuracy"] <= 1 and ev["id"]["n"] == 60
        low, high = ev["id"]["accuracy_ci"]
        assert low <= ev["id"]["accuracy"] <= high
    assert "clip_ratio/high" in lines[-1] and "kl_old" in lines[-1]  # PSFT reports its clip statistics
    assert (tmp_path / "scoring" / "pairs.jsonl").exists() and summary["dpo"]["final"]["rewards/accuracies"] >= 0
    assert summary["grpo"]["final"]["frac_reward_zero_std"] >= 0

    report = tmp_path / "eval" / "report.html"
    html = report.read_text()
    for name in ("base", "sft", "psft", "dpo", "grpo"):
        assert name in html
    images = rendered(report, tmp_path)
    assert len(images.images) >= 3 and all(img.get("data-ok") == "1" for img in images.images)

    # base_model: both runs start from a given model (here the SFT model above), copied into the output
    again = run_demo(tmp_path / "again", overrides={"base_model": str(tmp_path / "sft" / "model"), "max_steps": 2,
                                                    "eval_prompts": 20, "train_rows": 300}, stages=("sft",))
    assert ((tmp_path / "again" / "base" / "model.safetensors").read_bytes()
            == (tmp_path / "sft" / "model" / "model.safetensors").read_bytes())
    assert again["base"]["eval"]["id"]["entropy"] < summary["base"]["eval"]["id"]["entropy"] - 1


def test_demo_base_model_must_be_a_model_directory_outside_the_output(tmp_path, tiny_model_dir, capsys):
    from pipelines.cli import main as cli

    with pytest.raises(FileNotFoundError, match="nope: not a model directory"):
        run_demo(tmp_path, overrides={"base_model": str(tmp_path / "nope")})
    inside = tmp_path / "out" / "sft" / "model"
    shutil.copytree(tiny_model_dir, inside)
    with pytest.raises(ValueError, match="is inside the output directory"):
        run_demo(tmp_path / "out", overrides={"base_model": str(inside)})
    assert (inside / "config.json").exists()  # nothing was removed
    spec = tmp_path / "demo.yaml"
    spec.write_text("base_model: /nonexistent/model\n" + DEMO_SPEC.read_text().replace("base_model: null", "#"))
    assert cli(["demo", "--spec", str(spec), "--out", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err.startswith("posttrain demo: /nonexistent/model: not a model directory")


def test_demo_spec_with_a_misplaced_key_is_refused(tmp_path):
    spec = tmp_path / "demo.yaml"
    spec.write_text(DEMO_SPEC.read_text() + "lr: 0.001\n")
    with pytest.raises(ValueError, match=f"{spec}: unknown key 'lr' \\(a training setting: put it under `train:`\\)"):
        run_demo(tmp_path / "out", spec)
