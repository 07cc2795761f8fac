"""The deploy stage in a spec and in the compiled pipeline: it may follow register (the last stage) because it follows
its gate (components.stages: after_gate), and it runs in the promotion gate's condition, after the gate's move."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipelines.spec import SPECS_DIR, SpecError, parse_spec


def _demo(**deploy) -> dict:
    data = copy.deepcopy(yaml.safe_load((SPECS_DIR / "demo.yaml").read_text()))
    data["stages"].append({"stage": "deploy", "settings": deploy})
    return data


def test_deploy_follows_register_and_nothing_follows_it():
    parse_spec(_demo(timeout=60), "demo + deploy")
    data = _demo()
    data["stages"].append({"stage": "sft", "name": "late"})
    with pytest.raises(SpecError, match=r"stages\[7\].stage: 'sft' is invalid: register is the last stage"):
        parse_spec(data, "x")
    data = _demo()
    data["stages"] = [s for s in data["stages"] if s["stage"] != "register"]
    with pytest.raises(SpecError, match=r"'deploy' is invalid here: it needs the latest registration from a stage "
                                        r"before it \(register\)"):
        parse_spec(data, "x")


@pytest.mark.parametrize("settings, message", [
    ({"canary_traffic_percent": 10}, "canary_traffic_percent=10 is invalid with deployment_mode Standard"),
    ({"deployment_mode": "Knative", "canary_traffic_percent": 101}, "canary_traffic_percent=101 is invalid: 0 to 100"),
    ({"deployment_mode": "Serverless"}, "deployment_mode='Serverless' is invalid: one of Standard, Knative"),
    ({"service": "9x"}, "service='9x' is invalid: a DNS label"),
    ({"artifacts_destination": "file:///m"}, "artifacts_destination='file:///m' is invalid: an s3:// URI"),
    ({"tolerations": [{"key": "g", "effects": "NoSchedule"}]}, r"tolerations\[0\]=.* is invalid"),
    ({"version": "3"}, "version: '3' is invalid here: set by the pipeline"),
    ({"namespace": "elsewhere"}, "namespace: 'elsewhere' is invalid here: set by storage.namespace"),
    ({"min_replicas": 0}, "min_replicas=0 is invalid with deployment_mode Standard: only Knative scales to zero"),
])
def test_the_spec_check_refuses_bad_deploy_settings(settings, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_demo(**settings), "x")


def test_the_deploy_step_runs_in_the_promotion_gate_after_the_move(tmp_path):
    from pipelines.posttrain import compile_spec

    ir, platform = yaml.safe_load_all(compile_spec(parse_spec(_demo(), "x"), tmp_path / "p.yaml").read_text())
    gate = next(c for name, c in ir["components"].items() if "deploy" in (c.get("dag") or {}).get("tasks", {}))
    deploy = gate["dag"]["tasks"]["deploy"]
    assert deploy["dependentTasks"] == ["promote"] and "promote" in gate["dag"]["tasks"]
    assert deploy["inputs"]["artifacts"]["registration"]["componentInputArtifact"].endswith("register-registration")
    root = ir["root"]["dag"]["tasks"]
    assert "deploy" not in root and all("deploy" not in (t.get("dependentTasks") or []) for t in root.values())
    # the step talks to MLflow (artifacts proxied) and the Kubernetes API only: MLflow's Secret, by reference, and
    # not MinIO's; no credential is a parameter
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = executors["exec-deploy"]["secretAsEnv"]
    assert [s["secretName"] for s in secrets] == ["posttrain-mlflow"]
    assert "s3_endpoint" not in deploy["inputs"]["parameters"]
    assert not [k for k in ("secret", "password", "key") if k in " ".join(deploy["inputs"]["parameters"]).lower()]
    # the other steps keep theirs (a step that reaches S3 takes s3_endpoint)
    assert sorted(s["secretName"] for s in executors["exec-register"]["secretAsEnv"]) == [
        "posttrain-minio", "posttrain-mlflow"]


def test_the_deploy_step_serves_in_the_specs_namespace(tmp_path):
    """The InferenceService goes where the steps run and the runner's Role applies: the spec's storage.namespace."""
    from pipelines.posttrain import compile_spec

    data = _demo()
    data.setdefault("storage", {})["namespace"] = "team-a"
    ir, _ = yaml.safe_load_all(compile_spec(parse_spec(data, "x"), tmp_path / "p.yaml").read_text())
    gate = next(c for c in ir["components"].values() if "deploy" in (c.get("dag") or {}).get("tasks", {}))
    given = gate["dag"]["tasks"]["deploy"]["inputs"]["parameters"]["namespace"]
    assert given == {"runtimeValue": {"constant": "team-a"}}
