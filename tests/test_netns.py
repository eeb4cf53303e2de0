"""docker/compose.yaml's services, run as separate hosts in network namespaces (no Docker engine).

The test builds what compose would: one network namespace per container (the switch, and one per
worker), each with its own eth0 on a veth pair whose other end sits on a bridge in a fabric namespace
(compose's network), addresses from 192.0.2.0/24 (TEST-NET-1, RFC 5737: documentation only, routed
nowhere). Host names resolve as on the compose network: `ip netns exec` bind-mounts
/etc/netns/<namespace>/hosts over /etc/hosts, and that file maps the service name `switch` to the
switch's address (and `rendezvous` to the rendezvous'). So the services' commands run verbatim, as the containers would run them
(substituted from docker/.env, plus overrides for a short run); the one mapping is the volume: the
container path of `--out` becomes a temporary folder, as compose's bind mount does.

Nothing is created in the host's own network namespace (veth ends are created inside their
namespaces), and every process, namespace and hosts file is removed in a `finally`, even on failure.
It needs root and `ip`; it skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess

import pytest

from tests.composefile import load_compose, local_argv
from tests.conftest import REPO

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SUBNET = "192.0.2"          # TEST-NET-1
SWITCH_IP = f"{SUBNET}.1"
RENDEZVOUS_IP = f"{SUBNET}.2"
WORKERS = 2
#: A short run of digits: sgd through the rendezvous' store (torch.distributed), intsgd-random
#: through the switch.
OVERRIDES = {"WORLD_SIZE": str(WORKERS), "METHODS": "sgd,intsgd-random", "EPOCHS": "1",
             "MAX_STEPS": "5", "TIMEOUT": "30", "CONNECT_TIMEOUT": "30", "RUN_TIMEOUT": "90"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _skip_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    name = f"sagg-probe-{secrets.token_hex(4)}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    if not os.path.isfile("/etc/hosts"):
        return "no /etc/hosts to overlay with the namespace's host names"
    return None


class Fabric:
    """Namespaces joined by a bridge, torn down by `close()` whatever state they reached."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.bridge = f"{tag}-net"
        self.namespaces: list[str] = []
        self.hosts_dirs: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def add_host(self, name: str, address: str, hosts: dict[str, str]) -> str:
        """A namespace `<tag>-<name>` whose eth0 has `address`/24 on the bridge; returns its name."""
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        port = f"v{len(self.namespaces)}"
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
            "netns", self.bridge)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        folder = os.path.join("/etc/netns", ns)
        os.makedirs(folder)
        self.hosts_dirs.append(folder)
        with open(os.path.join(folder, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n")
            # As in a container, this host's own name resolves to its address (gloo binds there).
            f.write(f"{address} {socket.gethostname()}\n")
            f.writelines(f"{ip} {host}\n" for host, ip in hosts.items())
        return ns

    def open(self) -> None:
        _ip("netns", "add", self.bridge)
        self.namespaces.append(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")

    def run(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=REPO)
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SWITCHAGG_SWITCH"):
            env.pop(name, None)  # a container has none of the launcher's variables
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env, cwd=REPO,
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):  # deleting a namespace deletes its links and bridge
            _ip("netns", "del", ns, check=False)
        for folder in self.hosts_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rmdir("/etc/netns")  # only if no one else keeps files there
        except OSError:
            pass


@pytest.mark.timeout(120)
def test_compose_services_train_across_network_namespaces(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    services = load_compose(OVERRIDES)["services"]
    switch_cmd = local_argv(services["switch"]["command"])
    rendezvous_cmd = local_argv(services["rendezvous"]["command"])
    worker_cmd = services["worker"]["command"]
    # The volume: the container side of `RESULTS_DIR:/results` is this test's folder.
    container_out = worker_cmd[worker_cmd.index("--out") + 1]
    worker_cmd = local_argv([str(tmp_path) if a == container_out else a for a in worker_cmd])

    fabric = Fabric(f"sagg{os.getpid() % 100000}{secrets.token_hex(2)}")
    try:
        fabric.open()
        hosts = {"switch": SWITCH_IP, "rendezvous": RENDEZVOUS_IP}
        switch_ns = fabric.add_host("switch", SWITCH_IP, hosts)
        rendezvous_ns = fabric.add_host("rdv", RENDEZVOUS_IP, hosts)
        worker_ns = [fabric.add_host(f"w{i}", f"{SUBNET}.{10 + i}", hosts) for i in range(WORKERS)]
        # Every service at once, as compose starts them (nothing waits for a health check: the
        # workers probe the switch and retry the rendezvous themselves).
        with open(tmp_path / "switch.log", "w") as log:
            fabric.run(switch_ns, switch_cmd, stdout=log, stderr=subprocess.STDOUT)
        with open(tmp_path / "rendezvous.log", "w") as log:
            rendezvous = fabric.run(rendezvous_ns, rendezvous_cmd, stdout=log,
                                    stderr=subprocess.STDOUT)
        # The switch is reachable from the workers' namespaces only over the bridge.
        reach = subprocess.run(["ip", "netns", "exec", worker_ns[0], "ip", "route", "get", SWITCH_IP],
                               capture_output=True, text=True, timeout=10)
        assert "dev eth0" in reach.stdout, reach.stdout + reach.stderr

        logs = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
        workers = []
        for ns, path in zip(worker_ns, logs):
            with open(path, "w") as f:  # the child keeps its own copy of the descriptor
                workers.append(fabric.run(ns, worker_cmd, stdout=f, stderr=subprocess.STDOUT))
        for i, proc in enumerate(workers):
            proc.wait(timeout=90)
            assert proc.returncode == 0, (f"worker {i} exited {proc.returncode}:\n"
                                          f"{logs[i].read_text()[-3000:]}")
        # Every worker reported back: the rendezvous (compose's --exit-code-from) exits 0.
        assert rendezvous.wait(timeout=30) == 0, (tmp_path / "rendezvous.log").read_text()
    finally:
        fabric.close()
    listed = _ip("netns", "list").stdout
    assert fabric.tag not in listed, f"namespaces left behind: {listed}"
    assert not any(os.path.exists(d) for d in fabric.hosts_dirs)

    # Ranks came from the rendezvous (none was configured): one file per rank, no collision.
    for method in OVERRIDES["METHODS"].split(","):
        summaries = [json.loads((tmp_path / "summaries" / f"{method}.rank{r}.json").read_text())
                     for r in range(WORKERS)]
        assert sorted(s["rank"] for s in summaries) == list(range(WORKERS))
        assert all(s["steps"] == 5 for s in summaries)
        assert all((s["packets"] > 0) == (method != "sgd") for s in summaries)
        assert len({s["params_digest"] for s in summaries}) == 1, "replicas diverged"
        for r in range(WORKERS):
            assert (tmp_path / "metrics" / f"{method}.rank{r}.jsonl").stat().st_size > 0
