"""`posttrain demo`: the bundled spec sft-psft run by the spec runner, like every other pipeline.

The run is shortened (fewer rows, steps and eval prompts) but takes the same path: kfp.local runs preflight,
data_prep, sft and psft (both from the base model: `start_from: base`), then evaluate, whose report is opened in
headless Chromium. The command itself is `posttrain run sft-psft` under a short name; a bad spec or parameter is
refused in one line naming the file and key, before anything runs.
"""

import itertools
import re
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from test_report import rendered  # the Chromium check of the report test

from pipelines import local
from pipelines.cli import main as cli
from pipelines.spec import SPECS_DIR, load_spec, parse_spec

SPEC = SPECS_DIR / "sft-psft.yaml"
STEPS = 60
"""Steps of each stage: at 60 the last nll is ~0.35 of the first (the test asks for < 0.6) and each stage's entropy
is well below the base model's."""


def test_short_sft_psft_run(tmp_path, capsys):
    data = yaml.safe_load(SPEC.read_text())
    data["data"]["sources"][0]["rows"] = 4000
    for suite in data["eval_suites"]:
        suite["n_prompts"] = 60
    spec = parse_spec(data, "sft-psft.yaml (shortened)")
    summary = local.run_local(spec, tmp_path / "out", state=tmp_path / "state",
                              arguments={"sft_max_steps": STEPS, "psft_max_steps": STEPS})

    assert summary["status"] == "succeeded", summary["error"]
    stages = summary["stages"]
    assert list(stages) == ["base", "sft", "psft"]
    assert summary["registered"] is None and summary["promotion"] is None  # the spec compares, it registers nothing
    table = capsys.readouterr().out
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["stage", "steps", "training"])
    rows = [line.split()[0] for line in itertools.takewhile(str.strip, lines[header + 1:])]
    assert rows == ["base", "sft", "psft"], table

    base = stages["base"]["eval"]["arithmetic-id"]
    client = MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(spec.tracking.experiment).experiment_id])
    first_nll = {}
    for name in ("sft", "psft"):
        assert stages[name]["kind"] == name and stages[name]["metrics"]["steps"] == STEPS
        (run,) = [r for r in runs if r.data.tags.get("posttrain.task") == name]
        nll = client.get_metric_history(run.info.run_id, "nll")
        assert [m.step for m in nll] == list(range(1, STEPS + 1))
        assert nll[-1].value == stages[name]["metrics"]["final/nll"] < 0.6 * nll[0].value, name  # it learned
        first_nll[name] = nll[0].value
        clipped = any(m.startswith("clip_ratio/") for m in run.data.metrics)
        assert clipped == (name == "psft"), sorted(run.data.metrics)  # the PSFT objective, with its clip statistics
        ev = stages[name]["eval"]["arithmetic-id"]
        assert ev["entropy"] < base["entropy"], name
        assert ev["accuracy_ci_low"] <= ev["accuracy"] <= ev["accuracy_ci_high"], (name, ev)

    # both from the base model: the same first batch on the same weights, and each one's change measured against
    # base (not psft against sft)
    assert first_nll["psft"] == pytest.approx(first_nll["sft"], rel=1e-6)
    effects = {(e["stage"], e["against"], e["suite"]): e["reference"] for e in summary["effects"]}
    assert effects == {(s, against, suite): "base" for s in ("sft", "psft") for against in ("previous", "base")
                       for suite in ("arithmetic-id", "arithmetic-ood")}

    report = tmp_path / "out" / "report.html"
    dom = rendered(report, tmp_path)
    assert len(dom.images) >= 3 and all(img.get("data-ok") == "1" for img in dom.images)
    # psft started from base, not from sft: a branch on the step axis, said in the caption
    assert dom.text["fig-training-entropy caption"] == "Entropy over training steps (sft | psft (from base))"
    assert re.fullmatch(rf"{re.escape(spec.name)} · run [\w-]+", dom.text["title"]), dom.text["title"]


def test_demo_is_a_run_of_the_bundled_spec(tmp_path, monkeypatch):
    """`posttrain demo ARGS` and `posttrain run sft-psft ARGS` make the same call to the runner."""
    calls = []

    def fake_run_local(spec, out, arguments, verbose):
        calls.append((spec, out, arguments, verbose))
        return {"status": "succeeded"}
    monkeypatch.setattr(local, "run_local", fake_run_local)
    args = ["--out", str(tmp_path), "--param", "psft_max_steps=3", "--param", "sft_lr=0.001"]
    assert cli(["demo", *args]) == 0
    assert cli(["run", "sft-psft", *args]) == 0
    assert calls[0] == calls[1]
    spec, out, arguments, verbose = calls[0]
    assert spec == load_spec(SPEC) and out == str(tmp_path) and not verbose
    assert arguments == {"psft_max_steps": 3, "sft_lr": 0.001}


@pytest.mark.parametrize(("edit", "error"), [
    (lambda d: d.update(base_model="ftp://models/tiny"),
     "base_model: 'ftp://models/tiny' is invalid: s3://bucket/key, a local path, or one of bundled:tiny"),
    (lambda d: d["stages"][1]["settings"].update(lr=0.001),
     "stages[1].settings.lr: unknown key here; it is a key of `train`: write train: {lr: 0.001}"),
    (lambda d: d.update(max_steps=10), "max_steps: unknown key; allowed: "),
], ids=["base_model", "a-train-key-in-settings", "a-top-level-key"])
def test_a_bad_spec_is_refused_in_one_line_naming_the_file_and_key(tmp_path, capsys, edit, error):
    data = yaml.safe_load(SPEC.read_text())
    edit(data)
    path = tmp_path / "sft-psft.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert cli(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"posttrain run: {path}: {error}"), line
    assert not (tmp_path / "out").exists()


def test_a_bad_demo_parameter_is_refused_in_one_line(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "out"), "--param", "lr=0.1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("posttrain demo: --param 'lr=0.1' is invalid: NAME=VALUE with NAME one of base_model, "
                           "data_sources, sft_lr, sft_max_steps, psft_lr, psft_max_steps"), line
    assert not Path(tmp_path / "out").exists()
