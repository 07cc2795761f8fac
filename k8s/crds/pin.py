"""Pin Kubeflow Trainer's CRDs here, without their descriptions (the schema is all k8s/validate.py reads).

    for kind in trainjobs trainingruntimes; do
      git -C trainer show v2.3.0:manifests/base/crds/trainer.kubeflow.org_$kind.yaml \
        | python k8s/crds/pin.py v2.3.0 658725bdae5c7e3a0854d93ac6ff492e109a22ab \
        > k8s/crds/trainer.kubeflow.org_$kind.yaml
    done

The version matches the kubeflow-trainer-api package pinned in pyproject.toml (its models build the TrainJob).
"""

import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main() -> None:
    tag, commit = sys.argv[1], sys.argv[2]
    crd = strip(yaml.safe_load(sys.stdin))
    name = crd["metadata"]["name"]
    source = f"manifests/base/crds/{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml"
    print(f"# {name}: the CRD of Kubeflow Trainer {tag}\n# github.com/kubeflow/trainer commit {commit}, {source}\n"
          "# descriptions removed by k8s/crds/pin.py")
    print(yaml.safe_dump(crd, sort_keys=False, width=120), end="")


if __name__ == "__main__":
    main()
