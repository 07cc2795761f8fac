"""The workflow spec: one YAML file read into typed, documented dataclasses and validated once, at the edge.

    spec = load_spec("demo")                         # a bundled spec by name (pipelines/specs/demo.yaml)
    spec = load_spec("my-spec.yaml")                 # or a path

A spec names the base model, the data, the ordered stages with their settings, the reward functions, the
eval suites, the promotion rule, where each step runs (resources, images) and where things are kept
(storage, tracking). Everything a run would trip over is caught here, before a step starts: an unknown key,
a value of the wrong type, a negative learning rate, a stage order that cannot work (DPO with no preference
data, GRPO with no reward function, a registration with no evaluation before it), several nodes for a stage that
runs on one, a GPU count with no accelerator type, a promotion rule naming a metric the eval will not produce.
Each error names the file, the key's path (`stages[2].settings.train.lr`), the bad value and what is allowed.

A stage's settings are its own config's keys (components/<stage>/README.md), checked by that config class
through components.config's reader; the keys that wire a stage to its inputs and outputs (model,
train_data, output_dir, ...) are the pipeline's and may not be set. docs/spec.md is generated from the
field docstrings of the schema (`python -m pipelines.spec docs > docs/spec.md`).

A spec is read within bounds, as every YAML file here is (components.yamlread), since it may be pasted from
anywhere: at most 1 MiB, mappings and lists nested at most 64 levels deep, anchors and aliases (`&name`,
`*name`) only while the document stays under 4 Mi nodes and characters once they are expanded, and each key
once in a mapping (a repeated key is refused, naming it and both lines, instead of the last one winning). A
file that breaks one of these, or is not YAML, is refused in one line naming the file, the line and the column.
An error message is at most 1000 characters: a long value it quotes is cut in the middle.

The package: `schema` (the dataclasses), `checks` (what spans keys: stage order, settings, promotion), `docs`
(the reference page); the readers are components.yamlread's (the YAML) and components.config's (the keys), shared
with the stage configs.
"""

from __future__ import annotations

from pathlib import Path

from components.config import Reader
from components.yamlread import read_yaml
from pipelines.spec.checks import Checker, validate_settings
from pipelines.spec.schema import (
    BUNDLED_MODELS,
    NAME_RE,
    QUANTITY_RE,
    RUNTIME_KEYS,
    Guard,
    Images,
    Invalid,
    Promotion,
    Resources,
    Schedule,
    Spec,
    SpecError,
    Stage,
    Storage,
    Toleration,
    Tracking,
    is_model_uri,
)

SPECS_DIR = Path(__file__).parents[1] / "specs"
BUNDLED_SPECS = ("demo", "sft-psft", "compare", "rlhf-demo", "cluster", "cluster-7b", "cluster-70b-lora")
"""Workflow specs shipped in pipelines/specs/, loadable by name."""


def parse_spec(data, where: str = "spec") -> Spec:
    """Build and validate a Spec from a mapping (a YAML document); `where` names it in errors."""
    spec = Reader(where, SpecError).build(Spec, data)
    Checker(spec, where).run()
    return spec


def spec_path(name_or_path: str | Path) -> Path:
    """A bundled spec by name (BUNDLED_SPECS) or a path to a YAML file."""
    if str(name_or_path) in BUNDLED_SPECS:
        return SPECS_DIR / f"{name_or_path}.yaml"
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    raise SpecError(f"{name_or_path}: no such file, and no bundled spec of that name (bundled: "
                    f"{', '.join(BUNDLED_SPECS)})")


def load_spec(name_or_path: str | Path) -> Spec:
    """Read and validate a spec file (or a bundled spec by name)."""
    path = spec_path(name_or_path)
    return parse_spec(read_yaml(path, SpecError), str(path))


__all__ = ["BUNDLED_MODELS", "BUNDLED_SPECS", "NAME_RE", "QUANTITY_RE", "RUNTIME_KEYS", "SPECS_DIR", "Guard",
           "Images", "Invalid", "Promotion", "Resources", "Schedule", "Spec", "SpecError", "Stage", "Storage",
           "Toleration", "Tracking", "is_model_uri", "load_spec", "parse_spec", "spec_path", "validate_settings"]
