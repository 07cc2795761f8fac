"""Checks across the spec's keys: the stage order and what each stage needs (from the stage registry), each
stage's settings (by the stage's own config class), where each stage may run (several nodes only for a stage whose
entry declares multi_node), the rewards, the eval suites and the promotion rule (by the config of the stage that
provides `eval`). Nothing here names a stage: what a stage is comes from components.stages."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from components.config import Reader, join, merge
from components.stages import FEEDS, SHAPES, STAGES, data_stage, providers
from components.stages import Stage as StageKind
from components.stages import get as get_stage
from pipelines.spec.schema import RUNTIME_KEYS, Spec, SpecError, Stage

REQUIRED_TEXT = {
    "rewards": "it scores completions, and `rewards` is empty (add e.g. rewards: [{name: arithmetic}])",
    "eval_suites": "`eval_suites` is empty",
    "promotion": "the {stage} stage needs a `promotion` rule",
}

BASE = "base"
"""`start_from: base`: the stage starts from the spec's base_model; no stage may take the name."""


def _get(data: dict, dotted: str):
    """The value at a dotted key path of nested mappings, or a sentinel when absent."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return _ABSENT
        data = data[key]
    return data


_ABSENT = object()


def _put(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _placeholders(cls, kind: StageKind) -> dict:
    """A value for each wired key that takes a path or a name, so that only the user's keys can fail; in a
    required part, the first wired key stands for the part (prompts.path, not also prompts.task)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict = {}
    for key in kind.wired:
        top = key.split(".")[0]
        if top not in fields:
            continue
        if "." in key:
            required = fields[top].default_factory is dataclasses.MISSING
            if required and top not in out:
                _put(out, key, f"pipeline-{top}")
        elif hints[top] is str or typing.get_origin(hints[top]) in (typing.Union, types.UnionType) \
                and str in typing.get_args(hints[top]):
            out[key] = f"pipeline-{key}"
    return out


def validate_settings(kind: StageKind, settings: dict, where: str, path: str, injected: dict | None = None):
    """Check a stage's settings with its config class. The keys the pipeline sets are refused; what the spec
    gives the stage (`injected`, e.g. rewards) and placeholders for the wired inputs are added."""
    for key, by in kind.wired.items():
        value = _get(settings, key)
        if value is not _ABSENT:
            raise SpecError(f"{where}: {join(path, key)}: {value!r} is invalid here: set by {by}; remove it")
    cls = kind.config_class()
    values = merge(merge(merge(_placeholders(cls, kind), injected or {}), settings), kind.fixed)
    return Reader(where, SpecError).build(cls, values, path)


class Checker:
    def __init__(self, spec: Spec, where: str):
        self.spec, self.where = spec, where

    def error(self, path: str, message: str) -> SpecError:
        return SpecError(f"{self.where}: {path}: {message}")

    def run(self) -> None:
        reward_names = self.rewards()
        shapes = self.data()
        evaluation = self.suites()
        self.order(shapes)
        self.configs = {}  # the validated config of each stage, by index
        for i, stage in enumerate(self.spec.stages):
            self.configs[i] = self.settings(i, stage)
            self.stage_models(i, stage)
        at = self.eval_stage()
        self.promotion(self.configs[at] if at is not None else evaluation, reward_names)

    def rewards(self) -> list[str]:
        """The reward names, checked without loading anything (a reward model is loaded by the stage that uses it)."""
        if not self.spec.rewards:
            return []
        from components.rewards import check_rewards

        return [name for name, *_ in check_rewards(self.spec.rewards, where=f"{self.where}: rewards")]

    def data(self) -> set[str]:
        """Validate `data` with the config of the data step (the registry's data_stage); return the row shapes its
        sources provide for training (sources whose role is train or both)."""
        sources = self.spec.data.get("sources", [])
        if not isinstance(sources, list):
            raise self.error("data.sources", f"{sources!r} is invalid: a list of sources")
        for i, src in enumerate(sources):
            if not isinstance(src, dict) or "shape" not in src:
                raise self.error(f"data.sources[{i}]", f"{src!r} is invalid: a mapping with a shape "
                                                      f"({', '.join(SHAPES)}) and a uri or a task")
        if not sources:
            return set()
        cfg = validate_settings(data_stage(), self.spec.data, self.where, "data")
        return {src.shape for src in cfg.sources if src.role in ("train", "both")}

    def eval_stage(self) -> int | None:
        """The index of the spec's stage that provides `eval` (the evaluation the promotion rule reads), if any."""
        return next((i for i, st in enumerate(self.spec.stages)
                     if any("eval" in out.provides for out in get_stage(st.stage).outputs.values())), None)

    def suites(self):
        """`eval_suites`, checked by the config of the stage that provides `eval` (the spec's, else the registry's)
        before any stage's settings, so an error names eval_suites; returns that config (or None: no suites)."""
        at = self.eval_stage()
        kind = get_stage(self.spec.stages[at].stage) if at is not None else next(iter(providers("eval")), None)
        if kind is None or not self.spec.eval_suites:
            return None
        try:
            return validate_settings(kind, {}, "", "", {"suites": self.spec.eval_suites})
        except SpecError as e:
            message = str(e).removeprefix(": ")
            raise SpecError(f"{self.where}: " + (f"eval_{message}" if message.startswith("suites")
                                                 else f"eval_suites: {message}")) from None

    def order(self, shapes: set[str]) -> None:
        """Names unique, a kind that makes no model once, the last one last, `start_from` naming an earlier model,
        and each stage's inputs provided by the data or a stage before it."""
        stages = self.spec.stages
        if not stages:
            raise self.error("stages", "[] is invalid: at least one stage")
        provided = {"policy", "base", "data"} | ({"preference"} if "preference" in shapes else set())
        seen: list[str] = []
        names: list[str] = []
        for i, st in enumerate(stages):
            path, kind = f"stages[{i}].stage", get_stage(st.stage)
            if not kind.in_spec:
                raise self.error(path, f"{st.stage!r} is invalid here: every pipeline runs it once, before the "
                                       "stages; its settings are the spec's `data`")
            if st.name in names:
                raise self.error(f"stages[{i}].name", f"{st.name!r} is invalid: each stage needs its own name "
                                                      f"(already stages[{names.index(st.name)}]; set `name`)")
            if st.name == BASE:
                raise self.error(f"stages[{i}].name", f"{BASE!r} is invalid: it names the base model (set `name`)")
            if st.stage in seen and not kind.makes_model:
                raise self.error(path, f"{st.stage!r} is invalid: a kind of stage that makes no model appears once "
                                       f"(already stages[{seen.index(st.stage)}])")
            ended = next((s for s in seen if get_stage(s).last), None)
            if ended is not None and not kind.after_gate:
                raise self.error(path, f"{st.stage!r} is invalid: {ended} is the last stage")
            if st.start_from is not None and st.start_from != BASE and (
                    st.start_from not in names
                    or not get_stage(stages[names.index(st.start_from)].stage).makes_model):
                made = [n for n, s in zip(names, stages) if get_stage(s.stage).makes_model]
                raise self.error(f"stages[{i}].start_from", f"{st.start_from!r} is invalid: {BASE} (the base model) "
                                                            "or the name of an earlier stage that made a model "
                                                            f"({', '.join(made) or 'none'})")
            if st.start_from == BASE and any(inp.feed == "trained_policy" for inp in kind.inputs.values()):
                raise self.error(f"stages[{i}].start_from", f"{BASE!r} is invalid for the {st.stage} stage: it needs "
                                                            f"{FEEDS['trained_policy']}")
            self.data_needed(path, kind, shapes, provided)
            for key in kind.requires:
                if not getattr(self.spec, key):
                    text = REQUIRED_TEXT[key].replace("{stage}", st.stage)
                    if key == "promotion":
                        raise self.error("promotion", f"missing; {text}")
                    raise self.error(path, f"{st.stage!r} is invalid: {text}")
            self.scale(i, st, kind)
            self.tensor_parallel(i, st)
            for inp in kind.inputs.values():
                if inp.feed not in provided and not inp.optional:
                    makers = [s.name for s in providers(inp.feed)]
                    raise self.error(path, f"{st.stage!r} is invalid here: it needs {FEEDS[inp.feed]} from a stage "
                                           f"before it ({' or '.join(makers)})")
            provided |= {feed for out in kind.outputs.values() for feed in out.provides}
            seen.append(st.stage)
            names.append(st.name)

    def scale(self, i: int, st: Stage, kind: StageKind) -> None:
        """Several nodes: only a stage whose registry entry declares multi_node, on a workspace every node can mount
        at once."""
        resources = self.spec.stage_resources(st)
        if not resources.multi_node:
            return
        where = (f"stages[{i}].resources" if st.resources is not None else
                 "runtime_resources" if resources is self.spec.runtime_resources else "resources")
        if not kind.multi_node:
            key = "max_nodes" if resources.max_nodes is not None else "nodes"
            able = ", ".join(s.name for s in STAGES.values() if s.multi_node) or "none"
            raise self.error(f"{where}.{key}", f"{resources.most_nodes} is invalid for the {st.stage} stage: only a "
                                               f"stage that declares multi_node runs on several nodes ({able}); 1")
        modes = self.spec.storage.workspace_access_modes
        if "ReadWriteMany" not in modes:
            raise self.error("storage.workspace_access_modes",
                             f"{modes} is invalid: {st.stage} may run on {resources.most_nodes} nodes, which all "
                             "mount the run's workspace (its checkpoints) at once: add ReadWriteMany")

    def tensor_parallel(self, i: int, st: Stage) -> None:
        """rollout.tensor_parallel_size must divide the stage's processes, one per accelerator: each engine takes
        that many whole accelerators of the node."""
        rollout = st.settings.get("rollout") if isinstance(st.settings, dict) else None
        size = rollout.get("tensor_parallel_size", 1) if isinstance(rollout, dict) else 1
        gpus = self.spec.stage_resources(st).gpus
        if isinstance(size, int) and not isinstance(size, bool) and size > 1 and max(gpus, 1) % size:
            where = f"stages[{i}].resources.gpus" if st.resources is not None else "resources.gpus"
            raise self.error(f"stages[{i}].settings.rollout.tensor_parallel_size",
                             f"{size} is invalid: a divisor of the stage's accelerators ({where}: {gpus}); each "
                             f"engine takes {size} of them, one process each")

    def data_needed(self, path: str, kind: StageKind, shapes: set[str], provided: set[str]) -> None:
        need = kind.trains_on
        if need is None or need in shapes or need in provided:
            return
        if need == "preference":
            makers = [s.name for s in STAGES.values() if any("preference" in o.provides for o in s.outputs.values())
                      and s.in_spec]
            raise self.error(path, f"{kind.name!r} is invalid here: it needs preference data, and there is neither a "
                                   "source of shape 'preference' with role train or both in data.sources nor a "
                                   f"{' or '.join(makers)} stage before it")
        raise self.error(path, f"{kind.name!r} is invalid here: it trains on data of shape {need!r}, and no source "
                               f"in data.sources gives training rows of it (training shapes: "
                               f"{', '.join(sorted(shapes)) or 'none'}; a source trains when its role is train or "
                               "both, and a task source's default role is train only for split id, part train)")

    def settings(self, i: int, stage: Stage):
        """The stage's settings, validated by its config class (returned), and a rollout engine it declares."""
        path = f"stages[{i}].settings"
        kind = get_stage(stage.stage)
        if kind.kind == "train":
            train = stage.settings.get("train") if isinstance(stage.settings.get("train"), dict) else {}
            for key, (cast, allowed) in RUNTIME_KEYS.items():
                v = train.get(key)
                ok = isinstance(v, (int, float) if cast is float else int) and not isinstance(v, bool)
                if v is not None and (not ok or not math.isfinite(v) or v <= 0):
                    raise self.error(f"{path}.train.{key}", f"{v!r} is invalid: {allowed}")
        cfg = validate_settings(kind, stage.settings, self.where, path, self.injected(kind))
        rollout = getattr(cfg, "rollout", None)
        engine = getattr(rollout, "engine", None)
        if engine is not None and engine not in kind.engines:
            raise self.error(f"{path}.rollout.engine", f"{engine!r} is invalid for the {stage.stage} stage: "
                                                       f"{', '.join(kind.engines) or 'none'} (its registry entry)")
        return cfg

    def stage_models(self, i: int, stage: Stage) -> None:
        """A reward whose `uri` is `stage:<name>` (the model the named stage before it made) is read
        through an input of the stage that scores with it: that stage must have an input fed by what the named
        stage provides, and the named stage must come before it."""
        from components.rewards import STAGE_PREFIX

        own = stage.settings.get("rewards") if isinstance(stage.settings, dict) else None
        kind = get_stage(stage.stage)
        specs, path = ((own, f"stages[{i}].settings.rewards") if own is not None
                       else (self.injected(kind).get("rewards") or [], "rewards"))
        before = {s.name: s.stage for s in self.spec.stages[:i]}
        for j, reward in enumerate(specs):
            uri = reward.get("uri") if isinstance(reward, dict) else None
            if not (isinstance(uri, str) and uri.startswith(STAGE_PREFIX)):
                continue
            name, at = uri[len(STAGE_PREFIX):], f"{path}[{j}].uri"
            if name not in before:
                raise self.error(at, f"{uri!r} is invalid for the {stage.name} stage: no {name} stage before it "
                                     f"(stages before: {', '.join(before) or 'none'})")
            provides = {feed for out in get_stage(before[name]).outputs.values() for feed in out.provides}
            if not any(inp.feed in provides for inp in kind.inputs.values()):
                readers = [s.name for s in STAGES.values() if any(inp.feed in provides for inp in s.inputs.values())]
                raise self.error(at, f"{uri!r} is invalid for the {stage.name} stage: it has no input for the model "
                                     f"of {name} (stages that read one: {', '.join(readers) or 'none'}); give a "
                                     "directory, or set the rewards in the settings of a stage that reads it")

    def injected(self, kind: StageKind) -> dict:
        """What the spec's top level gives a stage's config."""
        spec = self.spec
        values = {"suites": spec.eval_suites, "name": spec.tracking.registered_model,
                  "promotion": dataclasses.asdict(spec.promotion) if spec.promotion else None}
        if spec.rewards:
            values["rewards"] = spec.rewards
        return {k: v for k, v in values.items() if k in kind.injected}

    def promotion(self, evaluation, reward_names: list[str]) -> None:
        """Each metric the rule names is one the evaluation will write: `evaluation` is the validated config of the
        stage that provides `eval` (its metric_names(reward_names)), None when no stage evaluates."""
        rule = self.spec.promotion
        if rule is None:
            return
        known = set()
        if evaluation is not None:
            names = reward_names or [r["name"] for r in evaluation.reward_specs()]
            known = evaluation.metric_names(names)
        for path, metric in [("promotion.metric", rule.metric)] + [
                (f"promotion.guards[{i}].metric", g.metric) for i, g in enumerate(rule.guards)]:
            if metric not in known:
                listed = ", ".join(s["name"] for s in evaluation.suites) if evaluation is not None else \
                    "none: eval_suites is empty"
                raise self.error(path, f"{metric!r} is invalid: the eval will not produce it; metrics are "
                                       f"<suite>/<metric> with the suites of eval_suites ({listed}): "
                                       f"{', '.join(sorted(known)) or 'none'}")
