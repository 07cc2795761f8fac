"""A KFP cluster: upload, run, schedule, list runs and recurring runs (kfp.Client; the host from --host, a bearer
token from POSTTRAIN_KFP_TOKEN).

    submit(spec, host)                      upload the pipeline (or a new version) and start a run
    schedule(spec, host, cron=...)          the spec's one recurring run on the version just uploaded
    list_schedules(host) / disable_schedule(host, id)
    list_runs(host)

Runs and recurring runs use the service account `posttrain-pipeline-runner` (k8s/base/rbac.yaml), which may
read the two Secrets a step needs and create the run's workspace volume; without it KFP would use its
namespace default (`pipeline-runner`, or `default-editor` in a Kubeflow profile).

A spec has one recurring run, named after the spec: `schedule` creates the new one, on the version it has just
uploaded, then deletes the spec's earlier ones, so running it twice leaves one. (KFP's v2beta1 API cannot update
a recurring run in place.) Its cron expression is evaluated by KFP's scheduled-workflow controller in UTC,
unless that controller sets CRON_SCHEDULE_TIMEZONE (kubeflow/pipelines
backend/src/crd/controller/scheduledworkflow/util/const.go).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from pipelines.posttrain import compile_spec
from pipelines.spec import Schedule, Spec

RUNNER_SERVICE_ACCOUNT = "posttrain-pipeline-runner"
"""The service account of pipeline runs (k8s/base/rbac.yaml)."""


def cluster_problems(spec: Spec) -> list[str]:
    """What a cluster cannot read in this spec: local paths and bundled models exist only on this machine."""
    uris = [("base_model", spec.base_model)]
    uris += [(f"data.sources[{i}].uri", s["uri"]) for i, s in enumerate(spec.data.get("sources", [])) if "uri" in s]
    uris += [(f"eval_suites[{i}].data", s["data"]) for i, s in enumerate(spec.eval_suites) if "data" in s]
    return [f"{key}: {uri!r} is not on S3; a cluster run reads s3:// URIs (bundled tasks need no data)"
            for key, uri in uris if not uri.startswith("s3://")]


def kfp_client(host: str, namespace: str | None = None):
    """A kfp.Client for `host`; a bearer token, when the endpoint needs one, comes from POSTTRAIN_KFP_TOKEN."""
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, existing_token=os.environ.get("POSTTRAIN_KFP_TOKEN") or None,
                          **({"namespace": namespace} if namespace else {}))


def upload(client, spec: Spec, package: str | Path) -> tuple[str, str]:
    """Upload the compiled pipeline, as a new pipeline or as a new version of the spec's pipeline.

    Returns (pipeline id, version id); the version is named after the spec's hash and the time.
    """
    pipeline_id = client.get_pipeline_id(spec.name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=spec.name,
                                             description=spec.description or None).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    name = f"{spec.name}-{spec.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}"
    version = client.upload_pipeline_version(str(package), pipeline_version_name=name, pipeline_id=pipeline_id,
                                             description=spec.description or None)
    return pipeline_id, version.pipeline_version_id


def _prepare(spec: Spec, host: str, namespace: str | None, package_dir: str | Path):
    problems = cluster_problems(spec)
    if problems:
        raise ValueError(f"{spec.name} cannot run on a cluster:\n" + "\n".join(f"- {p}" for p in problems))
    client = kfp_client(host, namespace)
    package = compile_spec(spec, Path(package_dir) / f"{spec.name}.yaml")
    pipeline_id, version_id = upload(client, spec, package)
    experiment = client.create_experiment(spec.tracking.experiment, namespace=namespace)
    return client, pipeline_id, version_id, experiment.experiment_id


def submit(spec: Spec, host: str, *, params: dict | None = None, namespace: str | None = None,
           package_dir: str | Path = ".posttrain/compiled", service_account: str = RUNNER_SERVICE_ACCOUNT) -> dict:
    """Upload the spec's pipeline (or a new version of it) and start a run on it as `service_account`;
    returns the ids."""
    client, pipeline_id, version_id, experiment_id = _prepare(spec, host, namespace, package_dir)
    run = client.run_pipeline(experiment_id, f"{spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                              pipeline_id=pipeline_id, version_id=version_id, params=params or {},
                              service_account=service_account)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id,
            "run_id": run.run_id, "service_account": service_account}


def schedule_name(spec: Spec) -> str:
    """The display name of the spec's recurring run: the spec's name (one recurring run per spec)."""
    return spec.name


def _is_the_specs(name: str, spec: Spec) -> bool:
    # earlier releases named it "<spec> (<cron>)"
    return name == schedule_name(spec) or name.startswith(f"{spec.name} (") and name.endswith(")")


def _recurring_runs(client, *, experiment_id: str | None = None, namespace: str | None = None) -> list:
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, sort_by="created_at desc",
                                          experiment_id=experiment_id, namespace=namespace)
        found += page.recurring_runs or []
        token = page.next_page_token
        if not token:
            return found


def schedule(spec: Spec, host: str, *, cron: str | None = None, max_concurrency: int | None = None,
             catchup: bool | None = None, params: dict | None = None, namespace: str | None = None,
             package_dir: str | Path = ".posttrain/compiled", service_account: str = RUNNER_SERVICE_ACCOUNT) -> dict:
    """Upload the spec's pipeline (or a new version of it) and make the spec's one recurring run run that version.

    The recurring run is pinned to the version uploaded now: a later upload (e.g. by submit) does not move it;
    schedule again to move it. It is created anew and the spec's earlier recurring runs (found by name in the
    spec's experiment) are deleted, so scheduling twice leaves one. The cron expression (6 fields with seconds,
    in UTC), concurrency and catch-up come from the arguments, else from the spec's `schedule`; by default at most
    one run at a time and no catch-up of missed runs.
    """
    if cron is None and spec.schedule is None:
        raise ValueError(f"{spec.name}: no schedule: give --cron or a `schedule` in the spec")
    base = spec.schedule or Schedule(cron=cron)
    rule = Schedule(cron=cron or base.cron, max_concurrency=max_concurrency or base.max_concurrency,
                    catchup=base.catchup if catchup is None else catchup)
    client, pipeline_id, version_id, experiment_id = _prepare(spec, host, namespace, package_dir)
    earlier = [r for r in _recurring_runs(client, experiment_id=experiment_id)
               if _is_the_specs(r.display_name or "", spec)]
    job = client.create_recurring_run(experiment_id, schedule_name(spec), cron_expression=rule.cron,
                                      description=f"{spec.name}: {rule.cron} (UTC)",
                                      max_concurrency=rule.max_concurrency, no_catchup=not rule.catchup,
                                      pipeline_id=pipeline_id, version_id=version_id, params=params or {},
                                      service_account=service_account)
    for old in earlier:
        client.delete_recurring_run(old.recurring_run_id)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id,
            "recurring_run_id": job.recurring_run_id, "replaced": [r.recurring_run_id for r in earlier],
            "cron": rule.cron, "timezone": "UTC", "max_concurrency": rule.max_concurrency, "catchup": rule.catchup,
            "service_account": service_account}


def _experiment_id(client, experiment: str | None, namespace: str | None) -> str | None:
    return client.get_experiment(experiment_name=experiment, namespace=namespace).experiment_id if experiment else None


def list_schedules(host: str, *, experiment: str | None = None, namespace: str | None = None) -> list[dict]:
    """The recurring runs (of one experiment, when named): id, name, status, cron, version, service account."""
    client = kfp_client(host, namespace)
    runs = _recurring_runs(client, experiment_id=_experiment_id(client, experiment, namespace), namespace=namespace)
    out = []
    for r in runs:
        cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""
        ref = r.pipeline_version_reference
        out.append({"recurring_run_id": r.recurring_run_id, "name": r.display_name, "status": r.status or "",
                    "cron": cron, "pipeline_version_id": ref.pipeline_version_id if ref else "",
                    "service_account": r.service_account or "",
                    "created_at": r.created_at.isoformat() if r.created_at else ""})
    return out


def disable_schedule(host: str, recurring_run_id: str, *, namespace: str | None = None) -> None:
    """Stop a recurring run from starting runs (it stays listed, DISABLED; runs already started go on)."""
    kfp_client(host, namespace).disable_recurring_run(recurring_run_id)


def list_runs(host: str, *, experiment: str | None = None, namespace: str | None = None,
              limit: int = 20) -> list[dict]:
    """The latest runs (of one experiment, when named): id, name, state, created."""
    client = kfp_client(host, namespace)
    runs = client.list_runs(page_size=limit, sort_by="created_at desc",
                            experiment_id=_experiment_id(client, experiment, namespace), namespace=namespace).runs or []
    return [{"run_id": r.run_id, "name": r.display_name, "state": r.state,
             "created_at": r.created_at.isoformat() if r.created_at else ""} for r in runs]
