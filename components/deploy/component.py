"""The deploy stage as a KFP component."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def deploy(registration: Input[Artifact], registered_model: str, settings: str, stage: str, tracking_uri: str,
           parent_run_id: str, namespace: str, deployment: Output[Artifact], card: Output[Markdown]):
    """Serves the registered version the promotion gate made champion with a KServe InferenceService (created or
    patched), waits for it to be Ready and records its URL on the version and the step's MLflow run. Runs after
    the gate; deploys nothing when the champion is not (or no longer) that version.

    Args:
        registration: The register step's result ({name, version, ...}).
        registered_model: The registered model's name.
        settings: The stage's settings from the spec (JSON).
        stage: The stage's name, for its MLflow run.
        tracking_uri: MLflow tracking URI (a server with a model registry).
        parent_run_id: The pipeline's MLflow run.
        namespace: The namespace of the InferenceService: the spec's storage.namespace.
        deployment: {deployed, reason, service, namespace, version, previous, storage_uri, url, action}.
        card: What was deployed, where, or why nothing was.
    """
    import json
    import shutil
    import tempfile

    from components.step import Step

    with open(registration.path) as f:
        version = str(json.load(f)["version"])
    out = tempfile.mkdtemp()
    step = Step(stage, settings, output_dir=out, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    summary = step.run("deploy", name=registered_model, version=version, namespace=namespace)
    shutil.copyfile(f"{out}/deployment.json", deployment.path)
    with open(card.path, "w") as f:
        if summary["deployed"]:
            f.write(f"# {registered_model} v{version} served\n\nInferenceService {summary['namespace']}/"
                    f"{summary['service']} ({summary['action']}) is Ready at {summary['url']}\n\nModel: "
                    f"{summary['storage_uri']}\n")
        else:
            f.write(f"# {registered_model} v{version}: nothing deployed\n\n{summary['reason']}\n")
