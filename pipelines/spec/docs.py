"""docs/spec.md: every key of the spec with its type, default and meaning, from the field docstrings of the
schema (`python -m pipelines.spec docs > docs/spec.md`; tests/unit/test_spec_docs.py checks it is current)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing

import pipelines.spec as spec_module
from components.config_docs import field_docs
from components.stages import FEEDS, STAGES, data_stage, providers
from pipelines.spec.schema import (
    Guard,
    Images,
    Promotion,
    Resources,
    Schedule,
    Spec,
    Stage,
    Storage,
    Toleration,
    Tracking,
)

SPEC_CLASSES = (Spec, Stage, Resources, Toleration, Promotion, Guard, Images, Storage, Tracking, Schedule)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        return f"see [{type(value).__name__}](#{type(value).__name__.lower()})"
    return "—" if value is None else f"`{json.dumps(value)}`"


def _hint_text(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_hint_text(a) for a in args if a is not type(None)) + " \\| null"
    if dataclasses.is_dataclass(hint):
        return f"[{hint.__name__}](#{hint.__name__.lower()})"
    if origin is list:
        return f"list of {_hint_text(args[0])}"
    if origin is dict:
        return f"mapping {_hint_text(args[0])} → {_hint_text(args[1])}"
    return {str: "string", int: "integer", float: "number", bool: "boolean", dict: "mapping"}[hint]


def reference_markdown() -> str:
    """docs/spec.md: every key of the spec with its type, default and meaning."""
    lines = ["# The workflow spec", "",
             "<!-- Generated from the field docstrings of pipelines/spec/schema.py by "
             "`python -m pipelines.spec docs > docs/spec.md`; tests/unit/test_spec_docs.py checks it is current. -->",
             "", inspect.cleandoc(spec_module.__doc__.split("\n\n", 2)[2]), "",
             "Bundled specs: `pipelines/specs/demo.yaml` (CPU, tiny model), `pipelines/specs/rlhf-demo.yaml` (CPU, "
             "tiny model: SFT, a reward model, PPO) and `pipelines/specs/cluster.yaml` (8 GPUs).",
             ""]
    for cls in SPEC_CLASSES:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        lines += [f"## {cls.__name__}", "", " ".join(inspect.cleandoc(cls.__doc__).split()), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            lines.append(f"| `{f.name}` | {_hint_text(hints[f.name])} | {_default_text(f)} | {docs[f.name]} |")
        lines.append("")
    lines += stages_section()
    evaluating = ", ".join(s.name for s in providers("eval"))
    lines += ["## Metrics the promotion rule can name", "",
              "`<suite>/<metric>` for each suite of `eval_suites` (a task suite is named `<task>-<split>` unless it "
              f"names itself), with metric one of: `accuracy`, `pass@k` for each k of the {evaluating} stage's `k` "
              "(default [1]), `reward/<fn>` for each reward function (default: each suite task's verifier) and "
              "`length`, each also with `_ci_low` and `_ci_high` (the 95% bootstrap interval); task suites add "
              "`entropy` and `kl_to_base`. `heldout/entropy` and `heldout/kl_to_base` exist when that stage sets "
              "`heldout_text`. (Its config's `metric_names`.)", ""]
    return "\n".join(lines)


def stages_section() -> list[str]:
    """The stages a spec may list, from the stage registry (components/stages.py): kind, data, inputs, outputs and
    capabilities of each."""
    data = data_stage()
    lines = ["## Stages", "",
             f"The stage registry's kinds (components/stages.py). Every pipeline first runs {data.name} (its settings "
             "are the spec's `data`); then the spec's `stages`. A stage's inputs are fed by what a stage before it "
             "provides; `settings` are its config's keys (components/<module>/README.md).", "",
             "| stage | kind | trains on | needs | provides | several nodes | rollout engines | LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES.values():
        if not stage.in_spec:
            continue
        needs = ", ".join(f"{inp.feed}{' (optional)' if inp.optional else ''}" for inp in stage.inputs.values())
        provides = ", ".join(dict.fromkeys(f for out in stage.outputs.values() for f in out.provides))
        lines.append(f"| `{stage.name}` | {stage.kind} | {stage.trains_on or '—'} | {needs or '—'} | "
                     f"{provides or '—'} | {'yes' if stage.multi_node else 'no'} | {', '.join(stage.engines) or '—'} "
                     f"| {'yes' if stage.lora else 'no'} |")
    return lines + ["", "What each input and output carries: " + "; ".join(f"`{k}`: {v}" for k, v in FEEDS.items())
                    + ".", ""]
