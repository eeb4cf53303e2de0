"""`switchagg._compile.compile_once`: processes that start together compile a kernel once, say so,
and a warm cache is loaded silently. Also `switchagg warmup`, `--version` and `python -m switchagg`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

KERNEL = textwrap.dedent('''
    from numba import njit

    @njit(cache=True)
    def add_one(x):
        return x + 1
''')

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import tiny_kernel
    from switchagg._compile import compile_once
    compile_once("test kernel", lambda: tiny_kernel.add_one(1), [tiny_kernel.add_one])
    assert tiny_kernel.add_one(1) == 2
''')


def _env(tmp_path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("SWITCHAGG_QUIET_COMPILE", None)
    return env


def _start(tmp_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(180)
def test_processes_started_together_compile_once(tmp_path):
    (tmp_path / "tiny_kernel.py").write_text(KERNEL)
    procs = [_start(tmp_path) for _ in range(3)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err
        errs.append(err)
    text = "".join(errs)
    assert text.count("switchagg: compiling the test kernel") == 1, text
    assert text.count("switchagg: compiled the test kernel in") == 1, text
    # A warm cache: loaded without a word.
    again = _start(tmp_path)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0 and "switchagg:" not in err, err


def test_cold_dispatchers_reads_the_cache_index(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    from switchagg._compile import cold_dispatchers
    from switchagg.kernels import _numba
    names = cold_dispatchers(_numba.dispatchers(parallel=True))
    # Either compiled already (an index beside the source) or listed: never an error.
    assert isinstance(names, list)
    assert len(_numba.dispatchers(parallel=True)) > len(_numba.dispatchers(parallel=False))


@pytest.mark.timeout(300)
def test_warmup_command_version_and_python_m():
    env = dict(os.environ, PYTHONPATH=REPO)
    version = subprocess.run([sys.executable, "-m", "switchagg", "--version"], env=env,
                             capture_output=True, text=True, timeout=60)
    from switchagg import __version__
    assert version.returncode == 0 and version.stdout.strip() == f"switchagg {__version__}"
    warm = subprocess.run([sys.executable, "-m", "switchagg", "warmup", "--no-parallel"], env=env,
                          capture_output=True, text=True, timeout=280)
    assert warm.returncode == 0, warm.stderr
    assert "kernels ready" in warm.stdout and "switch dataplane" in warm.stdout
