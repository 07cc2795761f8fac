"""Deploy stage: serve the registered version the promotion gate made champion, with a KServe InferenceService.

    python -m components.deploy --config deploy.yaml      (or: posttrain stage deploy --config ...)

Needs MLFLOW_TRACKING_URI (the registry) and the Kubernetes API (components.kserve.connect: POSTTRAIN_KUBE_API,
else the in-cluster service account, else the kubeconfig). In a pipeline the step runs only after the promotion gate
moved `champion` (it follows register's gate, components.stages: after_gate); it deploys `version` only while
`champion` still points at it, checked again under the promotion lock when it writes the InferenceService and when
it records the deployment (components.promotion.while_champion): a promotion that lost a race, or a later move,
leaves the service as it is, or, when the move came while it waited, is reported superseded and nothing is
recorded (the move that superseded it has its own deployment). The
InferenceService, its wait and what is recorded: components/kserve.py. The MLflow run of the step gets the URL as
the tag posttrain.deployment.url.

Outputs in `output_dir`: deployment.json {deployed, reason, service, namespace, version, previous, storage_uri,
url, action}.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from components import kserve, tracking
from components.config import stage_main
from components.deploy.config import DeployConfig
from components.promotion import CHAMPION, alias_version, while_champion

log = logging.getLogger("components.deploy")


def run(cfg: DeployConfig) -> dict:
    if not tracking.enabled():
        raise RuntimeError("the deploy stage needs MLFLOW_TRACKING_URI: the registry holds the version to serve")
    from mlflow import MlflowClient

    client = MlflowClient()
    champion = alias_version(client, cfg.name, CHAMPION)
    summary = {"deployed": False, "version": str(cfg.version)}
    if champion != str(cfg.version):
        summary["reason"] = (f"{CHAMPION} is {'v' + champion if champion else 'none'}, not v{cfg.version}: nothing "
                             "deployed")
        log.info("%s: %s", cfg.name, summary["reason"])
    else:
        with tracking.stage_run("deploy", cfg) as tracked:
            try:
                record = kserve.deploy(kserve.connect(), kserve.Serving.of(cfg), client, str(cfg.version),
                                       via=f"deploy stage, run {tracked.run_id}",
                                       guard=lambda: while_champion(client, cfg.name, str(cfg.version)))
            except kserve.Superseded as e:
                record = None
                summary["reason"] = f"superseded: {e}"
                log.warning("%s", summary["reason"])
            if record is not None:
                tracked.set_tags({kserve.URL_TAG: record["url"], "posttrain.deployment.service":
                                  f"{record['namespace']}/{record['service']}", "posttrain.registered_model": cfg.name,
                                  "posttrain.registered_version": str(cfg.version)})
                summary = {"deployed": True, "reason": f"{CHAMPION} v{cfg.version} {record['action']}",
                           **{k: v for k, v in record.items() if k != "serving"}}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deployment.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(stage_main(__name__, DeployConfig, run, argv)))


if __name__ == "__main__":
    main()
