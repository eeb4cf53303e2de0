"""docker/compose.yaml as the tests see it: variables substituted, commands runnable without Docker.

What it owns: reading docker/.env, compose's variable interpolation (the subset the file uses, done
as compose does it), and turning a service's command into a local argv (its console script resolved
through pyproject.toml's [project.scripts] to this checkout's code, as `pip install .` does in the
image). What it must never do: edit the compose file or guess a value: a variable that neither .env
nor the overrides define is an error here, where compose would silently substitute "".

Used by tests/test_compose.py (parse and cross-check) and tests/test_netns.py (run the services).
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from typing import Any

import yaml

from tests.conftest import REPO

__all__ = ["COMPOSE_PATH", "ENV_PATH", "read_env", "interpolate", "load_compose", "variables_used",
           "console_scripts", "local_argv", "endpoint_host_port"]

COMPOSE_PATH = os.path.join(REPO, "docker", "compose.yaml")
ENV_PATH = os.path.join(REPO, "docker", ".env")

# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message},
# and bare $NAME: the forms of the compose specification's interpolation section.
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
                       r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def read_env(path: str = ENV_PATH) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped, quotes removed)."""
    values = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip()] = value
    return values


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Substitute variables in every string of `value` (nested lists and dicts), as compose does.

    Raises:
        KeyError: a variable without a default is not defined in `env`.
        ValueError: a ${NAME:?message} variable is unset or empty.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":?", "?"):
            if not present:
                raise ValueError(f"compose variable {name} is required: {arg}")
            return env[name]
        if name not in env:
            raise KeyError(f"compose variable {name} is not defined in docker/.env")
        return env[name]

    return _VARIABLE.sub(one, value)


def variables_used(value: Any) -> set[str]:
    """Names of the variables referenced anywhere in `value` (raw, before interpolation)."""
    if isinstance(value, dict):
        return set().union(*(variables_used(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables_used(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {m.group("braced") or m.group("bare") for m in _VARIABLE.finditer(value)
            if not m.group("escaped")}


def load_compose(overrides: dict[str, str] | None = None, *, raw: bool = False) -> dict[str, Any]:
    """The compose file, with .env's variables (then `overrides`) substituted unless `raw`."""
    with open(COMPOSE_PATH) as f:
        doc = yaml.safe_load(f)
    if raw:
        return doc
    return interpolate(doc, {**read_env(), **(overrides or {})})


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: command name -> "module:function"."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def local_argv(command: list[str]) -> list[str]:
    """The argv that runs a service's exec-form command with this checkout's code.

    The first word must be a console script of pyproject.toml (what the image installs); it becomes
    `python -c "import sys; from MODULE import FUNC; sys.exit(FUNC())"`, whose sys.argv[1:] are the
    command's arguments, exactly as the installed script would see them.

    Raises:
        KeyError: the command's program is not one of the project's console scripts.
    """
    scripts = console_scripts()
    if command[0] not in scripts:
        raise KeyError(f"{command[0]!r} is not a console script of pyproject.toml "
                       f"({', '.join(scripts)}); the image would not have it")
    module, func = scripts[command[0]].split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    return [sys.executable, "-c", code, *command[1:]]


def endpoint_host_port(endpoint: str) -> tuple[str, int]:
    """("host", port) of a tcp://HOST:PORT endpoint.

    Raises:
        ValueError: not a tcp endpoint with a numeric port.
    """
    m = re.fullmatch(r"tcp://([^:/]+):(\d+)", endpoint)
    if not m:
        raise ValueError(f"expected tcp://HOST:PORT, got {endpoint!r}")
    return m.group(1), int(m.group(2))
