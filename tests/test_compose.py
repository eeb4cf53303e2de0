"""docker/compose.yaml, docker/.env and the Dockerfiles agree with each other and with the real CLIs.

No Docker engine runs here, so every check is one the engine would otherwise make at `up` time:
the file is valid compose (Debian's `docker-compose config`, when installed), each service's command
parses with the parser of the program it names (switchagg.workers.cli / switch_emulator.cli, after .env's
variables are substituted), the worker's --switch points at the switch service's bound port, the
healthcheck runs a real command and answers for a live switch, --out lands on the mounted volume,
and the Dockerfiles copy what pyproject.toml packages. tests/test_netns.py then runs the commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import tomllib

import pytest
import zmq

from tests.composefile import (COMPOSE_PATH, console_scripts, endpoint_host_port, interpolate,
                               load_compose, local_argv, read_env, variables_used)
from tests.conftest import REPO, free_port


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    # switchagg.workers.cli's defaults come from torchrun's variables; the containers have none of them.
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SWITCHAGG_SWITCH"):
        monkeypatch.delenv(name, raising=False)


def _switch_args(command: list[str]):
    from switch_emulator.cli import build_parser
    return build_parser().parse_args(command[1:])


def _worker_args(command: list[str]):
    from switchagg.workers.cli import build_parser
    argv = command[1:]
    return build_parser(argv).parse_args(argv)


def _compose_env() -> dict[str, str]:
    """This process's environment without .env's names: compose would let the shell override them."""
    return {k: v for k, v in os.environ.items() if k not in read_env()}


def test_compose_has_a_switch_a_rendezvous_and_workers_built_from_the_images():
    doc = load_compose()
    assert set(doc["services"]) == {"switch", "rendezvous", "worker", "worker-gpu"}
    assert doc["services"]["worker-gpu"]["profiles"] == ["gpu"]  # only with --profile gpu
    assert doc["services"]["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for service in doc["services"].values():
        build = service["build"]
        context = os.path.normpath(os.path.join(os.path.dirname(COMPOSE_PATH), build["context"]))
        assert context == REPO
        assert os.path.isfile(os.path.join(context, build["dockerfile"]))
        assert isinstance(service["command"], list), "exec form: no shell between compose and argv"


def test_env_file_defines_every_variable_the_compose_file_uses():
    used = variables_used(load_compose(raw=True))
    assert used <= set(read_env()), f"not in docker/.env: {sorted(used - set(read_env()))}"
    assert {"WORLD_SIZE", "METHODS", "TASK"} <= used


def test_interpolation_follows_compose_rules():
    env = {"A": "1", "E": ""}
    assert interpolate("${A}-$A-$$A-${B:-x}-${E:-d}-${E-d}", env) == "1-1-$A-x-d-"
    with pytest.raises(KeyError):
        interpolate("${B}", env)
    with pytest.raises(ValueError, match="needed"):
        interpolate("${E:?needed}", env)


def test_docker_compose_config_accepts_the_file():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run tries); "
                    "the other tests here still check the file against the CLIs")
    check = subprocess.run([exe, "-f", COMPOSE_PATH, "config", "-q"], capture_output=True, text=True,
                           env=_compose_env(), timeout=60)
    assert check.returncode == 0, check.stderr
    # Its own interpolation of .env must give the very commands the other tests parse.
    resolved = subprocess.run([exe, "-f", COMPOSE_PATH, "config"], capture_output=True, text=True,
                              env=_compose_env(), timeout=60)
    assert resolved.returncode == 0, resolved.stderr
    import yaml
    theirs, ours = yaml.safe_load(resolved.stdout)["services"], load_compose()["services"]
    for name in ("switch", "worker"):
        assert theirs[name]["command"] == ours[name]["command"]
    assert theirs["switch"]["healthcheck"]["test"] == ours["switch"]["healthcheck"]["test"]
    assert theirs["worker"]["deploy"]["replicas"] == int(read_env()["WORLD_SIZE"])


def test_switch_command_parses_and_binds_every_interface_on_the_exposed_port():
    from switch_emulator.cli import config_from_args
    switch = load_compose()["services"]["switch"]
    command = switch["command"]
    assert console_scripts()[command[0]] == "switch_emulator.cli:main"
    config = config_from_args(_switch_args(command))  # validates every option
    host, port = endpoint_host_port(config.bind)
    # 0.0.0.0 inside the container: its address on the compose network (loopback would be unreachable).
    assert host == "0.0.0.0" and port == int(read_env()["SWITCH_PORT"])
    assert str(port) in [str(p) for p in switch["expose"]]


def test_worker_command_parses_and_points_at_the_switch_service():
    from switchagg.workers.worker import collective_kind, method_names, training_config
    doc = load_compose()
    worker = doc["services"]["worker"]
    command = worker["command"]
    assert console_scripts()[command[0]] == "switchagg.workers.cli:main"
    args = _worker_args(command)
    assert args.command == "worker"
    training_config(args)  # the training options form a valid config
    bind = _switch_args(doc["services"]["switch"]["command"]).bind
    # The service name is the switch's host name on the compose network.
    assert endpoint_host_port(args.switch) == ("switch", endpoint_host_port(bind)[1])
    # No per-container identity: the rendezvous hands out ranks, and the world size is .env's,
    # the same number of replicas compose starts.
    assert args.rank is None
    assert args.world_size == int(read_env()["WORLD_SIZE"]) == int(worker["deploy"]["replicas"])
    rendezvous = _worker_args(doc["services"]["rendezvous"]["command"])
    assert args.rendezvous == f"rendezvous:{rendezvous.port}"
    assert rendezvous.world_size == args.world_size
    # Every method, torch.distributed ones (sgd) included: the rendezvous gives them a group.
    names = method_names(args.methods)
    assert "sgd" in names and any(collective_kind(n) == "int" for n in names), names
    # Nothing waits for a health check (podman runs none without systemd).
    assert worker["depends_on"] == ["switch", "rendezvous"]
    gpu = _worker_args(doc["services"]["worker-gpu"]["command"])
    assert gpu.device == "cuda" and gpu.switch == args.switch and gpu.rendezvous == args.rendezvous


def test_worker_out_folder_is_the_mounted_volume():
    worker = load_compose()["services"]["worker"]
    args = _worker_args(worker["command"])
    targets = [v.split(":")[1] for v in worker["volumes"]]
    assert args.out in targets, (args.out, targets)


def test_healthcheck_runs_the_probe_against_the_bound_port():
    doc = load_compose()
    health = doc["services"]["switch"]["healthcheck"]
    test = health["test"]
    assert test[0] == "CMD", "exec form: the image has no shell wrapper to rely on"
    assert test[1] in console_scripts()
    probe_args = _switch_args(test[1:])
    bound_port = endpoint_host_port(_switch_args(doc["services"]["switch"]["command"]).bind)[1]
    assert endpoint_host_port(probe_args.probe) == ("127.0.0.1", bound_port)
    from switch_emulator.probe import PROBE_TIMEOUT_S
    assert float(health["timeout"].rstrip("s")) > PROBE_TIMEOUT_S


@pytest.mark.timeout(30)
def test_healthcheck_command_is_healthy_only_while_a_switch_answers():
    from switch_emulator._config import SwitchConfig
    from switch_emulator.server import SwitchServer
    port = free_port()
    # The very healthcheck command, with the port mapped to a free loopback one.
    test = load_compose({"SWITCH_PORT": str(port)})["services"]["switch"]["healthcheck"]["test"]
    argv = local_argv(test[1:])
    env = dict(os.environ, PYTHONPATH=REPO)
    down = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=20)
    assert down.returncode == 1 and "unhealthy" in down.stdout
    server = SwitchServer(SwitchConfig(bind=f"tcp://127.0.0.1:{port}", stats_interval=0))
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    try:
        up = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=20)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert up.returncode == 0 and "healthy (0 job(s))" in up.stdout, up.stdout + up.stderr


@pytest.mark.timeout(10)
def test_probe_rejects_a_peer_that_is_not_a_switch():
    from switch_emulator.probe import main
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer_garbage() -> None:
        if router.poll(5000):
            identity, *_ = router.recv_multipart()
            router.send_multipart([identity, b"C", b'{"type": "HEARTBEAT_ACK", "job_id": 1}'])

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        assert main(f"tcp://127.0.0.1:{port}", timeout=5) == 1
    finally:
        thread.join(timeout=5)
        router.close(linger=0)


def _copies(dockerfile: str) -> list[str]:
    with open(os.path.join(REPO, "docker", dockerfile)) as f:
        text = f.read()
    return [src for line in re.findall(r"^COPY\s+(.+)$", text, re.M) for src in line.split()[:-1]]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_what_pip_install_needs(dockerfile):
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    sources = _copies(dockerfile)
    for src in sources:
        assert os.path.exists(os.path.join(REPO, src)), f"{dockerfile}: COPY {src}: no such path"
    assert project["project"]["readme"] in sources and "pyproject.toml" in sources
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in sources, f"{dockerfile} does not copy package {pattern}"
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert not ignored & set(sources), "the build context would lack a copied path"
    with open(os.path.join(REPO, "docker", dockerfile)) as f:
        text = f.read()
    # torch pinned to the project's version and taken from a PyTorch index of the image's kind.
    assert re.search(r"pip install .*torch==2\.13\.0.* --index-url", text)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/", text, re.M)
    # Pinned bases and dependencies, a non-root user, the kernels compiled at build.
    base = re.search(r"^ARG (?:BASE|CUDA)_IMAGE=(\S+)", text, re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base), f"{dockerfile}: base {base} not pinned to a release"
    assert "constraints.txt" in text and re.search(r"^USER switchagg$", text, re.M)
    assert re.search(r"^RUN switchagg warmup", text, re.M)
    if dockerfile == "Dockerfile":
        assert "download.pytorch.org/whl/cpu" in text
    else:
        assert "'.[gpu]'" in text and any(d.startswith("cupy-cuda12x")
                                          for d in project["project"]["optional-dependencies"]["gpu"])
