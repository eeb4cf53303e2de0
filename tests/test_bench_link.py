"""`switchagg bench --link RATE`: the emulated network is built as described, and always removed.

No figure is asserted (the link's speed is what the run measures, and the machine is shared);
the tests check the options, the network's shape (a tbf on both ends of each worker's veth pair,
nothing in the host namespace) and that nothing is left behind on success, failure and Ctrl-C.
Building namespaces needs root and iproute2; those tests skip with the reason elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import PYTHON
from switchagg.workers import bench
from switchagg.workers._netns_links import LinkError, LinkNetwork, parse_rate

CAN_BUILD = os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")
needs_netns = pytest.mark.skipif(not CAN_BUILD, reason="needs root, ip and tc (network "
                                                       "namespaces)")


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    return parser.parse_args(list(flags))


def _ours(pid: int) -> list[str]:
    """Namespaces left by the bench process `pid` (named sagg<pid>x<n>-...)."""
    try:
        return [n for n in os.listdir("/run/netns") if n.startswith(f"sagg{pid}x")]
    except OSError:
        return []


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.mark.parametrize("rate, bits", [("500mbit", 5e8), ("1gbit", 1e9), ("1.5Mbit", 1.5e6),
                                        ("100mbps", 8e8), ("64kbit", 64e3)])
def test_parse_rate_reads_tc_units(rate, bits):
    assert parse_rate(rate) == bits


@pytest.mark.parametrize("rate", ["", "fast", "500", "0mbit", "-1mbit", "500 furlongs"])
def test_parse_rate_rejects_what_tc_would_not_take(rate):
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(rate)


def test_link_needs_root_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert bench.main(_args("--link", "500mbit")) == 2
    assert "--link needs root" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 17])
def test_link_worker_count_is_bounded(workers, capsys):
    assert bench.main(_args("--link", "500mbit", "--workers", str(workers))) == 2
    assert "2 to 16 workers" in capsys.readouterr().err


@needs_netns
def test_link_network_shapes_both_ends_and_leaves_nothing():
    before = _host_links()
    with pytest.raises(RuntimeError, match="on purpose"):
        with LinkNetwork(2, "100mbit") as net:
            assert sorted(net.left_over()) == sorted([net.switch_ns, net.worker_ns(0),
                                                      net.worker_ns(1)])
            for ns, dev in ((net.worker_ns(1), "eth0"), (net.switch_ns, "w1")):
                shown = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev",
                                        dev], capture_output=True, text=True).stdout
                assert "tbf" in shown and "rate 100Mbit" in shown, shown
            addr = subprocess.run(["ip", "-n", net.worker_ns(1), "-o", "addr", "show", "eth0"],
                                  capture_output=True, text=True).stdout
            assert net.worker_ip(1) in addr
            assert _host_links() == before  # nothing was created in the host's namespace
            raise RuntimeError("on purpose")  # a failure mid-run
    assert net.left_over() == []
    assert _host_links() == before


@needs_netns
def test_link_error_names_the_failing_command(monkeypatch):
    net = LinkNetwork(2, "100mbit")
    monkeypatch.setattr(net, "rate", "100furlongs")  # tc refuses it, after namespaces exist
    with pytest.raises(LinkError, match="tc"):
        net.__enter__()
    assert net.left_over() == []


@needs_netns
@pytest.mark.slow
@pytest.mark.netns
def test_bench_link_end_to_end_reports_the_link_limit(spawn):
    proc = spawn([PYTHON, "-m", "switchagg.workers.cli", "--log-level", "WARNING", "bench", "--link",
                  "200mbit", "--workers", "2", "--numel", "20000", "--slots", "64", "--burst",
                  "16", "--repeats", "1", "--warmup", "1", "--timeout", "60", "--json"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    figures = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert figures["link"] == "200mbit" and figures["transport"] == "tcp"
    assert figures["link_limit_ate_per_s"] == pytest.approx(200e6 / 32)
    for key in ("ate_per_s", "gloo_ate_per_s", "zmq_ceiling_ate_per_s", "ate_vs_link_limit",
                "gloo_vs_link_limit", "switch_startup_s"):
        assert figures[key] > 0, key
    assert _ours(proc.pid) == []


@needs_netns
@pytest.mark.slow
@pytest.mark.netns
def test_bench_link_ctrl_c_removes_everything(spawn):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-run: exit 130,
    every namespace removed, no child left."""
    proc = spawn([PYTHON, "-m", "switchagg.workers.cli", "bench", "--link", "10mbit", "--workers", "2",
                  "--numel", "2000000", "--repeats", "50", "--skip-zmq", "--skip-gloo"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(_ours(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_ours(proc.pid)) == 3, "the network was never built"
    time.sleep(3)  # the switch and workers are running by now (a 10mbit round takes seconds)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _ours(proc.pid) == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.1)
    assert not _group_alive(proc.pid)


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    alive.append(int(entry))
            except ProcessLookupError:
                pass
    return alive
