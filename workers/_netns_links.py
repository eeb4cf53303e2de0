"""Emulated links for `switchagg bench --link RATE`: a star of shaped veth pairs in network namespaces.

What it owns: building, entering and removing the small network a link run measures over. One
namespace per worker (`<tag>-w<r>`) and one for the switch (`<tag>-sw`); worker r's `eth0`
(10.213.r.2/24) is joined to the switch namespace's `w<r>` (10.213.r.1/24) by its own veth pair,
both ends carry jumbo frames (`MTU`) and are shaped to RATE with a token bucket (`tc qdisc ... tbf`: netem is not available on
these kernels, tbf is), so each worker has RATE up and RATE down, as with a NIC of that speed on a
switch port. The switch namespace forwards IP between its ports, so worker-to-worker traffic (gloo's
ring) crosses two shaped links, worker up and peer down, exactly the path a top-of-rack switch
gives it: the switch path and gloo run over the very same links.

What it must never do: touch the host's own network namespace (every interface is created inside
a namespace of the run, and deleting a namespace deletes its interfaces), leave anything behind
(`close` removes every namespace the run made, whatever state it reached; runs killed without a
chance to clean up are found by the pid in their tag and removed by the next run), or run without
root (it raises `LinkError` with what to do).

How it works: `ip netns add`, `ip link add ... type veth peer ... netns ...` (so neither end is ever
in the host namespace), addresses, routes and `tc qdisc add ... tbf rate RATE burst B latency L`,
all with a bounded `subprocess.run`. A child process joins a namespace with `enter(name)` (setns(2)
on /run/netns/<name>, before it opens any socket); the switch runs under `ip netns exec`.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

__all__ = ["MTU", "LinkError", "LinkNetwork", "check_can_build", "enter", "parse_rate", "remove_stale"]

#: Namespaces of this module are called `sagg<pid>x<n>-...`; the pid says whether the run lives.
_PREFIX = "sagg"
_SUBNET = "10.213"          # 10.213.r.0/24 per worker: private space, routed nowhere
#: Token bucket depth: at least 64 KiB (a GSO super-packet passes whole), or 4 ms at RATE.
_MIN_BURST_BYTES = 64 << 10
_BURST_SECONDS = 0.004
#: Longest a packet may wait in the bucket's queue. The veth pairs add no delay of their own, so
#: TCP needs little buffer; a deep one only adds queueing delay that every self-clocked window
#: (the switch client's slot pool, TCP's own) must cover.
_LATENCY = "20ms"
#: Per-namespace TCP settings, as on a data-center host: no return to slow start after an idle
#: moment (the pause between two timed all-reduces), for every contender alike.
_SYSCTLS = ("net.ipv4.tcp_slow_start_after_idle=0",)
#: Jumbo frames, as on the data-center networks in-network aggregation is built for: TCP/IP
#: headers then cost 1% of a link instead of 4% (with 1500), for every contender alike.
MTU = 9000
_CLONE_NEWNET = 0x40000000
_RUN_TIMEOUT = 15.0
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
_counter = iter(range(1 << 30))


class LinkError(RuntimeError):
    """The emulated network cannot be built here (not root, no `ip`/`tc`, a command failed)."""


def parse_rate(rate: str) -> float:
    """A tc rate (`500mbit`, `1gbit`, `100mbps`, ...; tc's SI units) in bits per second.

    Raises:
        ValueError: not a rate tc understands, or not positive.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*", rate or "")
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--link {rate!r} is not a rate; write it as tc does, e.g. 500mbit, "
                         f"1gbit or 100mbps (units: {', '.join(_UNITS)})")
    return float(m.group(1)) * _UNITS[unit]


def _run(*cmd: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise LinkError(f"`{' '.join(cmd)}` did not finish within {_RUN_TIMEOUT:.0f}s") from exc
    if done.returncode != 0:
        raise LinkError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


def _namespaces() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except OSError:
        return []


def check_can_build() -> None:
    """Raise `LinkError` saying what is missing if this process cannot build the network."""
    if os.geteuid() != 0:
        raise LinkError("--link needs root (it creates network namespaces and shapes their links "
                        "with tc); run it as root, e.g. with sudo, or drop --link")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LinkError(f"--link needs iproute2's `{tool}` command; install iproute2")


def remove_stale() -> list[str]:
    """Remove the namespaces of earlier runs whose process is gone; returns their names."""
    gone = []
    for name in _namespaces():
        m = re.match(rf"{_PREFIX}(\d+)x\d+-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_RUN_TIMEOUT)
            gone.append(name)
    return gone


def enter(name: str) -> None:
    """Move the calling thread (and the threads it starts later) into network namespace `name`.

    Call it first thing in a child process, before any socket or ZeroMQ context exists.

    Raises:
        LinkError: the namespace does not exist or setns failed.
    """
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    except OSError as exc:
        raise LinkError(f"network namespace {name!r} is not there: {exc}") from exc
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, os.CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise LinkError(f"setns({name}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class LinkNetwork:
    """Namespaces for `workers` workers and a switch, each worker on its own RATE link.

    Args:
        workers: number of worker namespaces (1..250).
        rate: tc rate of every link, each direction (e.g. "500mbit").

    Use as a context manager (or call `close`); the network exists between `__enter__` and exit.

    Raises:
        LinkError: not root, iproute2 missing, or a command failed (what was built is removed).
        ValueError: a bad rate or worker count.
    """

    def __init__(self, workers: int, rate: str) -> None:
        if not 1 <= workers <= 250:
            raise ValueError(f"--workers {workers}: emulated links serve 1 to 250 workers")
        self.workers, self.rate = workers, rate
        self.bits_per_s = parse_rate(rate)
        self.tag = f"{_PREFIX}{os.getpid()}x{next(_counter)}"
        self.switch_ns = f"{self.tag}-sw"
        self.made: list[str] = []

    def worker_ns(self, rank: int) -> str:
        return f"{self.tag}-w{rank}"

    def worker_ip(self, rank: int) -> str:
        return f"{_SUBNET}.{rank}.2"

    def gateway_ip(self, rank: int) -> str:
        """The switch namespace's address on worker `rank`'s link (where the worker reaches it)."""
        return f"{_SUBNET}.{rank}.1"

    def __enter__(self) -> LinkNetwork:
        check_can_build()
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        burst = max(_MIN_BURST_BYTES, int(self.bits_per_s / 8 * _BURST_SECONDS))
        tbf = ["tbf", "rate", self.rate, "burst", str(burst), "latency", _LATENCY]
        sw = self.switch_ns
        _run("ip", "netns", "add", sw)
        self.made.append(sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", sw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", *_SYSCTLS)
        for r in range(self.workers):
            ns, port = self.worker_ns(r), f"w{r}"
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_SYSCTLS)
            # Both ends are created inside namespaces: nothing ever appears in the host's.
            _run("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
            _run("ip", "-n", sw, "addr", "add", f"{self.gateway_ip(r)}/24", "dev", port)
            _run("ip", "-n", ns, "addr", "add", f"{self.worker_ip(r)}/24", "dev", "eth0")
            _run("ip", "-n", sw, "link", "set", port, "mtu", str(MTU), "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "mtu", str(MTU), "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.gateway_ip(r))
            # RATE each way: worker up (eth0's egress), worker down (the switch port's egress).
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf)
            _run("ip", "netns", "exec", sw, "tc", "qdisc", "add", "dev", port, "root", *tbf)

    def close(self) -> None:
        """Remove every namespace this network made (their interfaces go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_RUN_TIMEOUT)
        self.made.clear()

    def left_over(self) -> list[str]:
        """Namespaces of this network that still exist (empty after `close`)."""
        return [name for name in _namespaces() if name.startswith(self.tag + "-")]
