"""Runs and recurring runs as the pipeline runner, one recurring run per spec, listing and disabling, against the
KFP v2beta1 REST API on loopback (kfp_api.py).

Upstream: the request fields are those of kubeflow/pipelines backend/api/v2beta1/recurring_run.proto and
run.proto (`service_account`: "which Kubernetes service account this recurring run uses"; without it the run gets the
namespace's default, `pipeline-runner`: kubeflow/pipelines backend/src/apiserver/common/const.go);
KFP's v2beta1 API has no update of a recurring run (recurring_run.proto: Create, Get, List, Enable, Disable,
Delete), so the spec's recurring run is replaced.
"""

import json

import yaml
from test_submit import SPEC

from pipelines.cli import main as cli
from pipelines.kfp_client import RUNNER_SERVICE_ACCOUNT, schedule, submit
from pipelines.spec import parse_spec


def test_the_service_account_is_in_k8s_rbac():
    """The account runs are given is the one k8s/base/rbac.yaml binds to the Secrets' Role."""
    from pathlib import Path

    rbac = Path(__file__).resolve().parents[2] / "k8s" / "base" / "rbac.yaml"
    accounts = [d["metadata"]["name"] for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "ServiceAccount"]
    assert accounts == [RUNNER_SERVICE_ACCOUNT] == ["posttrain-pipeline-runner"]


def test_submit_and_schedule_run_as_the_pipeline_runner(api):
    spec = parse_spec(SPEC)
    submit(spec, api.url)
    schedule(spec, api.url)
    (run,) = api.requests_to("POST", "/runs")
    (job,) = api.requests_to("POST", "/recurringruns")
    assert run.body["service_account"] == "posttrain-pipeline-runner"
    assert job.body["service_account"] == "posttrain-pipeline-runner"
    submit(spec, api.url, service_account="team-runner")
    assert api.requests_to("POST", "/runs")[1].body["service_account"] == "team-runner"


def test_schedule_twice_leaves_one_recurring_run_on_the_newest_version(api, capsys):
    spec = parse_spec(SPEC)
    first = schedule(spec, api.url)
    second = schedule(spec, api.url, cron="0 0 4 * * *")
    assert list(api.recurring_runs) == [second["recurring_run_id"]]
    assert second["replaced"] == [first["recurring_run_id"]]
    (deleted,) = api.requests_to("DELETE", f"/recurringruns/{first['recurring_run_id']}")
    assert deleted
    job = api.recurring_runs[second["recurring_run_id"]]
    assert job["display_name"] == "points-small"  # the spec's name: found again by it
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
    assert job["pipeline_version_reference"]["pipeline_version_id"] == second["version_id"] != first["version_id"]


def test_schedule_replaces_a_recurring_run_of_an_earlier_release(api):
    """Earlier releases named the recurring run "<spec> (<cron>)": it is the spec's too, and replaced."""
    spec = parse_spec(SPEC)
    result = submit(spec, api.url)
    import kfp

    client = kfp.Client(host=api.url)
    old = client.create_recurring_run(result["experiment_id"], "points-small (0 30 2 * * *)",
                                      cron_expression="0 30 2 * * *", pipeline_id=result["pipeline_id"],
                                      version_id=result["version_id"])
    other = client.create_recurring_run(result["experiment_id"], "points-small-nightly-eval",
                                        cron_expression="0 0 1 * * *", pipeline_id=result["pipeline_id"],
                                        version_id=result["version_id"])
    new = schedule(spec, api.url)
    assert new["replaced"] == [old.recurring_run_id]
    assert set(api.recurring_runs) == {new["recurring_run_id"], other.recurring_run_id}  # another name stays


def test_list_and_disable_from_the_command_line(api, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    for _ in range(2):
        assert cli(["schedule", str(spec_file), "--host", api.url]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.rindex("{\n"):])
    assert list(api.recurring_runs) == [result["recurring_run_id"]] and result["timezone"] == "UTC"

    assert cli(["schedules", "list", "--host", api.url, "--experiment", "points-small"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) == 1
    assert listed[0].startswith(f"{result['recurring_run_id']}  ENABLED ") and "0 30 2 * * * UTC" in listed[0]
    assert "service account posttrain-pipeline-runner" in listed[0] and result["version_id"] in listed[0]

    assert cli(["schedules", "disable", result["recurring_run_id"], "--host", api.url]) == 0
    assert api.requests_to("POST", f"/recurringruns/{result['recurring_run_id']}:disable")
    assert api.recurring_runs[result["recurring_run_id"]]["status"] == "DISABLED"
    capsys.readouterr()
    assert cli(["schedules", "list", "--host", api.url]) == 0
    assert " DISABLED " in capsys.readouterr().out
    assert cli(["schedules", "disable", "--host", api.url]) == 2
    assert "needs the recurring run's id" in capsys.readouterr().err
