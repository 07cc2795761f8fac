"""The container images the pipeline steps and the cluster services run: the one place for registry and tag.

`make images push` builds and pushes the same names (the Makefile reads the same defaults and the same
environment variables), and the Kubernetes manifests in k8s/ name the MLflow image built alongside. Set
POSTTRAIN_REGISTRY / POSTTRAIN_TAG before compiling a pipeline to run your own build:

    export POSTTRAIN_REGISTRY=registry.example.com/ml POSTTRAIN_TAG=0.1.1
    make images push && posttrain compile cluster -o pipeline.yaml
"""

from __future__ import annotations

import os

DEFAULT_REGISTRY = "ghcr.io/posttrain"
DEFAULT_TAG = "0.1.0"

REGISTRY = os.environ.get("POSTTRAIN_REGISTRY") or DEFAULT_REGISTRY
TAG = os.environ.get("POSTTRAIN_TAG") or DEFAULT_TAG


def image(name: str, registry: str = REGISTRY, tag: str = TAG) -> str:
    """The reference of the image built from images/<name>/Dockerfile."""
    return f"{registry}/posttrain-{name}:{tag}"


TRAINER_IMAGE = image("trainer")  # CUDA, torch, DeepSpeed: sft, psft, dpo, grpo, reward scoring, evaluate
RUNTIME_IMAGE = image("runtime")  # CPU only: data prep, scoring glue, registration, promotion
MLFLOW_IMAGE = image("mlflow")  # the MLflow tracking server of k8s/ (Postgres and S3 drivers added)
