"""The switch's settings: one frozen dataclass, each option documented once.

What it owns: every knob of the `switch-emulator` process, its default, its unit and its valid range,
and the text that `switch-emulator --help` shows (the CLI builds its parser from these fields, so the
documentation cannot drift from the code). What it must never do: read the environment (but for
the dataplane's default, `DATAPLANE_ENV`, the one switch the tests use to run everything on the
golden model), open sockets or log anything but adjustments it made. How it works: each field carries `metadata` with `help`
(meaning and unit) and `example`; `validate()` (also run on construction, so a config that exists is
valid) raises `ConfigError` naming the field and the value, as SwitchML's `Config::Validate()` does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from switchagg.errors import ConfigError, ProtocolError
from switchagg.packet import DEFAULT_LANE_BITS, LANE_BITS, MAX_SLOTS
from switchagg.protocol import check_endpoint, check_name

__all__ = ["SwitchConfig", "ConfigError", "DATAPLANE_CHOICES", "DATAPLANE_ENV", "LOG_LEVELS",
           "MAX_POOL_SLOTS"]

#: `fast`: the vectorized dataplane (switch_emulator.dataplane); `golden`: the per-packet reference.
DATAPLANE_CHOICES = ("fast", "golden")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: The pool is host memory (2 x slots x k lanes per job, int32 at most), not SRAM; 1 Mi slots of
#: k = 64 would be 512 MiB if one job took it all, a sane ceiling for an emulator on one host.
MAX_POOL_SLOTS = 1 << 20


#: Which dataplane a switch runs unless told: SWITCHAGG_DATAPLANE picks it for a whole test run
#: (as SWITCHAGG_CPU_KERNELS picks the workers' kernels): `pytest --reference` sets both.
DATAPLANE_ENV = "SWITCHAGG_DATAPLANE"


def _opt(default: Any, help: str, example: str) -> Any:
    return field(default=default, metadata={"help": help, "example": example})


@dataclass(frozen=True)
class SwitchConfig:
    """Settings of one switch process (`switch-emulator --help` prints the same text)."""

    bind: str = _opt(
        "tcp://127.0.0.1:5555",
        "ZeroMQ endpoint the switch's ROUTER socket binds; tcp:// or ipc://. Loopback by default; on a "
        "cluster bind the interface the workers reach.",
        "tcp://10.0.0.5:5555, ipc:///tmp/switch.sock")
    slots: int = _opt(
        65536,
        "Total aggregation slots of the switch, shared by all jobs. Each job's JOIN asks for its own "
        "number of slots and is refused while the pool cannot hold it (a Tofino holds 8192 per job).",
        "65536")
    dataplane: str = _opt(
        os.environ.get(DATAPLANE_ENV, "fast"),
        "Aggregation engine: 'fast' (vectorized) or 'golden' (per-packet reference model, slow; for "
        "debugging the fast one).",
        "golden")
    liveness_timeout: float = _opt(
        3.0,
        "Seconds a joined worker may stay silent (no data, no heartbeat) before its job is aborted "
        "for everyone. Sent to workers in JOIN_OK.",
        "10")
    heartbeat_interval: float = _opt(
        0.5,
        "Seconds between a worker's heartbeats (sent to workers in JOIN_OK; must be below "
        "liveness_timeout).",
        "1.0")
    drop_ingress: float = _opt(
        0.0,
        "Probability that a data packet from a worker is dropped on its way into the switch.",
        "0.01")
    drop_egress: float = _opt(
        0.0,
        "Probability that a result packet is dropped on its way to each worker (drawn per worker).",
        "0.01")
    duplicate: float = _opt(
        0.0,
        "Probability that a packet is delivered twice (each direction).",
        "0.001")
    reorder: float = _opt(
        0.0,
        "Probability that a packet is held back and delivered at the head of the next burst of "
        "its flow, i.e. after the rest of its own burst (each direction).",
        "0.01")
    seed: int = _opt(
        0,
        "Seed of the loss-injection random generator (same seed and traffic: same losses).",
        "42")
    stats_interval: float = _opt(
        10.0,
        "Seconds between counter lines in the log (0 disables; counters are always logged at exit).",
        "60")
    log_level: str = _opt("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.", "DEBUG")
    hwm: int = _opt(
        100_000,
        "ZeroMQ send and receive high-water mark, in messages per peer. A result burst for a worker "
        "whose queue is full is dropped and counted (send_failures); the worker's retransmission "
        "recovers it.",
        "100000")
    linger: float = _opt(
        0.5,
        "Seconds the socket may spend at shutdown flushing the ABORTs to workers.",
        "1.0")
    token: str = _opt(
        "",
        "Switch token: every JOIN must carry it (workers' --token), and STATS shows every job only "
        "to its holders. Empty: anyone may create and join jobs (fine on loopback). Prefer "
        "--token-file on a shared host: a command line is visible to every user.",
        "s3cret-42")
    join_timeout: float = _opt(
        120.0,
        "Seconds a job may wait for all its ranks after its first JOIN; then it is aborted and "
        "its name and slots are free again (a squatter cannot hold them).",
        "300")
    max_job_slots: int = _opt(
        16384,
        "Most slots one job may ask for (twice a Tofino's 8192).",
        "8192")
    max_peer_slots: int = _opt(
        65536,
        "Most slots the live jobs created from one host (peer address) may hold together.",
        "32768")
    max_peer_jobs: int = _opt(
        64,
        "Most live jobs one host (peer address) may have created.",
        "16")
    peer_queue_bytes: int = _opt(
        64 << 20,
        "Bytes of results the switch may hold queued for one worker. Past it, results for that "
        "worker are dropped (it recovers them by retransmission); a worker over it for the "
        "liveness timeout does not read, and its job is aborted.",
        "16777216")
    curve_secret_file: str = _opt(
        "",
        "Turn on ZeroMQ CURVE (encryption and authentication): the switch's .key_secret file, "
        "written by `switch-emulator keygen DIR`; workers then need the public key (DIR/switch.key"
        ", their --switch-key).",
        "/etc/switchagg/switch.key_secret")
    pipes: int = _opt(
        1,
        "Dataplane processes, as a Tofino has several pipes: each owns a disjoint range of every "
        "job's slots and its own socket, workers stripe their chunks across them; joins, "
        "liveness and aborts stay with this process. 1 runs the dataplane in this process. "
        "Needs the fast dataplane and no loss injection. Each pipe runs the call-number check "
        "and the per-worker byte budget (--peer-queue-bytes); with --curve-secret-file its "
        "socket is a CURVE server with the same key, and it admits only connections that "
        "greet it with the key of a JOIN_OK (which --token guards).",
        "2")
    lane_bits: int = _opt(
        DEFAULT_LANE_BITS,
        "Lane width, in bits, of jobs whose JOIN names none: packets carry k lanes of 8, 16 or 32 "
        "bits (k * lane_bits / 8 payload bytes), added with two's-complement wrap-around at that "
        "width. A JOIN may name its own (workers' --lane-bits); every worker of a job must agree.",
        "8")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigError: a field is out of range; the message names the field, value and range.
        """
        def bad(name: str, why: str) -> ConfigError:
            value = getattr(self, name)
            return ConfigError(f"SwitchConfig.{name}={value!r}: {why}", field=name, value=value)

        try:
            check_endpoint(self.bind)
        except ValueError as exc:
            raise bad("bind", str(exc)) from None
        if not isinstance(self.slots, int) or not 1 <= self.slots <= MAX_POOL_SLOTS:
            raise bad("slots", f"expected an integer in [1, {MAX_POOL_SLOTS}] "
                               f"(one job may use at most {MAX_SLOTS})")
        if self.dataplane not in DATAPLANE_CHOICES:
            raise bad("dataplane", f"expected one of {DATAPLANE_CHOICES}")
        for name in ("liveness_timeout", "heartbeat_interval"):
            if not 0.001 <= getattr(self, name) <= 3600:
                raise bad(name, "expected seconds in [0.001, 3600]")
        if self.heartbeat_interval >= self.liveness_timeout:
            raise bad("heartbeat_interval", f"must be below liveness_timeout={self.liveness_timeout} "
                                            "(a live worker would be declared dead)")
        for name in ("drop_ingress", "drop_egress"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "expected a probability in [0, 1) (1 would drop everything)")
        for name in ("duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "expected a probability in [0, 1]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "expected a non-negative integer")
        if self.stats_interval < 0:
            raise bad("stats_interval", "expected seconds >= 0 (0 disables periodic stats)")
        if str(self.log_level).upper() not in LOG_LEVELS:
            raise bad("log_level", f"expected one of {LOG_LEVELS}")
        if not isinstance(self.hwm, int) or self.hwm < 1:
            raise bad("hwm", "expected a positive number of messages")
        if not 0.0 <= self.linger <= 60:
            raise bad("linger", "expected seconds in [0, 60]")
        try:
            check_name("SwitchConfig", "token", self.token)
        except ProtocolError as exc:
            raise bad("token", str(exc)) from None
        if not 0.001 <= self.join_timeout <= 86400:
            raise bad("join_timeout", "expected seconds in [0.001, 86400]")
        if not isinstance(self.max_job_slots, int) or not 1 <= self.max_job_slots <= MAX_SLOTS:
            raise bad("max_job_slots", f"expected an integer in [1, {MAX_SLOTS}]")
        for name in ("max_peer_slots", "max_peer_jobs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "expected a positive integer")
        if not isinstance(self.peer_queue_bytes, int) or self.peer_queue_bytes < 1 << 16:
            raise bad("peer_queue_bytes", "expected an integer >= 65536 bytes")
        if self.curve_secret_file and not os.path.isfile(self.curve_secret_file):
            raise bad("curve_secret_file", "no such file; write one with `switch-emulator "
                                           "keygen DIR`")
        if self.lane_bits not in LANE_BITS or isinstance(self.lane_bits, bool):
            raise bad("lane_bits", f"expected one of {LANE_BITS}")
        if not isinstance(self.pipes, int) or not 1 <= self.pipes <= 16:
            raise bad("pipes", "expected an integer in [1, 16]")
        if self.pipes > 1 and (self.loss_enabled or self.dataplane != "fast"
                               or self.bind.startswith("inproc://")):
            raise bad("pipes", "more than one pipe needs the fast dataplane, no loss injection "
                               "(--drop-*, --duplicate, --reorder) and a tcp:// or ipc:// bind")

    @property
    def loss_enabled(self) -> bool:
        """Whether any loss, duplication or reordering is injected."""
        return any((self.drop_ingress, self.drop_egress, self.duplicate, self.reorder))

    @classmethod
    def describe(cls, name: str) -> str:
        """Help text of one field: meaning and unit, default and an example (used by the CLI)."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f"{f.metadata['help']} Default: {f.default}. Example: {f.metadata['example']}."
