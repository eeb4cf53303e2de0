"""Shared fixtures: free loopback ports, tracked ZeroMQ sockets, child processes that always die."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--reference", action="store_true",
                     help="run on the reference implementations: numpy kernels "
                          "(SWITCHAGG_CPU_KERNELS=numpy) and the golden switch dataplane "
                          "(SWITCHAGG_DATAPLANE=golden), in this process and every child")


def pytest_configure(config):
    # Set before anything picks a backend; children (switches, workers) inherit the environment.
    if config.getoption("--reference"):
        os.environ["SWITCHAGG_CPU_KERNELS"] = "numpy"
        os.environ["SWITCHAGG_DATAPLANE"] = "golden"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def spawn():
    """Start child processes (argv lists) that are killed at the end of the test, whatever happens."""
    children: list[subprocess.Popen] = []

    def start(argv: list[str], **kwargs) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update(kwargs.pop("env", {}))
        proc = subprocess.Popen(argv, env=env, start_new_session=True, **kwargs)
        children.append(proc)
        return proc

    yield start
    for proc in children:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


PYTHON = sys.executable


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid`, bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def switch_thread():
    """`start(**config) -> SwitchServer`: a bound switch serving in a thread of this process (its
    pipes, if any, are real processes). Defaults: a free loopback port, no periodic stats, no
    linger; `config` overrides them. Every switch started is stopped at the end of the test and
    must stop within 10 s."""
    import threading

    from switch_emulator._config import SwitchConfig
    from switch_emulator.server import SwitchServer
    started = []

    def start(**config) -> SwitchServer:
        config = {"bind": f"tcp://127.0.0.1:{free_port()}", "stats_interval": 0, "linger": 0.0,
                  **config}
        server = SwitchServer(SwitchConfig(**config))
        server.bind()
        stop = threading.Event()
        thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
        thread.start()
        started.append((thread, stop))
        return server

    yield start
    for thread, stop in started:
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "switch thread did not stop within 10 s"


@pytest.fixture
def ctx():
    """A ZeroMQ context for a test's raw sockets, destroyed (linger 0) at the end."""
    import zmq
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def run_clients(endpoint: str, job: str, n: int, body, config, **client_kw) -> tuple[list, list]:
    """Ranks 0..n-1 of `job`, each a `SwitchClient(..., config=config, **client_kw)` in a thread
    running `body(client, rank)`; returns (results by rank, [(rank, exception)]). Fails the
    test if a worker is still running after 60 s."""
    import threading

    from switchagg import SwitchClient
    results, errors = [None] * n, []

    def worker(rank: int) -> None:
        try:
            with SwitchClient(endpoint, job, n, rank=rank, config=config, **client_kw) as client:
                results[rank] = body(client, rank)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append((rank, exc))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return results, errors
