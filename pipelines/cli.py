"""The `posttrain` command.

    posttrain demo [--out DIR]                     SFT vs PSFT on the tiny model and the arithmetic task
    posttrain stage sft --config cfg.yaml          run one stage (same as python -m components.sft)
    posttrain tiny-model OUT                       build the tiny model + tokenizer (safetensors) in OUT
    posttrain bench --size tiny --objectives sft,psft [--peers trl] --json
"""

from __future__ import annotations

import argparse
import logging
import sys

STAGES = {"sft": "components.sft.main"}


def _demo(args) -> int:
    from pipelines.demo import DEMO_SPEC, run_demo

    run_demo(args.out, args.spec or DEMO_SPEC)
    return 0


def _stage(args) -> int:
    import importlib

    importlib.import_module(STAGES[args.name]).main(args.rest)
    return 0


def _tiny(args) -> int:
    from components.models import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return 0


def _bench(args) -> int:
    from pipelines.bench import main as bench_main

    return bench_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training as a declarative workflow.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train the tiny model with SFT and PSFT and compare them on held-out data")
    d.add_argument("--out", default=".posttrain/demo", help="output directory (default: .posttrain/demo)")
    d.add_argument("--spec", default=None, help="demo settings YAML (default: the bundled sft-psft-demo.yaml)")
    d.set_defaults(fn=_demo)

    s = sub.add_parser("stage", help="run one stage by name, e.g. posttrain stage sft --config cfg.yaml")
    s.add_argument("name", choices=sorted(STAGES))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_stage)

    t = sub.add_parser("tiny-model", help="build the tiny demo model and tokenizer")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_tiny)

    b = sub.add_parser("bench", help="throughput and MFU of the objectives (posttrain bench --help)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench parses its own flags (argparse.REMAINDER does not take leading dashes)
        argv = ["bench", "--", *argv[1:]]
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
