"""The deploy stage's config, light: `python -m pipelines.spec check` builds it without the Kubernetes client."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MODES = ("Standard", "Knative")
"""KServe's deployment modes (kserve pkg/constants/constants.go DeploymentModeType; RawDeployment and Serverless
are their deprecated names)."""
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""kserve pkg/apis/serving/v1beta1/inference_service_validation.go IsvcNameFmt."""
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


@dataclass(kw_only=True)
class DeployConfig:
    """Which registered version to serve, where, on what, and how long to wait for it."""

    name: str
    """Registered model name (the spec's tracking.registered_model)."""
    version: str
    """The registered version to serve: the one the promotion gate made champion."""
    output_dir: str
    """Where deployment.json goes."""
    service: str = ""
    """The InferenceService's name; empty: the registered model's name (a DNS label: lowercase letters, digits
    and '-', starting with a letter, at most 45 characters, KServe's rule and room for its -predictor suffixes)."""
    namespace: str = "posttrain"
    """The namespace of the InferenceService: in a pipeline the spec's storage.namespace, where the steps run and
    the pipeline runner may create and patch InferenceServices (k8s/overlays/kserve)."""
    runtime: str = "posttrain-vllm"
    """The ServingRuntime in that namespace that serves the `huggingface` model format with vLLM's OpenAI server
    (k8s/overlays/kserve/servingruntime.yaml)."""
    service_account: str = "posttrain-model-reader"
    """The predictor's service account: its Secret (by reference) holds the credentials of a MinIO user that may
    only read the model bucket; KServe's storage initializer downloads the model with them."""
    artifacts_destination: str = "s3://posttrain-mlflow"
    """The MLflow server's --artifacts-destination: a version whose artifacts are proxied (mlflow-artifacts:/...)
    lies under it. The storageUri is always s3://."""
    deployment_mode: str = "Standard"
    """KServe's deployment mode (annotation serving.kserve.io/deploymentMode): Standard (a Deployment) or Knative
    (revisions; needed for a canary)."""
    canary_traffic_percent: int | None = None
    """With Knative: the share of requests the new version gets while the previous one keeps the rest (KServe's
    predictor.canaryTrafficPercent; a rollback, or a deploy without it, sends all requests to one version); none:
    all."""
    accelerator: str | None = None
    """The accelerator resource of the predictor, e.g. nvidia.com/gpu; none: CPU only."""
    gpus: int = 1
    """Accelerators per predictor pod (with `accelerator`)."""
    cpu: str = "4"
    """CPU request and limit of the predictor."""
    memory: str = "16Gi"
    """Memory request and limit of the predictor."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """The GPU node pool: node labels the predictor pods must match."""
    tolerations: list[dict] = field(default_factory=list)
    """Kubernetes tolerations of the predictor pods {key, operator, value, effect, tolerationSeconds}."""
    min_replicas: int = 1
    """Predictor replicas kept running (KServe's minReplicas; 0, scaling to zero, only with Knative: in Standard mode
    KServe raises it to 1)."""
    timeout: int = 900
    """Seconds to wait for the InferenceService's Ready condition; the step fails after that, naming its last
    condition."""
    poll_seconds: float = 5.0
    """How often the InferenceService's status is read while waiting."""

    def __post_init__(self):
        if not self.service:
            self.service = re.sub(r"[^a-z0-9-]", "-", self.name.lower()).strip("-")
        if not ISVC_NAME.match(self.service) or len(self.service) > 45:
            raise ValueError(f"service={self.service!r} is invalid: a DNS label of at most 45 characters, lowercase "
                             "letters, digits and '-', starting with a letter (set `service`)")
        if self.deployment_mode not in MODES:
            raise ValueError(f"deployment_mode={self.deployment_mode!r} is invalid: one of {', '.join(MODES)}")
        if self.canary_traffic_percent is not None:
            if not 0 <= self.canary_traffic_percent <= 100:
                raise ValueError(f"canary_traffic_percent={self.canary_traffic_percent!r} is invalid: 0 to 100")
            if self.deployment_mode != "Knative":
                raise ValueError(f"canary_traffic_percent={self.canary_traffic_percent!r} is invalid with "
                                 f"deployment_mode {self.deployment_mode}: KServe splits traffic between revisions "
                                 "only in Knative mode (set deployment_mode: Knative)")
        if not self.artifacts_destination.startswith("s3://"):
            raise ValueError(f"artifacts_destination={self.artifacts_destination!r} is invalid: an s3:// URI (the "
                             "MLflow server's --artifacts-destination)")
        if self.accelerator is not None and self.gpus < 1:
            raise ValueError(f"gpus={self.gpus!r} is invalid: at least 1 with an accelerator")
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas={self.min_replicas!r} is invalid: 0 or more")
        if self.min_replicas == 0 and self.deployment_mode != "Knative":
            # kserve pkg/controller/v1beta1/inferenceservice/reconcilers/hpa/hpa_reconciler.go raises it to 1
            raise ValueError(f"min_replicas=0 is invalid with deployment_mode {self.deployment_mode}: only Knative "
                             "scales to zero (KServe keeps one replica in Standard mode)")
        if self.timeout <= 0 or self.poll_seconds <= 0:
            raise ValueError(f"timeout={self.timeout!r}, poll_seconds={self.poll_seconds!r}: both must be positive")
        for i, t in enumerate(self.tolerations):
            if not isinstance(t, dict) or set(t) - TOLERATION_KEYS:
                raise ValueError(f"tolerations[{i}]={t!r} is invalid: a mapping of "
                                 f"{', '.join(sorted(TOLERATION_KEYS))}")
