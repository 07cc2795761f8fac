"""The register stage and the promotion gate against a real `mlflow server` (artifacts proxied to S3):
challenger on every version, champion only for a better one, rollback, racing promotions, stale locks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest
import yaml

RULE = {"metric": "arithmetic-id/accuracy", "direction": "max", "min_improvement": 0.0,
        "guards": [{"metric": "arithmetic-ood/accuracy", "max_drop": 0.02}]}


def _eval(path, acc_id: float, acc_ood: float, champion: dict | None = None):
    data = {"metrics": {"arithmetic-id/accuracy": acc_id, "arithmetic-ood/accuracy": acc_ood,
                        "arithmetic-id/entropy": 0.7},
            "baselines": {"champion": champion} if champion else {},
            "suites": {"arithmetic-id": {"n": 100}, "arithmetic-ood": {"n": 100}}}
    path.write_text(json.dumps(data))
    return path


def _register_cfg(tmp_path, tag: str, model, name: str, eval_path, parent: str) -> dict:
    return {"model": str(model), "name": name, "output_dir": str(tmp_path / f"reg-{tag}"), "eval": str(eval_path),
            "promotion": RULE, "parent_run_id": parent}


def _register(cfg: dict) -> dict:
    from components.config import from_mapping
    from components.register.config import RegisterConfig
    from components.register.main import run

    return run(from_mapping(RegisterConfig, cfg, "register"))


def test_register_gate_rollback_and_list(sft_run, tracking_env, tmp_path, helpers, capsys):
    import mlflow
    from mlflow import MlflowClient

    from components import promotion as promote
    from components.models import load_model
    from components.storage import sha256_file
    from pipelines.cli import main as cli

    name, client = "tiny-arith", MlflowClient()
    # v1, through the stage entrypoint in its own process: no champion yet, so it becomes champion
    cfg1 = _register_cfg(tmp_path, "1", sft_run.model_dir, name, _eval(tmp_path / "e1.json", 0.30, 0.10),
                         sft_run.parent_run_id)
    (tmp_path / "reg1.yaml").write_text(yaml.safe_dump(cfg1))
    helpers.run_module("components.register", tmp_path / "reg1.yaml", {}, tmp_path / "reg1.log")
    r1 = json.loads((tmp_path / "reg-1" / "register.json").read_text())
    assert r1["version"] == "1" and r1["promoted"] and "no champion yet" in r1["reason"]
    v1 = client.get_model_version(name, "1")
    assert v1.tags["eval.arithmetic-id/accuracy"] == "0.3" and v1.run_id == r1["run_id"]
    assert client.get_run(r1["run_id"]).data.tags["mlflow.parentRunId"] == sft_run.parent_run_id
    assert promote.alias_version(client, name, "challenger") == "1"

    # v2: better in-domain, OOD within the guard (baseline from the eval JSON) -> champion moves
    r2 = _register(_register_cfg(tmp_path, "2", sft_run.model_dir, name,
                                 _eval(tmp_path / "e2.json", 0.40, 0.09, {"arithmetic-id/accuracy": 0.30,
                                                                          "arithmetic-ood/accuracy": 0.10}),
                                 sft_run.parent_run_id))
    assert r2["promoted"] and "(eval baseline)" in r2["reason"]
    # v3: worse than the champion's tags (0.40) -> stays challenger
    r3 = _register(_register_cfg(tmp_path, "3", sft_run.model_dir, name, _eval(tmp_path / "e3.json", 0.35, 0.12),
                                 sft_run.parent_run_id))
    assert not r3["promoted"] and "0.35 vs champion v2 (tags) 0.4" in r3["reason"]
    # v4: better in-domain but OOD drops 0.04 > 0.02 -> the guard holds it back
    r4 = _register(_register_cfg(tmp_path, "4", sft_run.model_dir, name, _eval(tmp_path / "e4.json", 0.50, 0.05),
                                 sft_run.parent_run_id))
    assert not r4["promoted"] and "drop 0.04 > 0.02" in r4["reason"]
    aliases = client.get_registered_model(name).aliases
    assert (aliases["champion"], aliases["challenger"]) == ("2", "4")

    # the registered champion is the SFT stage's model, weights in safetensors, loadable
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl"))
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert sha256_file(f"{local}/{f}") == sha256_file(sft_run.model_dir / f), f
    assert load_model(local).num_parameters() == load_model(sft_run.model_dir).num_parameters()

    # rollback by hand: champion goes back to the version v2 replaced
    capsys.readouterr()
    assert cli(["models", "rollback", "--name", name, "--reason", "ood regression seen in canary"]) == 0
    assert "champion v2 -> v1 (rollback)" in capsys.readouterr().out
    assert cli(["models", "list", "--name", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["aliases"] == {"champion": "1", "challenger": "4"}
    assert [v["version"] for v in info["versions"]] == ["4", "3", "2", "1"]
    assert [(r["action"], r["previous"], r["version"]) for r in info["audit"]] == [
        ("promote", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1")]
    assert info["audit"][2]["reason"] == "ood regression seen in canary" and info["audit"][2]["by"]
    assert "register stage, run" in info["audit"][1]["via"]
    assert client.get_model_version(name, "1").tags["posttrain.previous_champion"] == "2"
    # the same, as a user sees it: the `posttrain` command in its own process
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "models", "list", "--name", name],
                         capture_output=True, text=True, cwd=helpers.repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "champion → v1" in out.stdout and "challenger → v4" in out.stdout
    assert "rollback v2 → v1" in out.stdout and "ood regression seen in canary" in out.stdout


def _versions(client, name: str, model_id: str, n: int) -> list[str]:
    import mlflow

    return [mlflow.register_model(f"models:/{model_id}", name).version for _ in range(n)]


@pytest.fixture
def race_model(sft_run, tracking_env):
    """A registered model with v1 as champion; more versions come from the same logged model."""
    from mlflow import MlflowClient

    from components import promotion as promote
    from components import tracking
    from components.register.main import log_and_register

    client, name = MlflowClient(), f"race-{uuid.uuid4().hex[:6]}"
    with tracking.stage_run("register", {"name": name}) as run:
        version, model_id = log_and_register(client, sft_run.model_dir, name, run.run_id, {})
    promote.move_champion(name, version, expected=None, action="promote", reason="first", via="test")
    return client, name, model_id


def test_racing_promotions_exactly_one_wins(race_model):
    """Each round, 3 threads read the same champion, then all try to move it at once."""
    from mlflow import MlflowClient

    from components import promotion as promote

    client, name, model_id = race_model
    rounds, racers = 3, 3
    for r in range(rounds):
        versions = _versions(client, name, model_id, racers)
        barrier, results = threading.Barrier(racers), {}

        def race(version: str) -> None:
            c = MlflowClient()
            expected = promote.alias_version(c, name, "champion")
            barrier.wait()
            try:
                promote.move_champion(name, version, expected=expected, action="promote", reason=f"round {r}",
                                      via="test", client=c)
                results[version] = "won"
            except promote.PromotionConflict as e:
                results[version] = f"conflict: {e}"
        threads = [threading.Thread(target=race, args=(v,)) for v in versions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [v for v, res in results.items() if res == "won"]
        assert len(winners) == 1, results
        assert all("another move happened in between" in res for v, res in results.items() if v != winners[0])
        assert promote.alias_version(client, name, "champion") == winners[0]

    audit = promote.audit_log(client, name)
    assert len(audit) == 1 + rounds  # one record per move, none for the refused ones
    for before, after in zip(audit, audit[1:]):
        assert after["previous"] == before["version"]
    assert audit[-1]["version"] == promote.alias_version(client, name, "champion")
    assert not client.search_registered_models(f"name LIKE '{name}.promotion-lock%'")  # the lock is gone


def test_lock_held_refuses_and_expired_lock_is_taken_over(race_model):
    import time

    from components import promotion as promote

    client, name, model_id = race_model
    (v2,) = _versions(client, name, model_id, 1)
    lock = name + promote.LOCK_SUFFIX
    client.create_registered_model(lock, tags={"token": "t-live", "holder": "someone@elsewhere",
                                               "expires": str(time.time() + 600)})
    with pytest.raises(promote.PromotionConflict, match="someone@elsewhere"):
        promote.move_champion(name, v2, expected="1", action="promote", reason="x", via="test", lock_wait_s=1)
    assert promote.alias_version(client, name, "champion") == "1"

    client.set_registered_model_tag(lock, "expires", str(time.time() - 1))  # its holder died
    promote.move_champion(name, v2, expected="1", action="promote", reason="after a crash", via="test")
    assert promote.alias_version(client, name, "champion") == v2
    assert [m.name for m in client.search_registered_models(f"name LIKE '{lock}%'")] == [f"{lock}.expired-t-live"]


def test_rule_and_eval_errors_name_the_key(tmp_path):
    from components import promotion as promote

    with pytest.raises(ValueError, match=r"promotion.guards\[0\].max_drop=-1 is invalid: a number ≥ 0"):
        promote.PromotionRule.from_mapping({"metric": "a/acc", "guards": [{"metric": "b", "max_drop": -1}]})
    with pytest.raises(ValueError, match="promotion.direction='up' is invalid: max or min"):
        promote.PromotionRule.from_mapping({"metric": "a/acc", "direction": "up"})
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"metrics": {"a/acc": "high"}}))
    with pytest.raises(ValueError, match=r"eval.json: field 'metrics.a/acc' is 'high'; expected a finite number"):
        promote.read_eval(bad)
    rule = promote.PromotionRule.from_mapping(RULE)
    with pytest.raises(ValueError, match="has no arithmetic-ood/accuracy"):
        promote.decide(rule, {"arithmetic-id/accuracy": 0.5}, None)
    assert promote.decide(rule, {"arithmetic-id/accuracy": 0.5, "arithmetic-ood/accuracy": 0.1},
                          {"arithmetic-id/accuracy": 0.5, "arithmetic-ood/accuracy": 0.1}).promote is False  # a tie
