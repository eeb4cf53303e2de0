"""`switch-emulator`: run the emulated switch until SIGINT or SIGTERM.

The options are the fields of `SwitchConfig` (their help text is the fields' documentation), plus
`--drop P`, shorthand for `--drop-ingress P --drop-egress P`, and `--probe ENDPOINT`, which runs no
switch but asks one for its counters (switch_emulator/probe.py: a healthcheck). On SIGINT/SIGTERM
every worker of every job gets ABORT("switch shutting down"), the counters are logged, and the
process exits 0; it exits 2 on a bad option or an endpoint it cannot bind.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

import zmq

from switch_emulator._config import DATAPLANE_CHOICES, LOG_LEVELS, ConfigError, SwitchConfig
from switchagg.packet import LANE_BITS

__all__ = ["build_parser", "config_from_args", "main"]

log = logging.getLogger("switch_emulator")

_EPILOG = """\
examples:
  switch-emulator                                        # loopback, port 5555
  switch-emulator --bind tcp://10.0.0.5:5555 --slots 16384
  switch-emulator --drop 0.01 --reorder 0.001 --seed 7    # exercise the workers' recovery paths
  switch-emulator --probe tcp://127.0.0.1:5555             # healthcheck: exit 0 if a switch answers
  switch-emulator keygen /etc/switchagg                    # CURVE keys: switch.key, switch.key_secret
  switch-emulator --bind tcp://10.0.0.5:5555 --token-file /etc/switchagg/token \\
      --curve-secret-file /etc/switchagg/switch.key_secret   # a shared cluster node
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one option per `SwitchConfig` field."""
    parser = argparse.ArgumentParser(
        prog="switch-emulator", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Emulated SwitchML-style aggregation switch: workers JOIN a job, stream "
                    "packets of 8, 16 or 32-bit integer lanes, and receive the per-slot sums.", epilog=_EPILOG)
    for f in dataclasses.fields(SwitchConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(default=None, help=SwitchConfig.describe(f.name), dest=f.name)
        if f.name == "dataplane":
            kwargs["choices"] = DATAPLANE_CHOICES
        elif f.name == "lane_bits":
            kwargs.update(choices=LANE_BITS, type=int, metavar="{8,16,32}")
        elif f.name == "log_level":
            kwargs["choices"] = LOG_LEVELS
            kwargs["type"] = str.upper
        else:
            kwargs["type"] = type(f.default)
            kwargs["metavar"] = {int: "N", float: "X", str: "ENDPOINT"}[type(f.default)]
            if f.name in ("token", "curve_secret_file"):
                kwargs["metavar"] = "TOKEN" if f.name == "token" else "PATH"
        parser.add_argument(flag, **kwargs)
        if f.name == "drop_egress":
            parser.add_argument("--drop", type=float, default=None, metavar="P",
                                help="Shorthand: set both --drop-ingress and --drop-egress to P "
                                     "(the specific options win).")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="Read the switch token from this file (stripped); wins over --token.")
    parser.add_argument("--switch-key", default=None, metavar="KEY",
                        help="With --probe: the switch's CURVE public key (z85) or its .key file.")
    parser.add_argument("--probe", default=None, metavar="ENDPOINT",
                        help="Do not run a switch: ask the one at ENDPOINT for its counters and exit "
                             "0 if it answers within 2 s, else 1 (a container healthcheck).")
    return parser


def config_from_args(args: argparse.Namespace) -> SwitchConfig:
    """Build the config from parsed options (unset ones keep their defaults).

    Raises:
        ConfigError: an option is out of range.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SwitchConfig)
              if getattr(args, f.name) is not None}
    if args.drop is not None:
        values.setdefault("drop_ingress", args.drop)
        values.setdefault("drop_egress", args.drop)
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="ascii") as f:
                values["token"] = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file: {exc}", field="token_file",
                              value=args.token_file) from None
    return SwitchConfig(**values)


def keygen_main(argv: list[str]) -> int:
    """`switch-emulator keygen DIR`: write DIR/switch.key (public) and DIR/switch.key_secret."""
    parser = argparse.ArgumentParser(
        prog="switch-emulator keygen",
        description="Write a CURVE key pair for the switch: DIR/switch.key (public: give it to "
                    "the workers, --switch-key) and DIR/switch.key_secret (mode 0600: pass it to "
                    "the switch, --curve-secret-file).")
    parser.add_argument("directory", metavar="DIR")
    args = parser.parse_args(argv)
    from switch_emulator._keys import keygen
    try:
        public, secret = keygen(args.directory)
    except (OSError, RuntimeError) as exc:
        print(f"switch-emulator keygen: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the switch; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe is not None:
        from switch_emulator import probe
        return probe.main(args.probe, server_key=args.switch_key)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(f"--{exc.field.replace('_', '-')}: {exc}")
    logging.basicConfig(level=getattr(logging, config.log_level),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from switch_emulator._alloc import start_trimming
    from switch_emulator._memtrace import start_from_env
    from switch_emulator.server import SwitchServer  # after logging is set, so binding is logged

    if start_from_env():  # SWITCHAGG_TRACEMALLOC=PATH: a soak's memory figures (slow)
        log.warning("tracing memory allocations (SWITCHAGG_TRACEMALLOC): slower than usual")
    start_trimming()  # freed buffers go back to the system (switch_emulator/_alloc.py)

    server = SwitchServer(config)
    try:
        server.bind()
    except zmq.ZMQError as exc:
        log.error("cannot bind %s: %s (is another switch running there?)", config.bind, exc)
        server.context.term()
        return 2
    except (ValueError, RuntimeError) as exc:  # an unusable CURVE key file, or a pipe did not start
        log.error("cannot start the switch: %s", exc)
        server.context.term()
        return 2
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return server.run(stop)


if __name__ == "__main__":
    sys.exit(main())
