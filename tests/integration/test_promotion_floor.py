"""The promotion floor: a first challenger is compared with the base model, and an absolute floor
(`promotion.min_value`) holds back any challenger below it. Against the session's `mlflow server`, through the
register stage (components/register/main.py) and the register component of the pipeline
(components/register/component.py), whose decision the promotion gate reads."""

from __future__ import annotations

import json

import pytest

RULE = {"metric": "arithmetic-id/accuracy", "direction": "max", "min_improvement": 0.05,
        "guards": [{"metric": "arithmetic-ood/accuracy", "max_drop": 0.02}]}
BASE = {"arithmetic-id/accuracy": 0.20, "arithmetic-ood/accuracy": 0.10}


def _eval(path, acc_id: float, acc_ood: float, base: dict | None = BASE):
    path.write_text(json.dumps({"metrics": {"arithmetic-id/accuracy": acc_id, "arithmetic-ood/accuracy": acc_ood},
                                "baselines": {"base": base} if base else {}}))
    return path


def _register(tmp_path, tag: str, model, name: str, eval_path, rule: dict) -> dict:
    from mlflow import MlflowClient

    from components.config import from_mapping
    from components.register.config import RegisterConfig
    from components.register.main import run

    parent = MlflowClient().create_run(MlflowClient().create_experiment(f"floor-{name}-{tag}")).info.run_id
    cfg = {"model": str(model), "name": name, "output_dir": str(tmp_path / f"reg-{tag}"), "eval": str(eval_path),
           "promotion": rule, "parent_run_id": parent}
    return run(from_mapping(RegisterConfig, cfg, "register"))


def _decision_tag(client, name: str, version: str) -> dict:
    from components import promotion as promote

    return json.loads(client.get_model_version(name, version).tags[promote.DECISION_TAG])


def test_a_first_model_worse_than_base_is_registered_not_promoted(tiny_model_dir, tracking_env, tmp_path):
    from mlflow import MlflowClient

    from components import promotion as promote

    client, name = MlflowClient(), "floor-first"
    # worse than the base model it was trained from: registered as challenger, no champion
    r1 = _register(tmp_path, "1", tiny_model_dir, name, _eval(tmp_path / "e1.json", 0.0, 0.10), RULE)
    assert r1["version"] == "1" and r1["promoted"] is False
    assert promote.alias_version(client, name, "challenger") == "1"
    assert promote.alias_version(client, name, "champion") is None
    why = _decision_tag(client, name, "1")
    assert why["promoted"] is False and why["via"].startswith("register stage, run ")
    assert why["reason"].startswith("no champion yet, compared with the base model: ")
    assert "arithmetic-id/accuracy 0 vs base model 0.2 (-0.2; needs > 0 and ≥ 0.05)" in why["reason"]
    assert why["reason"] == r1["reason"]
    assert promote.audit_log(client, name) == []  # nothing moved

    # better than base, but not by min_improvement: still no champion
    r2 = _register(tmp_path, "2", tiny_model_dir, name, _eval(tmp_path / "e2.json", 0.22, 0.10), RULE)
    assert not r2["promoted"] and "+0.02; needs > 0 and ≥ 0.05" in _decision_tag(client, name, "2")["reason"]
    # better than base by enough, but the OOD guard drops 0.05 > 0.02 against base
    r3 = _register(tmp_path, "3", tiny_model_dir, name, _eval(tmp_path / "e3.json", 0.40, 0.05), RULE)
    assert not r3["promoted"] and "drop 0.05 > 0.02" in _decision_tag(client, name, "3")["reason"]
    # beats base with the guard held: the first champion
    r4 = _register(tmp_path, "4", tiny_model_dir, name, _eval(tmp_path / "e4.json", 0.40, 0.10), RULE)
    assert r4["promoted"] and promote.alias_version(client, name, "champion") == "4"
    assert _decision_tag(client, name, "4")["promoted"] is True
    assert [(r["action"], r["previous"], r["version"]) for r in promote.audit_log(client, name)] == [
        ("promote", None, "4")]
    assert "compared with the base model" in promote.audit_log(client, name)[0]["reason"]


def test_the_floor_holds_back_a_challenger_that_beats_the_champion(tiny_model_dir, tracking_env, tmp_path):
    from mlflow import MlflowClient

    from components import promotion as promote

    client, name = MlflowClient(), "floor-min-value"
    rule = {**RULE, "min_improvement": 0.0, "min_value": 0.5}
    # beats base, but under the floor: kept
    r1 = _register(tmp_path, "1", tiny_model_dir, name, _eval(tmp_path / "e1.json", 0.30, 0.10), rule)
    assert not r1["promoted"]
    assert _decision_tag(client, name, "1")["reason"] == "arithmetic-id/accuracy 0.3 is below the floor min_value 0.5"
    r2 = _register(tmp_path, "2", tiny_model_dir, name, _eval(tmp_path / "e2.json", 0.55, 0.10), rule)
    assert r2["promoted"] and "clears the floor 0.5" in r2["reason"]
    # a champion exists; a better challenger that the rule would promote is still refused under a higher floor
    r3 = _register(tmp_path, "3", tiny_model_dir, name, _eval(tmp_path / "e3.json", 0.58, 0.10),
                   {**rule, "min_value": 0.6})
    assert not r3["promoted"] and "below the floor min_value 0.6" in r3["reason"]
    assert promote.alias_version(client, name, "champion") == "2"


def test_the_pipeline_register_component_compares_a_first_model_with_base(tiny_model_dir, tracking_env, tmp_path):
    """components/register/component.py: the decision the promotion gate's dsl.If reads is `keep`."""
    from kfp import dsl
    from mlflow import MlflowClient

    from components.register.component import register

    client = MlflowClient()
    parent = client.create_run(client.create_experiment("floor-component")).info.run_id
    reg = dsl.Artifact(name="registration", uri=str(tmp_path / "reg.json"))
    decision = register.python_func(
        model=dsl.Model(name="m", uri=str(tiny_model_dir)),
        eval_results=dsl.Artifact(name="results", uri=str(_eval(tmp_path / "e.json", 0.0, 0.10))),
        registered_model="floor-component", promotion=json.dumps(RULE), settings="{}", stage="register",
        tracking_uri=tracking_env.env["MLFLOW_TRACKING_URI"], parent_run_id=parent, s3_endpoint="",
        registration=reg, card=dsl.Markdown(name="card", uri=str(tmp_path / "card.md")))
    assert decision == "keep"
    registration = json.loads((tmp_path / "reg.json").read_text())
    assert registration["champion"] is None and "compared with the base model" in registration["reason"]
    assert "keep" in (tmp_path / "card.md").read_text()


def test_rule_validation_of_the_floor():
    from components import promotion as promote
    from pipelines.spec import SpecError, parse_spec

    assert promote.PromotionRule.from_mapping({"metric": "a/acc", "min_value": 0.3}).min_value == 0.3
    with pytest.raises(ValueError, match="promotion.min_value='high' is invalid: a finite number"):
        promote.PromotionRule.from_mapping({"metric": "a/acc", "min_value": "high"})
    rule = promote.PromotionRule.from_mapping({"metric": "a/loss", "direction": "min", "min_value": 1.0})
    assert not promote.decide(rule, {"a/loss": 1.5}, None).promote  # a ceiling with direction min
    assert "above the ceiling" in promote.decide(rule, {"a/loss": 1.5}, None).reason
    with pytest.raises(SpecError, match=r"promotion.min_value: 'x' is invalid"):
        parse_spec({"name": "s", "base_model": "bundled:tiny", "stages": [{"stage": "sft"}],
                    "promotion": {"metric": "a/acc", "min_value": "x"}})
