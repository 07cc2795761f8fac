"""The evaluation report: one self-contained HTML file (figures embedded as PNG data URIs, no network).

    write_report([StageResult("base", eval="base/eval.json"),
                  StageResult("sft", eval="sft/eval.json", metrics="sft/metrics.jsonl"),
                  StageResult("grpo", eval="grpo/eval.json", metrics="grpo/metrics.jsonl", parent="sft")],
                 "report.html")

A stage result names a model and carries its eval.json (whose baselines join the comparison under their
own names unless a stage already has that name) and the metrics.jsonl of its training. Figures:

- accuracy per suite and model, with the 95% bootstrap intervals;
- the change of in-domain and OOD accuracy each stage made, against the stage before it and against the base
  model, with 95% paired bootstrap intervals (eval.json's `effects`; without them, each model against its
  parent, default the first model, without intervals);
- mean token entropy per suite and model (teacher-forced on reference completions);
- entropy over training steps of every stage that logged `entropy` (SFT vs PSFT, and the RL stages), the stages
  one after another on one step axis, in the order they trained (the order of the stage results; the caption
  names it too);
- the reward curve of every stage that logged `reward` or `rewards/<fn>/mean` (GRPO), on the same axis.

The evaluate stage writes it with `write_evaluation_report`, titled by the pipeline run.

An input that is missing or unreadable leaves its figure out with a note saying why; it never fails the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

log = logging.getLogger(__name__)

TRAINING_REWARD_KEYS = ("reward",)  # plus every rewards/<fn>/mean


@dataclass
class StageResult:
    """One model of the report: its evaluation and its training metrics, either may be missing."""
    name: str
    eval: dict | str | Path | None = None
    """eval.json contents or path."""
    metrics: str | Path | None = None
    """metrics.jsonl of the stage's training (one JSON object per step)."""
    parent: str | None = None
    """The model it was trained from, for the in-domain vs OOD change (default: the first model)."""


@dataclass
class Collected:
    """What the figures draw from, gathered from every stage result; `notes` say what could not be read."""
    models: dict[str, dict[str, float]]
    parents: dict[str, str | None]
    suites: dict[str, dict]
    differences: list[tuple[str, str, dict]]
    training: dict[str, list[dict]]
    notes: list[str]
    effects: list[dict]
    """Each stage's change in accuracy per suite, against the previous stage and the base (eval.json `effects`)."""

    lineage: dict[str, str | None] = field(default_factory=dict)
    """Each stage → the model it was trained from, as given (StageResult.parent): where its curves start."""

    def step_axis(self) -> list[tuple[int, str]]:
        """(first step, stage) of every stage that logged steps, in the order they trained: a stage starts where the
        model it was trained from ended (0 for a model with no training here, e.g. the base model), or, when it
        does not say, after the stage before it."""
        out, ends, previous = [], {}, 0
        for stage, rows in self.training.items():
            steps = [r["step"] for r in rows if isinstance(r.get("step"), (int, float))]
            if steps:
                parent = self.lineage.get(stage)
                start = previous if parent is None else ends.get(parent, 0)
                out.append((start, stage))
                ends[stage] = previous = start + max(steps)
        return out

    def order(self) -> str:
        """The stages on the step axis: `a → b` where b continued from a, `| b (from x)` where b started from
        another model (a branch, e.g. two recipes from one start)."""
        text, before = "", None
        for _, stage in self.step_axis():
            parent = self.lineage.get(stage)
            if before is None:
                text = stage if parent in (None, "base") or parent not in self.training else f"{stage} (from {parent})"
            elif parent is None or parent == before:
                text += f" → {stage}"
            else:
                text += f" | {stage} (from {parent})"
            before = stage
        return text

    def color(self, name: str) -> str:
        """One color per model or stage, the same in every figure."""
        names = list(self.models) + [t for t in self.training if t not in self.models]
        return f"C{names.index(name) % 10}" if name in names else "gray"


def _read_json(value, what: str, notes: list[str]) -> dict | None:
    if isinstance(value, dict):
        return value
    try:
        doc = json.loads(Path(value).read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{what}: cannot read {value} ({e})")
        return None
    if not isinstance(doc, dict):
        notes.append(f"{what}: {value} is not a JSON object")
        return None
    return doc


def _read_metrics(path, what: str, notes: list[str]) -> list[dict]:
    """The steps of a metrics.jsonl file; unreadable lines are skipped and counted in a note."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        notes.append(f"{what}: cannot read {path} ({e})")
        return []
    rows, bad = [], 0
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{what}: {bad} unreadable line(s) in {path} skipped")
    return rows


def collect(stages: Sequence[StageResult]) -> Collected:
    """Models in order: for each evaluated stage, its eval's baselines not named yet, then the stage's own model.

    A baseline whose name is a stage with its own eval is that stage's result; otherwise it stands for it."""
    notes: list[str] = []
    models: dict[str, dict[str, float]] = {}
    parents: dict[str, str | None] = {}
    suites: dict[str, dict] = {}
    diffs, training, docs, effects = [], {}, {}, []
    declared = {s.name: s.parent for s in stages}
    for stage in stages:
        if stage.metrics is not None:
            training[stage.name] = _read_metrics(stage.metrics, f"{stage.name} metrics", notes)
        doc = None if stage.eval is None else _read_json(stage.eval, f"{stage.name} eval", notes)
        if doc is not None and not isinstance(doc.get("metrics"), dict):
            notes.append(f"{stage.name} eval: no 'metrics' mapping")
        elif doc is not None:
            docs[stage.name] = doc
    for stage in stages:
        doc = docs.get(stage.name)
        if doc is None:
            continue
        for b, metrics in (doc.get("baselines") or {}).items():  # a stage's own evaluation wins over a baseline's
            if b not in models and b not in docs and isinstance(metrics, dict):
                models[b], parents[b] = metrics, declared.get(b)
        models[stage.name], parents[stage.name] = doc["metrics"], stage.parent
        for name, info in (doc.get("suites") or {}).items():
            suites.setdefault(name, info if isinstance(info, dict) else {})
        for b, d in (doc.get("differences") or {}).items():
            if isinstance(d, dict) and d:
                diffs.append((stage.name, b, d))
        effects += [e for e in doc.get("effects") or [] if isinstance(e, dict)]
    return Collected(models, parents, suites, diffs, training, notes, effects, lineage=declared)


# ----------------------------------------------------------------------------------------------------
# Figures: each returns a Figure, or a note saying why it is left out

def _suites_with(c: Collected, metric: str) -> list[str]:
    seen = []
    for metrics in c.models.values():
        for key in metrics:
            suite, _, m = key.partition("/")
            if m == metric and suite not in seen:
                seen.append(suite)
    return seen


def _grouped_bars(c: Collected, metric: str, ylabel: str, title: str, with_ci: bool,
                  ylim: tuple[float, float] | None = None) -> Figure | str:
    suites = _suites_with(c, metric)
    if not suites:
        return f"no model has a '{metric}' metric"
    names = list(c.models)
    fig = Figure(figsize=(max(8.0, 0.5 * len(suites) * len(names) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        m = c.models[name]
        xs, ys, err = [], [], [[], []]
        for i, s in enumerate(suites):
            v = m.get(f"{s}/{metric}")
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(v)
            lo, hi = m.get(f"{s}/{metric}_ci_low", v), m.get(f"{s}/{metric}_ci_high", v)
            err[0].append(max(v - lo, 0.0))
            err[1].append(max(hi - v, 0.0))
        ax.bar(xs, ys, width, yerr=err if with_ci else None, capsize=3, label=name, color=c.color(name))
    ax.set_xticks(range(len(suites)), suites, rotation=15 if len(suites) > 4 else 0)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    fig.legend(loc="outside right upper", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def figure_accuracy(c: Collected) -> Figure | str:
    return _grouped_bars(c, "accuracy", "accuracy (avg@n)", "Accuracy per suite and model, 95% bootstrap intervals",
                         with_ci=True, ylim=(0.0, 1.0))


def figure_entropy(c: Collected) -> Figure | str:
    return _grouped_bars(c, "entropy", "mean token entropy (nats)",
                         "Mean token entropy on held-out reference completions", with_ci=False)


def _id_ood_pairs(c: Collected) -> list[tuple[str, str, str]]:
    """(task, in-domain suite, OOD suite) for every task evaluated on both splits."""
    by_task: dict[str, dict[str, str]] = {}
    for name, info in c.suites.items():
        if info.get("task") and info.get("split") in ("id", "ood"):
            by_task.setdefault(info["task"], {}).setdefault(info["split"], name)
    return [(t, s["id"], s["ood"]) for t, s in by_task.items() if "id" in s and "ood" in s]


def _parent_changes(c: Collected, sid: str, sood: str) -> list[tuple[str, float, float, None, None]]:
    """Without eval.json effects: each model's accuracy minus its parent's (no intervals)."""
    first, out = next(iter(c.models)), []
    for name in list(c.models)[1:]:
        ref = c.parents.get(name) or first
        m, r = c.models[name], c.models.get(ref, {})
        keys = (f"{sid}/accuracy", f"{sood}/accuracy")
        if all(isinstance(x.get(k), (int, float)) for x in (m, r) for k in keys):
            out.append((f"{name}\n(vs {ref})", m[keys[0]] - r[keys[0]], m[keys[1]] - r[keys[1]], None, None))
    return out


def _effect_changes(c: Collected, sid: str, sood: str, against: str) -> list[tuple]:
    """(label, Δ id, Δ ood, id interval, ood interval) of every stage's effect against `against`."""
    by = {(e["stage"], e["suite"]): e for e in c.effects if e.get("against") == against}
    out = []
    for stage in dict.fromkeys(e["stage"] for e in c.effects):
        i, o = by.get((stage, sid)), by.get((stage, sood))
        if i and o:
            out.append((f"{stage}\n(vs {i['reference']})", i["diff"], o["diff"], (i["ci_low"], i["ci_high"]),
                        (o["ci_low"], o["ci_high"])))
    return out


def figure_id_vs_ood(c: Collected) -> Figure | str:
    pairs = _id_ood_pairs(c)
    if not pairs:
        return "no task was evaluated on both its in-domain (id) and out-of-domain (ood) split"
    if len(c.models) < 2:
        return "the change after a stage needs at least two models"
    panels = []  # (title, rows)
    for task, sid, sood in pairs:
        if c.effects:
            panels += [(f"{task}: change after each stage, against the stage before", _effect_changes(c, sid, sood,
                                                                                                     "previous")),
                       (f"{task}: change after each stage, against the base model", _effect_changes(c, sid, sood,
                                                                                                   "base"))]
        else:
            panels.append((f"{task}: change in accuracy after each stage", _parent_changes(c, sid, sood)))
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return "no model has accuracy on both splits next to its parent's"

    def err(v, ci):
        return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]] if ci else None

    n = max(len(rows) for _, rows in panels)
    fig = Figure(figsize=(max(8.0, 1.3 * n + 2), 3.6 * len(panels)), layout="constrained")
    for k, (title, rows) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        for x, (_, d_id, d_ood, ci_id, ci_ood) in enumerate(rows):
            ax.bar(x - 0.2, d_id, 0.4, yerr=err(d_id, ci_id), capsize=4, color="C0",
                   label="in-domain" if not x else None)
            ax.bar(x + 0.2, d_ood, 0.4, yerr=err(d_ood, ci_ood), capsize=4, color="C3",
                   label="out-of-domain" if not x else None)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), [r[0] for r in rows])
        ax.set_ylabel("Δ accuracy" + (" (95% paired CI)" if c.effects else ""))
        ax.set_title(title)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
    return fig


def _smooth(ys: list[float]) -> list[float]:
    """Trailing moving average over about 2% of the steps, so a trend shows through per-step noise."""
    w = max(1, len(ys) // 50)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def _curves(c: Collected, keys: Callable[[dict], list[str]], ylabel: str, title: str, missing: str) -> Figure | str:
    """Each stage's curves after the previous stage's, on one step axis (stages in the order they trained)."""
    series, starts = [], c.step_axis()
    for offset, stage in starts:
        rows = c.training[stage]
        for j, key in enumerate(keys(rows[0])):
            pts = [(offset + r["step"], r[key]) for r in rows
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                series.append((f"{stage}" if key in ("entropy", "reward") else f"{stage} {key}", pts,
                               c.color(stage), ("-", "--", ":", "-.")[j % 4]))
    if not series:
        return missing
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for label, pts, color, style in series:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=color, ls=style, alpha=0.25, lw=0.8)
        ax.plot(xs, _smooth(list(ys)), color=color, ls=style, lw=1.8, label=label)
    for x, _ in starts[1:]:
        ax.axvline(x, color="gray", lw=0.8, ls=":")
    ax.set_xlim(left=0)  # a stage that logged none of these keys still takes its place on the axis
    ax.set_xlabel(f"optimizer step, the stages one after another ({_order(c)})")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return fig


def _order(c: Collected) -> str:
    return c.order()


def figure_training_entropy(c: Collected) -> Figure | str:
    return _curves(c, lambda row: ["entropy"] if "entropy" in row else [], "mean token entropy (nats)",
                   "Entropy over training steps", "no training metrics.jsonl with an 'entropy' column was given")


def _reward_keys(row: dict) -> list[str]:
    keys = [k for k in TRAINING_REWARD_KEYS if k in row]
    return keys or sorted(k for k in row if k.startswith("rewards/") and k.endswith("/mean"))


def figure_reward_curve(c: Collected) -> Figure | str:
    return _curves(c, _reward_keys, "mean reward", "Reward over training steps (GRPO)",
                   "no training metrics.jsonl with a 'reward' or 'rewards/<fn>/mean' column was given")


FIGURES: list[tuple[str, str, Callable[[Collected], Figure | str]]] = [
    ("accuracy", "Accuracy per suite and model", figure_accuracy),
    ("id-vs-ood", "In-domain vs out-of-domain change after each stage", figure_id_vs_ood),
    ("entropy", "Mean token entropy", figure_entropy),
    ("training-entropy", "Entropy over training steps", figure_training_entropy),
    ("reward-curve", "Reward curve", figure_reward_curve),
]
STEP_AXIS = ("training-entropy", "reward-curve")
"""The figures whose x-axis is the stages one after another: their caption names the stages in that order."""


def png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------
# Tables and the page

def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _suite_tables(c: Collected) -> str:
    out = []
    suites = []
    for metrics in c.models.values():
        for key in metrics:
            suite = key.partition("/")[0]
            if suite not in suites:
                suites.append(suite)
    for suite in suites:
        cols = []
        for metrics in c.models.values():
            for key in metrics:
                if key.startswith(suite + "/"):
                    m = key[len(suite) + 1:]
                    if not m.endswith(("_ci_low", "_ci_high")) and m not in cols:
                        cols.append(m)
        head = "".join(f"<th>{html.escape(m)}</th>" for m in cols)
        body = []
        for name, metrics in c.models.items():
            cells = []
            for m in cols:
                v, lo, hi = (metrics.get(f"{suite}/{m}{x}") for x in ("", "_ci_low", "_ci_high"))
                ci = f" <small>[{_fmt(lo)}, {_fmt(hi)}]</small>" if lo is not None and hi is not None else ""
                cells.append(f"<td>{_fmt(v)}{ci}</td>")
            body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
        info = c.suites.get(suite, {})
        what = ", ".join(f"{k} {html.escape(str(info[k]))}" for k in ("task", "split", "n_prompts", "samples",
                                                                     "temperature") if info.get(k) is not None)
        out.append(f"<h3>{html.escape(suite)}</h3><p class=note>{what}</p>"
                   f"<table><tr><th>model</th>{head}</tr>{''.join(body)}</table>")
    return "\n".join(out)


def _difference_tables(c: Collected) -> str:
    out = []
    for cand, base, diffs in c.differences:
        body = []
        for key, d in diffs.items():
            if not isinstance(d, dict):
                continue
            lo, hi = d.get("ci_low"), d.get("ci_high")
            sure = isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and (lo > 0 or hi < 0)
            body.append(f"<tr{' class=sig' if sure else ''}><td>{html.escape(key)}</td><td>{_fmt(d.get('diff'))}</td>"
                        f"<td>[{_fmt(lo)}, {_fmt(hi)}]</td></tr>")
        out.append(f"<h3>{html.escape(cand)} − {html.escape(base)}</h3><table><tr><th>metric</th><th>difference</th>"
                   f"<th>95% paired interval</th></tr>{''.join(body)}</table>")
    return "\n".join(out)


def _effects_table(c: Collected) -> str:
    body = []
    for e in c.effects:
        sure = e.get("verdict") in ("better", "worse")
        body.append(f"<tr{' class=sig' if sure else ''}><td>{html.escape(str(e.get('stage')))}</td>"
                    f"<td>{html.escape(str(e.get('reference')))}</td><td>{html.escape(str(e.get('suite')))}</td>"
                    f"<td>{_fmt(e.get('diff'))}</td><td>[{_fmt(e.get('ci_low'))}, {_fmt(e.get('ci_high'))}]</td>"
                    f"<td>{html.escape(str(e.get('verdict')))}</td></tr>")
    return ("<table><tr><th>stage</th><th>against</th><th>suite</th><th>Δ accuracy</th><th>95% paired interval</th>"
            f"<th>verdict</th></tr>{''.join(body)}</table>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}tr.sig td{background:#eef7ee}.note{color:#666}
figure{margin:1.5em 0}img{max-width:100%}"""


def render_html(c: Collected, title: str) -> str:
    figures, notes = [], list(c.notes)
    for fid, caption, make in FIGURES:
        try:
            result = make(c)
        except Exception as e:  # a figure that cannot be drawn is left out, with the reason, never a failed report
            log.exception("figure %s failed", fid)
            result = f"could not be drawn ({type(e).__name__}: {e})"
        if isinstance(result, str):
            notes.append(f"{caption}: omitted, {result}.")
            continue
        if fid in STEP_AXIS:
            caption += f" ({_order(c)})"
        figures.append(f'<figure id="fig-{fid}"><img alt="{html.escape(caption)}" src="{png_data_uri(result)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=note>models: {html.escape(', '.join(c.models) or 'none')}</p>"
            f"{''.join(figures)}"
            f"{'<h2>Effect of each stage (paired by prompt)</h2>' + _effects_table(c) if c.effects else ''}"
            f"<h2>Metrics</h2>{_suite_tables(c) or '<p>no evaluation results</p>'}"
            f"{'<h2>Differences (paired by prompt)</h2>' + _difference_tables(c) if c.differences else ''}"
            f"{'<h2>Notes</h2><ul id=notes>' + note_html + '</ul>' if notes else ''}"
            f"</body></html>")


def write_report(stages: Sequence[StageResult], path: str | Path, *, title: str = "posttrain evaluation") -> Path:
    """Write the report of `stages` (any names, any order) to `path`, one self-contained HTML file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(collect(stages), title), encoding="utf-8")
    return path


def write_evaluation_report(name: str, doc: dict, training_metrics: Mapping[str, str | Path], path: str | Path, *,
                            run_name: str = "", parents: Mapping[str, str] | None = None) -> Path:
    """The evaluate stage's report: the candidate `name` with its eval.json `doc` (baselines included), and the
    metrics.jsonl of every stage in `training_metrics`, whose order is the order the stages trained (the
    pipeline's lineage). The candidate keeps its place there, or comes after them: it is the last model trained.
    Titled by the pipeline run (`run_name`: "<spec name> <run id>"), or by the candidate for a stage run alone.
    `parents` (each stage → the model it started from) places a stage's curves after its own parent's, so two
    recipes from one start are not drawn as if one continued the other."""
    order = [*training_metrics, *([] if name in training_metrics else [name])]
    stages = [StageResult(s, eval=doc if s == name else None, metrics=training_metrics.get(s),
                          parent=(parents or {}).get(s)) for s in order]
    spec, _, run_id = run_name.strip().partition(" ")
    title = f"{spec} · run {run_id.strip()}" if run_id.strip() else spec or f"Evaluation of {name}"
    return write_report(stages, path, title=title)
