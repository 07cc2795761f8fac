"""The `posttrain` command.

    posttrain demo [--out DIR] [--param N=V]       SFT vs PSFT from one start on the tiny model: posttrain run sft-psft
    posttrain stage NAME --config cfg.yaml         run one stage (same as python -m components.NAME)
    posttrain tiny-model OUT                       build the tiny model + tokenizer (safetensors) in OUT
    posttrain bench --size tiny --objectives LIST [--peers trl] --json
    posttrain models list|promote|rollback --name NAME   registry aliases (champion, challenger), with an audit trail
    posttrain stack up|down                        a local MLflow server whose artifacts go to S3 on loopback
    posttrain run SPEC [--out DIR]                 the whole DAG of a spec (a bundled name or a path) locally
    posttrain compile SPEC -o pipeline.yaml        KFP IR YAML for a cluster
    posttrain submit SPEC --host URL               upload the pipeline (or a new version) and start a run
    posttrain schedule SPEC --host URL --cron EXPR     the spec's recurring run (cron in UTC; max concurrency 1,
                                                   no catch-up); scheduling again replaces it
    posttrain schedules list|disable [ID] --host URL   the recurring runs; stop one
    posttrain runs list --host URL                 the latest runs
"""

from __future__ import annotations

import argparse
import logging
import sys

from components.stages import modules


def _stage(args) -> int:
    import importlib

    importlib.import_module(modules()[args.name]).main(args.rest + (["--debug"] if args.debug else []))
    return 0


def _tiny(args) -> int:
    from components.models import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return 0


def _bench(args) -> int:
    from pipelines.bench import main as bench_main

    return bench_main(args.rest)


def _models(args) -> int:
    from pipelines.models import main as models_main

    return models_main(args.rest)


def _serve(args) -> int:
    from pipelines.serve import main as serve_main

    return serve_main(args.rest)


def _stack(args) -> int:
    from pipelines.stack import main as stack_main

    return stack_main(args.rest)


def _user_errors(fn):
    """A bad spec, parameter or URI is the user's to fix: its message, not a traceback (exit status 2; the
    traceback with --debug)."""
    def wrapped(args) -> int:
        try:
            return fn(args)
        except ValueError as e:  # UserError, ConfigError and SpecError are ValueErrors
            if args.debug:
                raise
            print(f"posttrain {args.command}: {e}", file=sys.stderr)
            return 2
    return wrapped


def _run(args) -> int:
    """Exit status 0 when the run succeeded, 1 when a step failed, 2 for a user error (a bad spec or parameter, the
    state or output directory in use by another run), 128 + the signal's number when stopped (SIGTERM, Ctrl-C)."""
    from pipelines.local import RunStopped, run_local
    from pipelines.posttrain import parse_params
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    try:
        summary = run_local(spec, args.out, arguments=parse_params(spec, args.param), verbose=args.verbose)
    except RunStopped as e:  # its steps are stopped and its MLflow runs closed KILLED: the message says which
        print(f"posttrain run: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0 if summary["status"] == "succeeded" else 1


def _compile(args) -> int:
    from pipelines.posttrain import compile_spec

    print(compile_spec(args.spec, args.output))
    return 0


def _submit(args) -> int:
    import json

    from pipelines.kfp_client import schedule, submit
    from pipelines.posttrain import parse_params
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    params = parse_params(spec, args.param)
    if args.command == "submit":
        result = submit(spec, args.host, params=params, namespace=args.namespace)
    else:
        result = schedule(spec, args.host, cron=args.cron, max_concurrency=args.max_concurrency,
                          catchup=args.catchup, params=params, namespace=args.namespace)
    print(json.dumps(result, indent=2))
    return 0


def _schedules(args) -> int:
    from pipelines.kfp_client import disable_schedule, list_schedules

    if args.action == "disable":
        if not args.id:
            raise ValueError("disable needs the recurring run's id (posttrain schedules list shows it)")
        disable_schedule(args.host, args.id, namespace=args.namespace)
        print(f"{args.id}: disabled")
        return 0
    for r in list_schedules(args.host, experiment=args.experiment, namespace=args.namespace):
        print(f"{r['recurring_run_id']}  {r['status'] or '-':<9}  {r['cron'] + ' UTC':<20}  {r['name']}  "
              f"(version {r['pipeline_version_id'] or '-'}, service account {r['service_account'] or '-'})")
    return 0


def _runs(args) -> int:
    from pipelines.kfp_client import list_runs

    for r in list_runs(args.host, experiment=args.experiment, namespace=args.namespace, limit=args.limit):
        print(f"{r['run_id']}  {r['state'] or '-':<10}  {r['created_at']:<26}  {r['name']}")
    return 0


def _run_options(p: argparse.ArgumentParser) -> None:
    """The options of `posttrain run`, which `posttrain demo` shares (it is `posttrain run sft-psft`)."""
    p.add_argument("--out", default=None, help="where run_summary.json goes (default: .posttrain/<spec name>)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a pipeline parameter, e.g. psft_max_steps=100 (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print every step's output (always in <out>/run.log)")


def _local_commands(sub) -> None:
    """The commands that work on this machine alone."""
    d = sub.add_parser("demo", help="SFT and PSFT from one start on the tiny model, compared on held-out data "
                                    "(posttrain run sft-psft)")
    _run_options(d)
    d.set_defaults(fn=_user_errors(_run), spec="sft-psft")

    s = sub.add_parser("stage", help="run one stage by its package name: posttrain stage NAME --config cfg.yaml")
    s.add_argument("name", choices=sorted(modules()))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_stage)

    t = sub.add_parser("tiny-model", help="build the tiny demo model and tokenizer")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_tiny)

    b = sub.add_parser("bench", help="throughput and MFU of the objectives (posttrain bench --help)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)

    m = sub.add_parser("models", help="list | promote | rollback --name NAME (posttrain models --help)", add_help=False)
    m.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(fn=_models)

    v = sub.add_parser("serve", help="an OpenAI-compatible vLLM server for a registered model by alias "
                                     "(posttrain serve --help)", add_help=False)
    v.add_argument("rest", nargs=argparse.REMAINDER)
    v.set_defaults(fn=_serve)

    k = sub.add_parser("stack", help="up | down: a local MLflow server with S3 artifacts (posttrain stack --help)",
                       add_help=False)
    k.add_argument("rest", nargs=argparse.REMAINDER)
    k.set_defaults(fn=_stack)


def _workflow_commands(sub) -> None:
    """A spec's DAG: run it here or compile it."""
    r = sub.add_parser("run", help="run a spec's whole DAG here (kfp.local, MLflow in .posttrain/mlflow.db)")
    r.add_argument("spec", help="a bundled spec (demo, sft-psft, compare, cluster) or a path")
    _run_options(r)
    r.set_defaults(fn=_user_errors(_run))

    c = sub.add_parser("compile", help="compile a spec to KFP IR YAML")
    c.add_argument("spec", help="a bundled spec (demo, cluster) or a path")
    c.add_argument("-o", "--output", required=True, help="the YAML file to write")
    c.set_defaults(fn=_user_errors(_compile))


def _cluster_commands(sub) -> None:
    """A KFP host: submit, schedule, list."""
    for name, text in (("submit", "upload the pipeline (or a new version of it) to KFP and start a run"),
                       ("schedule", "upload the pipeline and make the spec's one recurring run (replaced when it "
                                    "exists) run that version")):
        u = sub.add_parser(name, help=text)
        u.add_argument("spec", help="a bundled spec or a path")
        u.add_argument("--host", required=True, help="the KFP API endpoint, e.g. https://kfp.example.com "
                                                     "(a bearer token, if needed: env POSTTRAIN_KFP_TOKEN)")
        u.add_argument("--namespace", default=None, help="the KFP namespace (multi-user deployments)")
        u.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a pipeline parameter for the run(s) (repeatable)")
        if name == "schedule":
            u.add_argument("--cron", default=None, help='6-field cron with seconds, in UTC, e.g. "0 0 3 * * 1" '
                                                        "(default: the spec's schedule)")
            u.add_argument("--max-concurrency", type=int, default=None, help="runs at once (default 1)")
            u.add_argument("--catchup", action=argparse.BooleanOptionalAction, default=None,
                           help="start the runs missed while paused (default: no)")
        u.set_defaults(fn=_user_errors(_submit))

    sl = sub.add_parser("schedules", help="list the recurring runs on a KFP host, or disable one")
    sl.add_argument("action", choices=["list", "disable"])
    sl.add_argument("id", nargs="?", default=None, help="disable: the recurring run's id")
    sl.add_argument("--host", required=True, help="the KFP API endpoint")
    sl.add_argument("--experiment", default=None, help="list: only this experiment's (e.g. the spec's name)")
    sl.add_argument("--namespace", default=None, help="the KFP namespace (multi-user deployments)")
    sl.set_defaults(fn=_user_errors(_schedules))

    rl = sub.add_parser("runs", help="list the latest runs on a KFP host")
    rl.add_argument("action", choices=["list"])
    rl.add_argument("--host", required=True, help="the KFP API endpoint")
    rl.add_argument("--experiment", default=None, help="only this experiment's runs")
    rl.add_argument("--namespace", default=None, help="the KFP namespace (multi-user deployments)")
    rl.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    rl.set_defaults(fn=_runs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training as a declarative workflow.")
    p.add_argument("--debug", action="store_true", help="a user error's traceback too, not only its message")
    sub = p.add_subparsers(dest="command", required=True)
    _local_commands(sub)
    _workflow_commands(sub)
    _cluster_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # they parse their own flags (REMAINDER takes no leading dash)
    if argv[:1] in (["bench"], ["models"], ["serve"], ["stack"]):
        argv = [argv[0], "--", *argv[1:]]
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
