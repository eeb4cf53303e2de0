"""`switchagg worker` launched by torchrun (one node, two processes) against a switch on loopback.

torchrun gives each process RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the worker reads them as
its defaults, so the command line is the one README.md's "Real cluster" section shows, with
`--standalone` in place of a multi-node rendezvous. `sgd` exercises torch.distributed's rendezvous
(gloo, through torchrun's own store at MASTER_ADDR:MASTER_PORT), `intsgd-random` the switch with
the ranks torchrun chose. Both ranks must finish and hold identical parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.slow

METHODS = ("sgd", "intsgd-random")
STEPS = 3


def _wait_for_switch(endpoint: str, proc: subprocess.Popen, deadline: float) -> None:
    from switch_emulator.probe import probe
    from switchagg.errors import SwitchTimeout
    while True:
        try:
            probe(endpoint, timeout=1.0)
            return
        except SwitchTimeout:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"switch at {endpoint} did not answer (exit {proc.poll()})")


@pytest.mark.timeout(150)
def test_torchrun_launches_workers_that_train_through_the_switch(spawn, tcp_address, tmp_path):
    switch = spawn([PYTHON, "-m", "switch_emulator", "--bind", tcp_address, "--log-level", "WARNING"])
    _wait_for_switch(tcp_address, switch, time.monotonic() + 30)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SWITCHAGG_SWITCH")}
    # gloo would otherwise pick the interface the host name resolves to; keep it on loopback.
    env.update(PYTHONPATH=REPO, GLOO_SOCKET_IFNAME="lo")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "switchagg.workers.cli", "worker", "--switch", tcp_address, "--methods", ",".join(METHODS),
            "--max-steps", str(STEPS), "--opt", "hidden=(16,)", "--timeout", "60",
            "--out", str(tmp_path)]
    run = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=140,
                         start_new_session=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    for method in METHODS:
        summaries = [json.loads((tmp_path / "summaries" / f"{method}.rank{r}.json").read_text())
                     for r in (0, 1)]
        assert [s["rank"] for s in summaries] == [0, 1]
        assert all(s["steps"] == STEPS for s in summaries), method
        assert summaries[0]["params_digest"] == summaries[1]["params_digest"], method
        for r in (0, 1):
            steps = [json.loads(line) for line in
                     (tmp_path / "metrics" / f"{method}.rank{r}.jsonl").read_text().splitlines()]
            assert sum(rec["kind"] == "step" for rec in steps) == STEPS
    # sgd went through gloo (no packets), the integer method through the switch.
    sgd, intsgd = (json.loads((tmp_path / "summaries" / f"{m}.rank0.json").read_text())
                   for m in METHODS)
    assert sgd["packets"] == 0 and intsgd["packets"] > 0
