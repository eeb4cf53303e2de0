"""`switchagg`: the command line of a worker node (compare, bench, worker).

Each subcommand lives in its own module exposing `configure(parser)` and `main(args) -> int`; this
file only routes to them, importing the chosen one alone (so `switchagg bench` never loads torch
models, and `--help` is fast).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "compare": ("workers.compare", "train with N workers through the switch, once per method, and compare"),
    "bench": ("workers.bench", "packet-level throughput of the aggregation path (and quantize kernels)"),
    "reproduce": ("workers.reproduce", "run the papers' claims at small scale and write a report"),
    "worker": ("workers.worker", "run one worker (docker compose, torchrun, a cluster node)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchagg", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
