"""The promotion gate: `champion` moves only to a better model, by compare-and-set, with an audit trail.

The rule (spec key `promotion`) compares the challenger with the current champion on the same eval
suite: the primary metric must improve (in its direction) by more than zero and by at least
`min_improvement`, and no guard metric may drop by more than its `max_drop`:

    {"metric": "arithmetic-id/accuracy", "direction": "max", "min_improvement": 0.0,
     "guards": [{"metric": "arithmetic-ood/accuracy", "max_drop": 0.02}]}

The challenger's numbers are the eval JSON's `metrics`; the champion's are its `baselines["champion"]`
(the evaluate stage scored the champion on the same prompts) when present, else the champion
version's `eval.<metric>` tags, written when it was registered. With no champion yet, the challenger
is compared in the same way with the base model (the eval's `baselines["base"]`, which the evaluate
stage scores): it must beat it by `min_improvement` with the guards applied (an eval without that
baseline is compared with nothing). `min_value`, when set, is an absolute floor of the primary metric
(a ceiling with direction min) that every promotion must clear. Each decision of the gate is written on
the version as the tag `posttrain.decision` (JSON {promoted, reason, at, via}).

Compare-and-set. The registry can move an alias but has no conditional write, so a move is done
under a mutex built from the one atomic operation it has: creating a registered model whose name is
taken fails (the name is the database's unique key). To move `champion` of NAME:

1. the gate reads the champion (version C) and compares;
2. it acquires the lock by creating the registered model `NAME.promotion-lock`, tagged with a fresh
   token, the holder and a lease expiry; while another holder has it, it waits (up to `wait_s`) and
   then gives up with PromotionConflict;
3. holding the lock it re-reads the champion: if it is no longer C, another move happened since the
   comparison, and it refuses with PromotionConflict (nothing is written);
4. it checks that the lock still carries its token (fencing: a holder whose lease ran out may have
   lost it), moves the alias, writes the audit record, and deletes the lock.

Two gates racing on one model therefore serialize: the first moves the champion, the second finds it
changed and reports the conflict. A holder that crashed leaves its lock behind; once the lease
(`lease_s`, default 120 s) has expired, the next contender renames it to
`NAME.promotion-lock.expired-<token>` (the name derived from the dead holder's token, so exactly one
contender can do this), which stays in the registry as a record, and takes the lock.

Every move (promote or rollback, by the gate or by hand) adds a registered-model tag
`posttrain.audit.<NNNNNN>` holding JSON {action, version, previous, by, at, reason, via} and sets on
the new champion version `posttrain.champion_since` and `posttrain.previous_champion`. A rollback
moves `champion` back to the version that the current champion replaced (or to `--to VERSION`) and, when the
model is served (the deploy stage's record, components/kserve.py), points its InferenceService at that version:
the trail records both moves.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
AUDIT_PREFIX = "posttrain.audit."
EVAL_TAG_PREFIX = "eval."
LOCK_SUFFIX = ".promotion-lock"
DIRECTIONS = ("max", "min")


class PromotionConflict(RuntimeError):
    """The champion changed since the comparison, or another promotion held the lock too long."""


# ----------------------------------------------------------------------------------------------------
# The rule and the decision

@dataclass(kw_only=True)
class Guard:
    metric: str
    """A metric that may not get worse by more than `max_drop` (e.g. OOD accuracy)."""
    max_drop: float = 0.0
    """Largest tolerated drop (in the metric's own units), ≥ 0."""
    direction: str = "max"
    """max: higher is better; min: lower is better."""


@dataclass(kw_only=True)
class PromotionRule:
    metric: str
    """The primary metric, `<suite>/<metric>` as in the eval JSON."""
    direction: str = "max"
    """max: higher is better; min: lower is better."""
    min_improvement: float = 0.0
    """The challenger must beat the champion by more than 0 and by at least this much."""
    guards: list[Guard] = field(default_factory=list)
    min_value: float | None = None
    """An absolute floor of the primary metric (a ceiling with direction min); None: no floor."""

    @classmethod
    def from_mapping(cls, data: dict, where: str = "promotion") -> PromotionRule:
        """Validate a rule from the spec; errors name the key path, the value and what is allowed."""
        def need(ok: bool, key: str, value, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{where}.{key}={value!r} is invalid: {allowed}")

        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping with keys metric, direction, min_improvement, guards")
        unknown = sorted(set(data) - {"metric", "direction", "min_improvement", "guards", "min_value"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: metric, direction, "
                             "min_improvement, guards, min_value")
        floor = data.get("min_value")
        need(floor is None or _number(floor), "min_value", floor, "a finite number, or null for no floor")
        need(isinstance(data.get("metric"), str) and data.get("metric"), "metric", data.get("metric"),
             "a metric name like arithmetic-id/accuracy")
        direction = data.get("direction", "max")
        need(direction in DIRECTIONS, "direction", direction, "max or min")
        mi = data.get("min_improvement", 0.0)
        need(_number(mi) and mi >= 0, "min_improvement", mi, "a number ≥ 0")
        guards_in = data.get("guards", []) or []
        need(isinstance(guards_in, list), "guards", guards_in, "a list of {metric, max_drop[, direction]}")
        guards = []
        for i, g in enumerate(guards_in):
            key = f"guards[{i}]"
            need(isinstance(g, dict) and not set(g) - {"metric", "max_drop", "direction"}, key, g,
                 "a mapping with keys metric, max_drop and optionally direction")
            need(isinstance(g.get("metric"), str) and g.get("metric"), f"{key}.metric", g.get("metric"),
                 "a metric name")
            drop = g.get("max_drop", 0.0)
            need(_number(drop) and drop >= 0, f"{key}.max_drop", drop, "a number ≥ 0")
            need(g.get("direction", "max") in DIRECTIONS, f"{key}.direction", g.get("direction"), "max or min")
            guards.append(Guard(metric=g["metric"], max_drop=float(drop), direction=g.get("direction", "max")))
        return cls(metric=data["metric"], direction=direction, min_improvement=float(mi), guards=guards,
                   min_value=None if floor is None else float(floor))

    def metrics(self) -> list[str]:
        return [self.metric, *(g.metric for g in self.guards)]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Decision:
    promote: bool
    reason: str


BASE = "base"
"""The eval baseline of the base model (components/evaluate): what a first challenger must beat."""


def decide(rule: PromotionRule, challenger: dict[str, float], champion: dict[str, float] | None,
           champion_label: str = "champion", base: dict[str, float] | None = None) -> Decision:
    """Apply `rule`; the reason names every number compared.

    The challenger must clear `rule.min_value`, then beat the champion, or with no champion the base model
    (`base`, the eval's baseline of it), by the rule; with neither to compare with, the floor alone decides.
    """
    missing = [m for m in rule.metrics() if m not in challenger]
    if missing:
        raise ValueError(f"the challenger's eval has no {', '.join(missing)}; it has: {', '.join(sorted(challenger))}")
    value = challenger[rule.metric]
    floor = ""
    if rule.min_value is not None:
        clears = value >= rule.min_value if rule.direction == "max" else value <= rule.min_value
        bound = "floor" if rule.direction == "max" else "ceiling"
        if not clears:
            return Decision(False, f"{rule.metric} {value:.4g} is {'below' if rule.direction == 'max' else 'above'} "
                                   f"the {bound} min_value {rule.min_value:g}")
        floor = f"; {rule.metric} {value:.4g} clears the {bound} {rule.min_value:g}"
    if champion is None:
        if base is None:
            return Decision(True, f"no {CHAMPION} yet and no base-model baseline in the eval; "
                                  f"{rule.metric}={value:.4g}{floor}")
        verdict = _compare(rule, challenger, base, "base model")
        return Decision(verdict.promote, f"no {CHAMPION} yet, compared with the base model: {verdict.reason}{floor}")
    verdict = _compare(rule, challenger, champion, champion_label)
    return Decision(verdict.promote, verdict.reason + floor)


def _compare(rule: PromotionRule, challenger: dict[str, float], champion: dict[str, float],
             champion_label: str) -> Decision:
    if rule.metric not in champion:
        return Decision(False, f"{champion_label} has no {rule.metric} to compare with; promote by hand if intended")

    def gain(metric: str, direction: str) -> float:
        return (challenger[metric] - champion[metric]) * (1 if direction == "max" else -1)

    g = gain(rule.metric, rule.direction)
    ok = g > 0 and g >= rule.min_improvement
    parts = [f"{rule.metric} {challenger[rule.metric]:.4g} vs {champion_label} {champion[rule.metric]:.4g} "
             f"({'+' if g >= 0 else ''}{g:.4g}; needs > 0 and ≥ {rule.min_improvement:g})"]
    for guard in rule.guards:
        if guard.metric not in champion:
            parts.append(f"guard {guard.metric}: {champion_label} has no value, not checked")
            continue
        drop = -gain(guard.metric, guard.direction)
        held = drop <= guard.max_drop
        ok = ok and held
        parts.append(f"guard {guard.metric} {challenger[guard.metric]:.4g} vs {champion[guard.metric]:.4g} "
                     f"(drop {drop:.4g} {'≤' if held else '>'} {guard.max_drop:g})")
    return Decision(ok, "; ".join(parts))


def read_eval(path: str | Path) -> dict:
    """The eval JSON: {"metrics": {name: number}, "baselines"?: {name: {metric: number}}, ...}, validated."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read eval JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{where}: field 'metrics' is missing; expected "
                         '{"metrics": {"<suite>/<metric>": number}}')
    for section, metrics in [("metrics", data["metrics"]), *(
            (f"baselines.{name}", m) for name, m in (data.get("baselines") or {}).items())]:
        if not isinstance(metrics, dict):
            raise ValueError(f"{where}: field '{section}' is {metrics!r}; expected a mapping of metric names "
                             "to numbers")
        for k, v in metrics.items():
            if not _number(v):
                raise ValueError(f"{where}: field '{section}.{k}' is {v!r}; expected a finite number")
    return data


# ----------------------------------------------------------------------------------------------------
# Registry reads

def _client(client=None):
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def _missing(e: Exception) -> bool:
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def alias_version(client, name: str, alias: str) -> str | None:
    """The version the alias points at, or None."""
    version = (client.get_registered_model(name).aliases or {}).get(alias)
    return None if version is None else str(version)


def eval_tag(metric: str) -> str:
    """The version tag holding an eval metric: MLflow refuses `@` in tag names, so pass@k is stored as pass_at_k."""
    return EVAL_TAG_PREFIX + metric.replace("@", "_at_")


def version_metrics(client, name: str, version: str) -> dict[str, float]:
    """The `eval.<metric>` tags of a version, as numbers, under the eval's own metric names."""
    return tag_metrics(client.get_model_version(name, version).tags)


def tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    return {k[len(EVAL_TAG_PREFIX):].replace("_at_", "@"): float(v) for k, v in tags.items()
            if k.startswith(EVAL_TAG_PREFIX)}


def audit_log(client, name: str) -> list[dict]:
    tags = client.get_registered_model(name).tags
    return [json.loads(tags[k]) for k in sorted(t for t in tags if t.startswith(AUDIT_PREFIX))]


def actor() -> str:
    """Who moves an alias: POSTTRAIN_ACTOR when set (a pipeline sets it), else user@host."""
    return os.environ.get("POSTTRAIN_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


# ----------------------------------------------------------------------------------------------------
# Compare-and-set

@contextlib.contextmanager
def promotion_lock(client, name: str, *, wait_s: float = 30.0, lease_s: float = 120.0) -> Iterator[str]:
    """Hold the mutex `NAME.promotion-lock` (see the module docstring); yields the lock's token."""
    from mlflow.exceptions import MlflowException

    lock, token, who = name + LOCK_SUFFIX, uuid.uuid4().hex, actor()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            tags = {"token": token, "holder": who, "expires": f"{time.time() + lease_s:.3f}",
                    "posttrain.lock_for": name}
            client.create_registered_model(lock, tags=tags, description=f"held while {CHAMPION} of {name} moves")
            break
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        held = _lock_tags(client, lock)
        if held and float(held.get("expires", "inf")) < time.time():
            with contextlib.suppress(MlflowException):  # only one contender can take this name
                client.rename_registered_model(lock, f"{lock}.expired-{held.get('token', 'unknown')}")
                log.warning("%s: broke the expired promotion lock of %s", name, held.get("holder"))
            continue
        if time.monotonic() > deadline:
            raise PromotionConflict(f"{name}: another promotion ({(held or {}).get('holder', 'unknown')}) held the "
                                    f"lock for more than {wait_s:.0f}s; nothing moved")
        time.sleep(random.uniform(0.05, 0.25))
    try:
        yield token
    finally:
        if (_lock_tags(client, lock) or {}).get("token") == token:
            client.delete_registered_model(lock)


def _lock_tags(client, lock: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock).tags
    except MlflowException as e:
        if _missing(e):
            return None
        raise


def move_champion(name: str, version: str, *, expected: str | None, action: str, reason: str, via: str,
                  client=None, lock_wait_s: float = 30.0) -> dict:
    """Point `champion` at `version` if it still points at `expected` (None: no champion); returns the audit record.

    Raises PromotionConflict when the champion changed since `expected` was read, or when another move held
    the lock for more than `lock_wait_s`.
    """
    client = _client(client)
    with promotion_lock(client, name, wait_s=lock_wait_s) as token:
        current = alias_version(client, name, CHAMPION)
        if current != expected:
            raise PromotionConflict(f"{name}: {CHAMPION} is now {version_label(current)}, not "
                                    f"{version_label(expected)} as when compared: another move happened in between; "
                                    "nothing moved")
        if (_lock_tags(client, name + LOCK_SUFFIX) or {}).get("token") != token:
            raise PromotionConflict(f"{name}: the promotion lock expired and was taken over; nothing moved")
        client.get_model_version(name, version)  # fails clearly for a version that does not exist
        record = {"action": action, "version": str(version), "previous": current, "by": actor(),
                  "at": datetime.now(UTC).isoformat(timespec="seconds"), "reason": reason[:2000], "via": via}
        client.set_registered_model_alias(name, CHAMPION, version)
        _append_audit(client, name, record)
        client.set_model_version_tag(name, version, "posttrain.champion_since", record["at"])
        client.set_model_version_tag(name, version, "posttrain.previous_champion", current or "")
    log.info("%s: %s %s -> %s (%s)", name, action, version_label(current), version_label(version), reason)
    return record


def version_label(version: str | None) -> str:
    return f"v{version}" if version else "none"


# ----------------------------------------------------------------------------------------------------
# The gate and the manual moves

def compare(client, name: str, rule: PromotionRule, evaluation: dict) -> tuple[str | None, Decision]:
    """(the champion version now, the rule's decision for the challenger whose eval is `evaluation`)."""
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return None, decide(rule, evaluation["metrics"], None, base=(evaluation.get("baselines") or {}).get(BASE))
    if CHAMPION in (evaluation.get("baselines") or {}):
        metrics, label = evaluation["baselines"][CHAMPION], f"{CHAMPION} v{champion} (eval baseline)"
    else:
        metrics, label = version_metrics(client, name, champion), f"{CHAMPION} v{champion} (tags)"
    return champion, decide(rule, evaluation["metrics"], metrics, label)


def promote_if_better(name: str, version: str, rule: PromotionRule, evaluation: dict, *, via: str,
                      client=None) -> Decision:
    """Compare version `version` (metrics from `evaluation`) with the champion; move `champion` when it wins.

    Raises PromotionConflict when the champion moved between the comparison and the move.
    """
    client = _client(client)
    if alias_version(client, name, CHAMPION) == str(version):
        return Decision(False, f"v{version} is already {CHAMPION}")
    champion, decision = compare(client, name, rule, evaluation)
    record_decision(client, name, version, decision, via)
    if decision.promote:
        move_champion(name, version, expected=champion, action="promote", reason=decision.reason, via=via,
                      client=client)
    else:
        log.info("%s: v%s stays %s: %s", name, version, CHALLENGER, decision.reason)
    return decision


DECISION_TAG = "posttrain.decision"


def record_decision(client, name: str, version: str, decision: Decision, via: str) -> None:
    """The gate's decision on a version, kept on it (tag posttrain.decision): whether it was to be promoted, and why."""
    record = {"promoted": decision.promote, "reason": decision.reason[:4000], "via": via,
              "at": datetime.now(UTC).isoformat(timespec="seconds")}
    client.set_model_version_tag(name, str(version), DECISION_TAG, json.dumps(record))


def promote(name: str, version: str | None = None, *, reason: str, client=None) -> dict:
    """Move `champion` by hand to `version` (default: the challenger), compare-and-set against the champion read now."""
    client = _client(client)
    target = version or alias_version(client, name, CHALLENGER)
    if target is None:
        raise ValueError(f"{name}: no version given and no {CHALLENGER} alias to promote")
    current = alias_version(client, name, CHAMPION)
    return move_champion(name, target, expected=current, action="promote", reason=reason,
                         via="posttrain models promote", client=client)


def rollback(name: str, *, to: str | None = None, reason: str, client=None, api_client=None) -> dict:
    """Move `champion` back to the version the current champion replaced (or to `to`), and when the model is served
    (the deploy stage's record, components/kserve.py) point its InferenceService at that version too; the audit
    trail gets a record of each move (`rollback`, then `rollback-deployment` or `rollback-deployment-failed`).
    `api_client`: the Kubernetes API client (default components.kserve.connect())."""
    client = _client(client)
    record = _rollback_alias(client, name, to, reason)
    deployment = redeploy_champion(client, name, record["version"], reason=reason, api_client=api_client)
    return {**record, "deployment": deployment} if deployment else record


def redeploy_champion(client, name: str, version: str, *, reason: str, api_client=None) -> dict | None:
    """Point the registered model's InferenceService at `version`, recording it in the audit trail; None when the
    model has no deployment. A failure is recorded too, then raised (kserve.DeployFailed, one line); a move of the
    champion meanwhile (kserve.Superseded) is raised and not recorded: that move has its own record."""
    from components import kserve

    if kserve.deployment_record(client, name) is None:
        return None
    via = "posttrain models rollback"
    entry = {"version": str(version), "by": actor(), "reason": reason[:2000], "via": via}
    try:
        deployed = kserve.redeploy(api_client if api_client is not None else kserve.connect(), client, name,
                                   str(version), via=via, guard=lambda: while_champion(client, name, str(version)))
    except kserve.Superseded as e:
        raise kserve.Superseded(f"{name}: its InferenceService was not pointed back to v{version}: {e}") from None
    except kserve.DeployFailed as e:
        _audit(client, name, {**entry, "action": "rollback-deployment-failed", "previous": None, "error": str(e)})
        raise kserve.DeployFailed(f"{name}: {CHAMPION} is v{version}, but its InferenceService was not pointed back: "
                                  f"{e}") from None
    _audit(client, name, {**entry, "action": "rollback-deployment", "previous": deployed["previous"],
                          "service": f"{deployed['namespace']}/{deployed['service']}", "url": deployed["url"]})
    return deployed


@contextlib.contextmanager
def while_champion(client, name: str, version: str) -> Iterator[None]:
    """Hold the promotion lock while `version` is the champion (no move can happen in the body); kserve.Superseded
    when it no longer is."""
    with promotion_lock(client, name):
        current = alias_version(client, name, CHAMPION)
        if current != str(version):
            from components.kserve import Superseded

            raise Superseded(f"{CHAMPION} is now {version_label(current)}, no longer v{version} (moved while the "
                             "InferenceService was written or rolled out); nothing recorded")
        yield


def _audit(client, name: str, record: dict) -> None:
    """Append a record to the audit trail, under the promotion lock (the trail's numbering is the lock's)."""
    with promotion_lock(client, name):
        _append_audit(client, name, {**record, "at": datetime.now(UTC).isoformat(timespec="seconds")})


def _append_audit(client, name: str, record: dict) -> None:
    """The next `posttrain.audit.NNNNNN` tag; the caller holds the promotion lock."""
    seq = len(audit_log(client, name)) + 1
    client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{seq:06d}", json.dumps(record))


def _rollback_alias(client, name: str, to: str | None, reason: str) -> dict:
    """Move `champion` back to the version the current one replaced (or to `to`); the audit record."""
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise ValueError(f"{name}: there is no {CHAMPION} to roll back")
    target = to
    if target is None:
        promoted = [r for r in audit_log(client, name) if r["action"] == "promote" and r["version"] == current]
        target = promoted[-1]["previous"] if promoted else None
        if target is None:
            raise ValueError(f"{name}: {CHAMPION} v{current} replaced no earlier champion; give --to VERSION")
    return move_champion(name, target, expected=current, action="rollback", reason=reason,
                         via="posttrain models rollback", client=client)


def listing(name: str, client=None) -> dict:
    """Versions (newest first) with their aliases and eval metrics, and the audit trail."""
    client = _client(client)
    model = client.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: -int(mv.version))
    return {"name": name, "aliases": {a: str(v) for a, v in (model.aliases or {}).items()},
            "versions": [{"version": mv.version, "aliases": sorted(by_version.get(mv.version, [])),
                          "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
                          .isoformat(timespec="seconds"),
                          "run_id": mv.run_id, "metrics": tag_metrics(mv.tags)}
                         for mv in versions],
            "audit": audit_log(client, name)}


def format_listing(info: dict) -> str:
    lines = [f"{info['name']}: " + ", ".join(f"{a} → v{v}" for a, v in sorted(info["aliases"].items()))]
    for v in info["versions"]:
        metrics = "  ".join(f"{k}={val:.4g}" for k, val in sorted(v["metrics"].items()))
        lines.append(f"  v{v['version']:<4} {','.join(v['aliases']) or '-':<22} {v['created']}  {metrics}")
    if info["audit"]:
        lines.append("audit:")
        lines += [f"  {r['at']}  {r['action']:<8} {version_label(r['previous'])} → {version_label(r['version'])}  "
                  f"by {r['by']} via {r['via']}: {r['reason']}" for r in info["audit"]]
    return "\n".join(lines)
