"""Pin the CRDs posttrain's manifests and steps use here, without their descriptions (the schema is all
k8s/validate.py reads). Kubeflow Trainer's (its TrainJobs):

    for kind in trainjobs trainingruntimes; do
      git -C trainer show v2.3.0:manifests/base/crds/trainer.kubeflow.org_$kind.yaml \
        | python k8s/crds/pin.py v2.3.0 658725bdae5c7e3a0854d93ac6ff492e109a22ab \
        > k8s/crds/trainer.kubeflow.org_$kind.yaml
    done

The version matches the kubeflow-trainer-api package pinned in pyproject.toml (its models build the TrainJob).
KServe's (the deploy stage's InferenceService and the ServingRuntime of k8s/overlays/kserve):

    for kind in inferenceservices servingruntimes; do
      git -C kserve show v0.20.0:config/crd/full/serving.kserve.io_$kind.yaml \
        | python k8s/crds/pin.py v0.20.0 1fb781055dd1567164358233e1125142ca6ef1fe \
        > k8s/crds/serving.kserve.io_$kind.yaml
    done
"""

import sys

import yaml

PROJECTS = {
    "trainer.kubeflow.org": ("Kubeflow Trainer", "github.com/kubeflow/trainer", "manifests/base/crds"),
    "serving.kserve.io": ("KServe", "github.com/kserve/kserve", "config/crd/full"),
}
"""A CRD's API group → its project, repository and the folder of its CRD files there."""


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main() -> None:
    tag, commit = sys.argv[1], sys.argv[2]
    crd = strip(yaml.safe_load(sys.stdin))
    name, group = crd["metadata"]["name"], crd["spec"]["group"]
    project, repository, folder = PROJECTS[group]
    source = f"{folder}/{group}_{crd['spec']['names']['plural']}.yaml"
    print(f"# {name}: the CRD of {project} {tag}\n# {repository} commit {commit}, {source}\n"
          "# descriptions removed by k8s/crds/pin.py")
    print(yaml.safe_dump(crd, sort_keys=False, width=120), end="")


if __name__ == "__main__":
    main()
