"""The evaluate stage on the tiny model: reproducible, complete for the promotion rule, consistent with its samples."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from components.config import ConfigError, from_mapping
from components.datasets import DataError, write_jsonl
from components.evaluate.config import EvaluateConfig, default_reward_specs, metric_names
from components.evaluate.main import run
from components.evaluation.stats import pass_at_k
from components.models import build_tiny_model, load_model, load_tokenizer
from components.rewards import build_rewards
from components.tasks import get_task
from components.training.batching import encode_example, micro_batches
from components.training.loop import forward_logprobs


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model (another init): a candidate that differs from the base."""
    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture(scope="module")
def data_suite(tmp_path_factory):
    """A user's suite: prompt rows with reference answers, the verifier named per row."""
    path = tmp_path_factory.mktemp("suite") / "mine.jsonl"
    write_jsonl(path, [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "task": "arithmetic"} for a in range(10)])
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    write_jsonl(path, [{"prompt": r["prompt"], "completion": r["completion"]}
                       for r in get_task("arithmetic").generate(16, seed=9, part="test")])
    return path


def settings(out, candidate, base, data_suite, **overrides):
    return {"model": str(candidate), "name": "cand", "output_dir": str(out),
            "baselines": {"base": str(base), "twin": str(candidate)}, "base_model": str(base),
            "suites": [{"task": "arithmetic", "split": "id", "n_prompts": 10, "seed": 5},
                       {"task": "arithmetic", "split": "ood", "n_prompts": 10, "seed": 5},
                       {"name": "mine", "data": str(data_suite)}],
            "samples": 4, "temperature": 1.0, "max_new_tokens": 6, "k": [1, 2, 4], "seed": 3,
            "bootstrap_samples": 300, **overrides}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, other_model, data_suite, heldout):
    out = tmp_path_factory.mktemp("eval")
    cfg = from_mapping(EvaluateConfig, settings(out, other_model, tiny_model_dir, data_suite, heldout_text=str(heldout),
                                                rewards=[{"name": "arithmetic"}, {"name": "format"}]))
    summary = run(cfg)
    return cfg, out, summary


def test_same_seed_gives_the_same_eval_twice(tmp_path, tiny_model_dir, other_model, data_suite):
    docs, samples = [], []
    for i in range(2):
        out = tmp_path / f"run{i}"
        run(from_mapping(EvaluateConfig, settings(out, other_model, tiny_model_dir, data_suite,
                                                  baselines={"base": str(tiny_model_dir)})))
        doc = json.loads((out / "eval.json").read_text())
        doc["config"].pop("output_dir")
        docs.append(doc)
        samples.append((out / "samples.jsonl").read_text())
    assert docs[0] == docs[1]
    assert samples[0] == samples[1]
    # sampled at temperature 1: the numbers are not trivially constant
    lengths = [json.loads(ln)["length"] for ln in samples[0].splitlines()]
    assert len(set(lengths)) > 1
    assert docs[0]["metrics"]["arithmetic-id/length_ci_low"] < docs[0]["metrics"]["arithmetic-id/length_ci_high"]


def test_eval_json_carries_every_metric_a_promotion_rule_can_name(evaluated):
    cfg, out, _ = evaluated
    doc = json.loads((out / "eval.json").read_text())
    reward_names = build_rewards(cfg.reward_specs()).names
    expected = cfg.metric_names(reward_names)
    assert set(doc["metrics"]) == expected
    assert set(doc["baselines"]) == {"base", "twin"}
    assert all(set(m) == expected for m in doc["baselines"].values())
    # the same names from the suites as a spec writes them, before any run
    assert expected == metric_names([{"task": "arithmetic", "split": "id"}, {"task": "arithmetic", "split": "ood"},
                                     {"name": "mine", "data": "x.jsonl"}], [1, 2, 4], reward_names,
                                    kl_to_base=True, heldout=True)
    assert reward_names == ["arithmetic", "format"]
    assert default_reward_specs(cfg.suites) == [{"name": "arithmetic"}]  # without rewards: each suite task's verifier
    for name in ("arithmetic-id/accuracy", "arithmetic-id/accuracy_ci_low", "arithmetic-ood/pass@4",
                 "arithmetic-ood/entropy", "arithmetic-id/kl_to_base", "mine/length", "heldout/entropy",
                 *(f"mine/reward/{r}" for r in reward_names)):
        assert name in expected
    assert "mine/entropy" not in expected  # a data suite has no reference completions
    flat = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in flat.values())
    assert {"arithmetic-id/accuracy", "baselines/base/arithmetic-id/accuracy",
            "differences/base/arithmetic-id/accuracy"} <= set(flat)


def test_baselines_see_identical_prompts_and_seeds(evaluated):
    """The candidate evaluated again as a baseline gives the same samples: every difference is exactly 0."""
    _, out, _ = evaluated
    doc = json.loads((out / "eval.json").read_text())
    assert doc["baselines"]["twin"] == doc["metrics"]
    twin = doc["differences"]["twin"]
    assert twin and all(d == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0} for d in twin.values())
    base = doc["differences"]["base"]
    # the base samples its own completions (with the same per-sample seeds as the candidate: the two near-uniform
    # random models often pick the same tokens, so their per-prompt numbers may all agree)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert ([s["completion"] for s in samples if s["model"] == "cand"]
            != [s["completion"] for s in samples if s["model"] == "base"])
    for key, d in base.items():
        assert d["diff"] == pytest.approx(doc["metrics"][key] - doc["baselines"]["base"][key], abs=1e-12)
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]


def test_metrics_agree_with_the_samples_they_come_from(evaluated):
    cfg, out, _ = evaluated
    doc = json.loads((out / "eval.json").read_text())
    rows = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 30 * cfg.samples  # models × prompts of the three suites × samples
    groups = defaultdict(list)
    for r in rows:
        assert r["correct"] == (get_task("arithmetic").verify(r["prompt"], r["completion"], r["answer"]) == 1.0)
        groups[r["model"], r["suite"]].append(r)
    for (model, suite), samples in groups.items():
        metrics = doc["metrics"] if model == "cand" else doc["baselines"][model]
        correct = np.array([s["correct"] for s in samples]).reshape(-1, cfg.samples)
        assert metrics[f"{suite}/accuracy"] == pytest.approx(correct.mean())
        assert metrics[f"{suite}/pass@1"] == pytest.approx(metrics[f"{suite}/accuracy"])
        for k in cfg.k:
            want = np.mean([pass_at_k(cfg.samples, int(c), k) for c in correct.sum(axis=1)])
            assert metrics[f"{suite}/pass@{k}"] == pytest.approx(want)
        assert metrics[f"{suite}/length"] == pytest.approx(np.mean([s["length"] for s in samples]))
        assert set(samples[0]["rewards"]) == {"arithmetic", "format"}
        for fn in samples[0]["rewards"]:
            assert metrics[f"{suite}/reward/{fn}"] == pytest.approx(np.mean([s["rewards"][fn] for s in samples]))
        for m in ("accuracy", "length"):
            assert metrics[f"{suite}/{m}_ci_low"] <= metrics[f"{suite}/{m}"] <= metrics[f"{suite}/{m}_ci_high"]


def test_entropy_and_kl_are_the_training_engines_quantities(evaluated, tiny_model_dir, other_model, heldout):
    _, out, _ = evaluated
    doc = json.loads((out / "eval.json").read_text())
    assert doc["baselines"]["base"]["arithmetic-id/kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert doc["metrics"]["arithmetic-id/kl_to_base"] > 0.01
    assert doc["metrics"]["heldout/kl_to_base"] > 0.01
    # heldout/entropy equals the mean token entropy the training loop computes on the same completions
    model, tok = load_model(other_model), load_tokenizer(other_model)
    rows = [json.loads(ln) for ln in heldout.read_text().splitlines()]
    examples = [encode_example(tok, r["prompt"], r["completion"]) for r in rows]
    total = count = 0.0
    with torch.no_grad():
        for mb in micro_batches(examples, 4096, tok.pad_token_id):
            _, ent = forward_logprobs(model, mb, 2048, autocast=False)
            total += float((ent * mb.loss_mask).sum())
            count += float(mb.loss_mask.sum())
    assert doc["metrics"]["heldout/entropy"] == pytest.approx(total / count, rel=1e-5)


def test_outputs_and_report_are_written(evaluated):
    _, out, summary = evaluated
    assert summary["eval"] == str(out / "eval.json")
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 2 and "http://" not in page and "https://" not in page
    assert "cand" in page and "twin" in page


@pytest.mark.parametrize("change,message", [
    ({"k": [1, 8]}, "k=[1, 8] is invalid"),
    ({"suites": [{"task": "arithmetic", "split": "sideways"}]}, "suites[0].split='sideways' is invalid"),
    ({"suites": [{"task": "algebra"}]}, "suites[0].task='algebra' is invalid"),
    ({"suites": [{"task": "arithmetic", "shots": 3}]}, "unknown key(s) 'shots'"),
    ({"suites": [{"data": "x.jsonl"}]}, "suites[0].name=None is invalid"),
    ({"suites": [{"task": "arithmetic"}, {"task": "arithmetic"}]}, "distinct names"),
    ({"suites": [{"name": "heldout", "task": "arithmetic"}]}, "not one of heldout"),
    ({"baselines": {"cand": "x"}}, "not also a baseline"),
    ({"temperature": -1.0}, "temperature=-1.0 is invalid"),
    ({"temperature": 0.0}, "samples=4 is invalid: 1 with temperature 0"),
])
def test_config_errors_name_the_key_and_what_is_allowed(tmp_path, change, message):
    base = settings(tmp_path, "m", "b", "d.jsonl")
    with pytest.raises(ConfigError) as e:
        from_mapping(EvaluateConfig, {**base, **change}, "eval.yaml")
    assert message in str(e.value) and str(e.value).startswith("eval.yaml")


def test_bad_suite_rows_are_reported_by_file_line_and_field(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2", "task": "arithmetic"}\n'
                    '{"prompt": "2+2="}\n'
                    '{"prompt": "3+3=", "answer": "6", "task": "calculus"}\n'
                    '{"prompt": "4+4=", "answer": "8"}\n')
    cfg = from_mapping(EvaluateConfig, {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
                                        "suites": [{"name": "bad", "data": str(path)}]})
    with pytest.raises(DataError) as e:
        run(cfg)
    msg = str(e.value)
    assert f"{path}:2: field 'answer'" in msg and f"{path}:3: field 'task'" in msg and "calculus" in msg
    assert f"{path}:4: field 'task'" in msg and "3 of 4 rows" in msg
    assert not (tmp_path / "out" / "eval.json").exists()


def test_metrics_and_report_reach_mlflow(tracking_env, tmp_path, tiny_model_dir):
    """Against a real `mlflow server`: the stage's run holds every flat metric (pass@k as pass_at_k) and the
    eval.json and report.html artifacts."""
    from mlflow import MlflowClient

    out = tmp_path / "eval"
    run(from_mapping(EvaluateConfig, {"model": str(tiny_model_dir), "name": "base", "output_dir": str(out),
                                      "suites": [{"task": "arithmetic", "n_prompts": 4}], "samples": 2, "k": [2],
                                      "temperature": 1.0, "max_new_tokens": 4, "bootstrap_samples": 100}))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking_env.env["POSTTRAIN_EXPERIMENT"])
    [mlrun] = client.search_runs([experiment.experiment_id], f"params.output_dir = '{out}'")
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["posttrain.stage"] == "evaluate"
    flat = json.loads((out / "metrics.json").read_text())
    logged = {k: v for k, v in mlrun.data.metrics.items() if not k.startswith("system/")}  # sampled by time
    assert logged == pytest.approx({k.replace("@", "_at_"): v for k, v in flat.items()})
    assert "arithmetic-id/pass_at_2" in mlrun.data.metrics
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} >= {"eval.json", "report.html"}
    local = client.download_artifacts(mlrun.info.run_id, "report.html", str(tmp_path / "dl"))
    assert open(local).read() == (out / "report.html").read_text()
