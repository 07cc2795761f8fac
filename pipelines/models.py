"""`posttrain models`: the registry's aliases by hand, through the same compare-and-set as the gate.

    posttrain models list --name NAME [--json]                       versions, aliases, eval metrics, audit trail
    posttrain models promote --name NAME [--version V] --reason TEXT  champion -> V (default: the challenger)
    posttrain models rollback --name NAME [--to V] --reason TEXT      champion -> the one it replaced (or V), and
                                                                      the InferenceService with it when served

Needs MLFLOW_TRACKING_URI (and, to roll a served model back, the Kubernetes API: components/kserve.py). Every move is
recorded (who, what, when, why, the previous champion) in the registered model's `posttrain.audit.*` tags; a move
that races another one fails with the conflict named.
"""

from __future__ import annotations

import argparse
import json
import sys

from components import promotion


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:  # what the `posttrain` CLI's REMAINDER passes through
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="posttrain models", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="versions, aliases, eval metrics and the audit trail")
    ls.add_argument("--name", required=True, help="registered model name")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr = sub.add_parser("promote", help="move champion to a version (default: the challenger)")
    pr.add_argument("--name", required=True)
    pr.add_argument("--version", default=None)
    pr.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    rb = sub.add_parser("rollback", help="move champion back to the version it replaced")
    rb.add_argument("--name", required=True)
    rb.add_argument("--to", default=None, help="roll back to this version instead")
    rb.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    args = p.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from components import tracking
    from components.kserve import DeployFailed

    if not tracking.enabled():
        print("posttrain models: set MLFLOW_TRACKING_URI to the MLflow server", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            info = promotion.listing(args.name)
            print(json.dumps(info, indent=2) if args.json else promotion.format_listing(info))
            return 0
        if args.action == "promote":
            record = promotion.promote(args.name, args.version, reason=args.reason)
        else:
            record = promotion.rollback(args.name, to=args.to, reason=args.reason)
    except (promotion.PromotionConflict, ValueError, MlflowException, DeployFailed) as e:
        print(f"posttrain models {args.action}: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: {promotion.CHAMPION} {promotion.version_label(record['previous'])} -> v{record['version']} "
          f"({record['action']})")
    if record.get("deployment"):
        served = record["deployment"]
        print(f"{args.name}: InferenceService {served['namespace']}/{served['service']} "
              f"{promotion.version_label(served['previous'])} -> v{served['version']} at {served['url']}")
    return 0
