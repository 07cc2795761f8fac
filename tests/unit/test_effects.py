"""Each stage's effect: paired changes against the stage before and the base, verdicts, the summary's rows, and
the report's training curves laid out one stage after another."""

import numpy as np
import pytest

from components.config import ConfigError, from_mapping
from components.evaluate.config import EvaluateConfig
from components.evaluate.main import SuiteRun, effects, verdict
from components.evaluate.report import Collected, figure_training_entropy
from pipelines.local import format_effects


def config(**overrides) -> EvaluateConfig:
    return from_mapping(EvaluateConfig, {"model": "m", "output_dir": "o", "name": "grpo",
                                         "baselines": {"base": "b", "sft": "s"},
                                         "suites": [{"task": "arithmetic", "split": "id"}],
                                         "bootstrap_samples": 500, **overrides})


def runs_of(accuracy: dict[str, list[float]]) -> dict[str, dict[str, SuiteRun]]:
    return {m: {"arithmetic-id": SuiteRun({"accuracy": np.array(v, dtype=float)}, {}, [])}
            for m, v in accuracy.items()}


def test_verdict_needs_the_whole_interval_on_one_side_of_zero():
    assert verdict(0.01, 0.2) == "better"
    assert verdict(-0.3, -0.02) == "worse"
    assert verdict(-0.01, 0.2) == verdict(0.0, 0.0) == "within noise"


def test_each_stage_against_the_one_before_and_the_base():
    n = 100
    base = [0.0] * n
    sft = [1.0] * 60 + [0.0] * 40           # +60 points over the base on every resample: better
    grpo = sft[:]                           # the same prompts right: no change at all
    grpo[60], grpo[0] = 1.0, 0.0            # one gained, one lost: the mean is unchanged, the interval spans 0
    out = effects(config(parents={"sft": "base", "grpo": "sft"}), runs_of({"base": base, "sft": sft, "grpo": grpo}))
    got = {(e["stage"], e["against"]): e for e in out}
    assert set(got) == {("sft", "previous"), ("sft", "base"), ("grpo", "previous"), ("grpo", "base")}
    assert got["sft", "previous"]["reference"] == got["sft", "base"]["reference"] == "base"
    assert got["grpo", "previous"]["reference"] == "sft"
    assert got["sft", "base"]["diff"] == pytest.approx(0.6) and got["sft", "base"]["verdict"] == "better"
    assert got["grpo", "previous"]["diff"] == pytest.approx(0.0)
    assert got["grpo", "previous"]["ci_low"] < 0 < got["grpo", "previous"]["ci_high"]
    assert got["grpo", "previous"]["verdict"] == "within noise"
    assert got["grpo", "base"]["verdict"] == "better"
    worse = effects(config(parents={"sft": "base", "grpo": "sft"}), runs_of({"base": base, "sft": sft, "grpo": base}))
    assert {(e["stage"], e["against"]): e["verdict"] for e in worse}["grpo", "previous"] == "worse"


def test_branches_are_measured_against_their_own_start():
    n = 50
    runs = runs_of({"base": [0.0] * n, "sft": [1.0] * 20 + [0.0] * 30, "grpo": [1.0] * 30 + [0.0] * 20,
                    "dpo": [1.0] * 10 + [0.0] * 40})
    cfg = config(parents={"sft": "base", "grpo": "sft", "dpo": "sft"}, baselines={"base": "b", "sft": "s", "dpo": "d"})
    got = {(e["stage"], e["against"]): (e["reference"], round(e["diff"], 3)) for e in effects(cfg, runs)}
    assert got["dpo", "previous"] == ("sft", -0.2) and got["grpo", "previous"] == ("sft", 0.2)
    assert got["dpo", "base"] == ("base", 0.2) and got["grpo", "base"] == ("base", 0.6)


def test_parents_name_only_models_of_the_evaluation_without_a_cycle():
    with pytest.raises(ConfigError, match="parents"):
        config(parents={"dpo": "base"})
    with pytest.raises(ConfigError, match="cycle"):
        config(parents={"sft": "grpo", "grpo": "sft"})


def test_the_summary_prints_a_row_per_stage_and_suite_with_both_changes():
    e = [{"stage": "sft", "against": "previous", "reference": "base", "suite": "arithmetic-id", "diff": 0.52,
          "ci_low": 0.45, "ci_high": 0.59, "verdict": "better"},
         {"stage": "sft", "against": "base", "reference": "base", "suite": "arithmetic-id", "diff": 0.52,
          "ci_low": 0.45, "ci_high": 0.59, "verdict": "better"},
         {"stage": "grpo", "against": "previous", "reference": "sft", "suite": "arithmetic-id", "diff": -0.01,
          "ci_low": -0.04, "ci_high": 0.02, "verdict": "within noise"},
         {"stage": "grpo", "against": "base", "reference": "base", "suite": "arithmetic-id", "diff": 0.51,
          "ci_low": 0.44, "ci_high": 0.58, "verdict": "better"}]
    lines = format_effects(e)
    rows = [ln for ln in lines if ln.startswith(("sft", "grpo"))]
    assert rows[0].split() == ["sft", "arithmetic-id", "+52.0", "[+45.0,", "+59.0]", "better", "+52.0", "[+45.0,",
                               "+59.0]", "better"]
    assert rows[1].split()[:7] == ["grpo", "arithmetic-id", "-1.0", "[-4.0,", "+2.0]", "within", "noise"]
    assert format_effects([]) == []


def test_training_curves_follow_one_another_on_one_step_axis():
    training = {"psft": [{"step": s, "entropy": 1.0} for s in range(1, 101)],
                "dpo": [{"step": s, "entropy": 0.9} for s in range(1, 21)]}
    c = Collected(models={}, parents={}, suites={}, differences=[], training=training, notes=[], effects=[])
    fig = figure_training_entropy(c)
    ax = fig.axes[0]
    xs = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert xs["psft"][0] == 1 and xs["psft"][-1] == 100
    assert xs["dpo"][0] == 101 and xs["dpo"][-1] == 120  # dpo's step 1 comes after psft's last
    assert "psft → dpo" in ax.get_xlabel()
