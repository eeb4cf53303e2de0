"""Packaging: the repository's folders install under two import names, `switchagg` (with
`workers/` as `switchagg.workers`) and `switch_emulator`, and nothing imports a top-level
`workers` (which would load a second copy of every harness module beside `switchagg.workers`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_the_package_list_names_every_package_folder_under_its_import_name():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"switchagg.workers": "workers"}
    found = set()
    for top, name in (("switchagg", "switchagg"), ("switch_emulator", "switch_emulator"),
                      ("workers", "switchagg.workers")):
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(folder, os.path.join(REPO, top))
                found.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    assert set(setuptools["packages"]) == found
    assert _pyproject()["project"]["scripts"]["switchagg"] == "switchagg.workers.cli:main"


def test_no_source_imports_a_top_level_workers_module():
    pattern = re.compile(r"^\s*(from|import)\s+workers\b|['\"]-m['\"],\s*['\"]workers\.", re.M)
    offenders = []
    for top in ("switchagg", "switch_emulator", "workers", "tests", "docker"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh", ".yaml")) or name.startswith("Dockerfile"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        if pattern.search(f.read()):
                            offenders.append(os.path.relpath(path, REPO))
    assert not offenders, f"import switchagg.workers instead of workers in {offenders}"


def test_the_installed_names_import_and_report_the_version():
    code = ("import switchagg, switchagg.workers.cli, switch_emulator; "
            "from switchagg import compare; print(switchagg.__version__, compare.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [switchagg_version(), "switchagg.workers.api"]


def switchagg_version() -> str:
    return _pyproject()["project"]["version"]
