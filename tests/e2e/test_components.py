"""A stage's KFP component, called as a plain function (`component.python_func`): it builds the stage's config
from the spec's settings, the runtime parameters and the artifact paths, runs the stage, and fills its outputs.
"""

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.config import ConfigError
from components.datasets import write_jsonl
from components.sft.component import sft
from components.tasks import get_task

SETTINGS = {"max_length": 64, "train": {"batch_size": 8, "token_budget": 256, "log_every": 1, "checkpoint_every": 2}}


def test_sft_component_trains_and_fills_its_outputs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    write_jsonl(data / "sft.train.jsonl", get_task("arithmetic").generate(64, seed=0))
    workspace = tmp_path / "workspace"
    model = dsl.Model(name="trained_model", uri=str(tmp_path / "out" / "model"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    args = dict(model=dsl.Model(name="base", uri=str(tiny_model_dir)), data=dsl.Dataset(name="data", uri=str(data)),
                settings=json.dumps(SETTINGS), lr=0.004, max_steps=3, kind="psft", stage="psft",
                workspace=str(workspace), tracking_uri="", parent_run_id="", s3_endpoint="", nproc=1, nodes=1,
                launch="", kfp_run_id="",
                trained_model=model, metrics=metrics)
    sft.python_func(**args)

    # the model stays in the workspace; the output artifact points there and holds no weights
    assert list((workspace / "psft" / "model").glob("*.safetensors"))
    assert not list((tmp_path / "out" / "model").glob("*.safetensors"))
    from components.step import model_dir
    assert model_dir(model) == str(workspace / "psft" / "model") == model.metadata["workspace_path"]
    assert metrics.metadata["steps"] == 3 and metrics.metadata["final/step"] == 3
    assert metrics.metadata["data/kept"] == 64
    assert json.loads((tmp_path / "out" / "metrics").read_text()) == metrics.metadata  # a file, for the cache
    # the stage's output_dir is <workspace>/<stage>: checkpoints there survive a failed attempt
    lines = (workspace / "psft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (workspace / "psft" / "checkpoints").is_dir()
    # the method comes from the stage's name
    assert json.loads(lines[0])["kl_old"] == 0.0


def test_sft_component_names_a_bad_setting(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = dict(model=dsl.Model(name="base", uri=str(tiny_model_dir)),
                data=dsl.Dataset(name="data", uri=str(tmp_path)), settings=json.dumps({"train": {"zero_stage": 1}}),
                lr=0.004, max_steps=3, kind="psft", stage="psft", workspace=str(tmp_path / "ws"), tracking_uri="",
                parent_run_id="", s3_endpoint="", nproc=1, nodes=1, launch="", kfp_run_id="",
                trained_model=dsl.Model(name="m", uri=str(tmp_path / "m")),
                metrics=dsl.Metrics(name="x", uri=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="stage psft: train.zero_stage: 1 is invalid: 2 or 3"):
        sft.python_func(**args)


def test_preflight_checks_a_source_and_the_model(tiny_model_dir, tmp_path):
    from components.preflight.main import check_model, check_source

    rows = [{"question": f"{i}+1=", "solution": str(i + 1)} for i in range(5)]
    write_jsonl(tmp_path / "d" / "a.jsonl", rows)
    ok = check_source({"uri": str(tmp_path / "d"), "shape": "sft",
                       "fields": {"prompt": "question", "completion": "solution"}}, sample_rows=100)
    assert ok.endswith("1 file(s), the first 5 rows read as sft")
    with pytest.raises(ValueError, match=r"none of the first 5 rows is a sft row .*a\.jsonl:1: .*'prompt'"):
        check_source({"uri": str(tmp_path / "d"), "shape": "sft"}, sample_rows=100)  # fields not mapped
    with pytest.raises(Exception, match="no such file or directory"):
        check_source({"uri": str(tmp_path / "missing.jsonl"), "shape": "sft"}, sample_rows=100)
    assert check_source({"task": "arithmetic", "rows": 5, "shape": "prompts"}, 100) == "bundled task arithmetic"
    chats = [{"conversations": [{"from": "human", "value": f"{i}+1="}, {"from": "gpt", "value": str(i + 1)}]}
             for i in range(3)]
    write_jsonl(tmp_path / "chat" / "a.jsonl", chats)  # a named format reads in preflight as in data_prep
    assert check_source({"uri": str(tmp_path / "chat"), "shape": "sft"}, 100).endswith("the first 3 rows read as sft")
    (tmp_path / "broken.json").write_text('[{"prompt": "1+1=", "completion": "2"}, {"pro')
    with pytest.raises(ValueError, match="broken.json: not valid JSON .* after 1 complete rows"):
        check_source({"uri": str(tmp_path / "broken.json"), "shape": "sft"}, sample_rows=100)
    assert "tensors in safetensors" in check_model(str(tiny_model_dir))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model(str(tmp_path))


def test_register_decides_and_the_gate_promotes(tiny_model_dir, tmp_path, monkeypatch):
    """register → (decision) → promote, against an MLflow registry in a sqlite file."""
    from mlflow import MlflowClient

    from components.register.component import promote, register

    monkeypatch.chdir(tmp_path)  # MLflow keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("reg")).info.run_id
    rule = json.dumps({"metric": "arithmetic-id/accuracy", "direction": "max", "min_improvement": 0.0,
                       "guards": [{"metric": "arithmetic-ood/accuracy", "max_drop": 0.02}]})

    def version(i: int, accuracy: float) -> tuple[str, dict]:
        eval_json = tmp_path / f"eval{i}.json"
        eval_json.write_text(json.dumps({"metrics": {"arithmetic-id/accuracy": accuracy,
                                                     "arithmetic-ood/accuracy": 0.1}, "baselines": {}}))
        results = dsl.Artifact(name="results", uri=str(eval_json))
        reg = dsl.Artifact(name="registration", uri=str(tmp_path / f"reg{i}.json"))
        decision = register.python_func(
            model=dsl.Model(name="m", uri=str(tiny_model_dir)), eval_results=results, registered_model="demo",
            promotion=rule, settings="{}", stage="register", tracking_uri=uri, parent_run_id=parent, s3_endpoint="",
            registration=reg, card=dsl.Markdown(name="card", uri=str(tmp_path / f"card{i}.md")))
        registration = json.loads(Path(reg.path).read_text())
        assert registration["decision"] == decision and registration["version"] == str(i)
        if decision == "promote":  # what the dsl.If does
            outcome = dsl.Artifact(name="outcome", uri=str(tmp_path / f"outcome{i}.json"))
            promote.python_func(registration=reg, eval_results=results, promotion=rule, tracking_uri=uri,
                                kfp_run_id=f"run-{i}", outcome=outcome,
                                card=dsl.Markdown(name="c", uri=str(tmp_path / f"promo{i}.md")))
            assert json.loads(Path(outcome.path).read_text())["promoted"] is True
        return decision, registration

    decision, first = version(1, 0.30)
    assert decision == "promote" and "no champion yet" in first["reason"]
    assert str(client.get_model_version_by_alias("demo", "champion").version) == "1"
    decision, second = version(2, 0.20)  # worse in-domain: the gate keeps v1
    assert decision == "keep" and "arithmetic-id/accuracy 0.2 vs champion v1" in second["reason"]
    assert str(client.get_model_version_by_alias("demo", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("demo", "challenger").version) == "2"
    decision, third = version(3, 0.45)
    assert decision == "promote" and str(client.get_model_version_by_alias("demo", "champion").version) == "3"
    assert "**Decision: promote**" in (tmp_path / "card3.md").read_text()


def test_reward_scoring_component_runs_on_two_processes(tiny_model_dir, tmp_path, monkeypatch):
    """nproc 2: the step runs the stage under torchrun (gloo on CPU), rank 0 writes the artifact's three files
    and the metrics come from its stats.json."""
    from components.reward_scoring.component import reward_scoring

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    data = tmp_path / "data"
    write_jsonl(data / "prompts.train.jsonl", [{"prompt": r["prompt"], "answer": r["answer"], "task": "arithmetic"}
                                               for r in get_task("arithmetic").generate(6, seed=0)])
    scored = dsl.Dataset(name="scored", uri=str(tmp_path / "scored"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    settings = {"num_samples": 2, "sampling": {"max_new_tokens": 4, "temperature": 1.5}}
    reward_scoring.python_func(model=dsl.Model(name="m", uri=str(tiny_model_dir)),
                               data=dsl.Dataset(name="d", uri=str(data)), settings=json.dumps(settings),
                               rewards=json.dumps([{"name": "task"}, {"name": "length", "max_length": 4, "cache": 4}]),
                               stage="reward_scoring", tracking_uri="", parent_run_id="", s3_endpoint="", nproc=2,
                               launch='{"max_nodes": 1, "max_nproc": 2}', scored=scored, metrics=metrics)
    assert sorted(p.name for p in Path(scored.path).iterdir()) == ["pairs.jsonl", "scored.jsonl", "stats.json"]
    assert len((Path(scored.path) / "scored.jsonl").read_text().splitlines()) == 12
    assert metrics.metadata["prompts"] == 6 and metrics.metadata["samples"] == 12
    with pytest.raises(ValueError, match="reward_scoring_gpus_per_node=3 is invalid: between 1 and 2"):
        reward_scoring.python_func(model=dsl.Model(name="m", uri=str(tiny_model_dir)),
                                   data=dsl.Dataset(name="d", uri=str(data)), settings=json.dumps(settings),
                                   rewards="[]", stage="reward_scoring", tracking_uri="", parent_run_id="",
                                   s3_endpoint="", nproc=3, launch='{"max_nodes": 1, "max_nproc": 2}', scored=scored,
                                   metrics=metrics)
