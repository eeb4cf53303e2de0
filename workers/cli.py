"""`switchagg`: the command line of a worker node (compare, bench, worker, report, warmup, rendezvous).

Each subcommand lives in its own module exposing `configure(parser)` and `main(args) -> int`; this
file only routes to them, importing the chosen one alone (so `switchagg bench` never loads torch
models, and `--help` is fast).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> (module of switchagg.workers, one-line help)
SUBCOMMANDS = {
    "compare": (".compare", "train with N workers through the switch, once per method, and compare"),
    "bench": (".bench", "packet-level throughput of the aggregation path (and quantize kernels)"),
    "reproduce": (".reproduce", "run the papers' claims at small scale and write a report"),
    "worker": (".worker", "run one worker (docker compose, torchrun, a cluster node)"),
    "report": (".report_cmd", "merge a compose or cluster run's per-rank files into the table, "
                              "results.json and plots"),
    "warmup": (".warmup_cmd", "compile the numba kernels ahead of time (once per machine)"),
    "rendezvous": (".rendezvous", "hold the ranks and torch.distributed store of a compose run's "
                                  "workers"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions' line breaks and adds "(default: X)" to every option that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from switchagg import __version__
    parser = argparse.ArgumentParser(prog="switchagg", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"switchagg {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=HelpFormatter)
        if name == chosen:
            importlib.import_module(module, __package__).configure(sp)
            # A subcommand's configure may set its own formatter (for its epilog); keep defaults.
            if sp.formatter_class is argparse.RawDescriptionHelpFormatter:
                sp.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    module = importlib.import_module(SUBCOMMANDS[args.command][0], __package__)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
