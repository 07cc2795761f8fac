"""`posttrain submit`, `schedule` and `runs list` against the KFP v2 REST API on loopback (kfp_api.py here).

Each test asserts on the requests kfp.Client sent: the pipeline upload (the compiled IR), a version upload on
the second submission, the run on the uploaded version, the recurring run with its cron, concurrency and
catch-up settings.
"""

import json

import yaml

from pipelines.cli import main as cli
from pipelines.kfp_client import schedule, submit
from pipelines.spec import load_spec, parse_spec

SPEC = {
    "name": "points-small", "description": "PSFT on the 24 game",
    "base_model": "s3://posttrain-data/models/m",
    "data": {"sources": [{"uri": "s3://posttrain-data/points/sft.jsonl", "shape": "sft"}]},
    "stages": [{"stage": "psft", "settings": {"train": {"max_steps": 100, "lr": 2e-5}}}, {"stage": "evaluate"},
               {"stage": "register"}],
    "eval_suites": [{"task": "general_points", "split": "id"}, {"task": "general_points", "split": "ood"}],
    "promotion": {"metric": "general_points-id/accuracy"},
    "schedule": {"cron": "0 30 2 * * *"},
}


def uploaded_ir(request) -> dict:
    return next(yaml.safe_load_all(request.files["uploadfile"]))


def test_submit_uploads_the_pipeline_then_a_version_and_starts_runs(api):
    spec = parse_spec(SPEC)
    first = submit(spec, api.url, params={"psft_lr": 1e-5})

    (upload,) = api.requests_to("POST", "/pipelines/upload")
    assert upload.query["name"] == "points-small" and upload.query["description"] == "PSFT on the 24 game"
    ir = uploaded_ir(upload)
    assert ir["pipelineInfo"]["name"] == "points-small"
    assert ir["root"]["inputDefinitions"]["parameters"]["psft_lr"]["defaultValue"] == 2e-5
    (exp,) = api.requests_to("POST", "/experiments")
    assert exp.body["display_name"] == "points-small"
    (run,) = api.requests_to("POST", "/runs")
    assert run.body["pipeline_version_reference"] == {"pipeline_id": first["pipeline_id"],
                                                      "pipeline_version_id": first["version_id"]}
    assert run.body["experiment_id"] == first["experiment_id"]
    assert run.body["runtime_config"]["parameters"] == {"psft_lr": 1e-5}
    assert "pipeline_spec" not in run.body or run.body["pipeline_spec"] is None  # the run refers to the version
    assert run.body["display_name"].startswith("points-small ")

    second = submit(spec, api.url)
    (version,) = api.requests_to("POST", "/pipelines/upload_version")
    assert version.query["pipelineid"] == first["pipeline_id"]
    assert version.query["name"].startswith(f"points-small-{spec.fingerprint()}-")
    assert uploaded_ir(version)["pipelineInfo"]["name"] == "points-small"
    assert len(api.requests_to("POST", "/pipelines/upload")) == 1  # the pipeline is not uploaded twice
    assert len(api.requests_to("POST", "/experiments")) == 1  # the experiment is found again
    runs = api.requests_to("POST", "/runs")
    assert len(runs) == 2 and second["pipeline_id"] == first["pipeline_id"]
    assert runs[1].body["pipeline_version_reference"]["pipeline_version_id"] == second["version_id"]
    assert second["version_id"] != first["version_id"]


def test_schedule_creates_a_recurring_run_on_the_latest_version(api):
    spec = parse_spec(SPEC)
    submit(spec, api.url)  # an earlier version exists
    result = schedule(spec, api.url)
    (job,) = api.requests_to("POST", "/recurringruns")
    body = job.body
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"  # the spec's schedule
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    latest = api.versions[result["pipeline_id"]][-1]["pipeline_version_id"]
    assert body["pipeline_version_reference"] == {"pipeline_id": result["pipeline_id"],
                                                  "pipeline_version_id": latest}
    assert len(api.versions[result["pipeline_id"]]) == 2


def test_schedule_command_with_cron_and_catchup(api, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({k: v for k, v in SPEC.items() if k != "schedule"}))
    code = cli(["schedule", str(spec_file), "--host", api.url, "--cron", "0 0 3 * * 1", "--max-concurrency", "2",
                "--catchup", "--param", "psft_max_steps=50"])
    assert code == 0
    (job,) = api.requests_to("POST", "/recurringruns")
    assert job.body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert int(job.body["max_concurrency"]) == 2 and job.body["no_catchup"] is False
    assert job.body["runtime_config"]["parameters"] == {"psft_max_steps": 50}
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])
    assert printed["recurring_run_id"] in api.recurring_runs and printed["catchup"] is True


def test_schedule_without_cron_is_refused(api, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({k: v for k, v in SPEC.items() if k != "schedule"}))
    assert cli(["schedule", str(spec_file), "--host", api.url]) == 2
    assert "no schedule: give --cron or a `schedule` in the spec" in capsys.readouterr().err
    assert cli(["schedule", str(spec_file), "--host", api.url, "--cron", "0 3 * * 1"]) == 2
    assert "cron='0 3 * * 1' is invalid: a cron expression of 6 fields" in capsys.readouterr().err
    assert not api.requests_to("POST", "/recurringruns")


def test_local_data_cannot_be_submitted(api, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "base_model": "bundled:tiny",
                                         "data": {"sources": [{"uri": "data/sft.jsonl", "shape": "sft"}]}}))
    assert cli(["submit", str(spec_file), "--host", api.url]) == 2
    err = capsys.readouterr().err
    assert "base_model: 'bundled:tiny' is not on S3" in err and "data.sources[0].uri: 'data/sft.jsonl'" in err
    assert not api.requests  # refused before any request


def test_submit_and_list_runs_from_the_command_line(api, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    assert cli(["submit", str(spec_file), "--host", api.url, "--param", "psft_lr=3e-5"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    (run,) = api.requests_to("POST", "/runs")
    assert run.body["runtime_config"]["parameters"] == {"psft_lr": 3e-5}
    assert result["run_id"] in api.runs
    assert cli(["submit", str(spec_file), "--host", api.url, "--param", "psft_lr=fast"]) == 2
    assert "--param psft_lr='fast' is invalid: float expected" in capsys.readouterr().err
    assert cli(["runs", "list", "--host", api.url, "--experiment", "points-small"]) == 0
    listed = capsys.readouterr().out
    assert result["run_id"] in listed and "PENDING" in listed
    (listing,) = api.requests_to("GET", "/runs")
    assert listing.query["experiment_id"] == result["experiment_id"]


def test_cluster_spec_submits(api):
    result = submit(load_spec("cluster"), api.url)
    (upload,) = api.requests_to("POST", "/pipelines/upload")
    assert uploaded_ir(upload)["pipelineInfo"]["name"] == "posttrain-points-1p5b"
    assert api.runs[result["run_id"]]["pipeline_version_reference"]["pipeline_version_id"] == result["version_id"]
