"""`switch_emulator._alloc`: malloc_trim gives back free heap pages that free() alone keeps.

In a fresh process (its allocator state is the point): free a 16 MiB block (glibc then raises
its mmap threshold, so later 1 MiB blocks come from the heap), allocate 160 blocks of 1 MiB and
free every other one (holes the heap cannot shrink over), then trim. Skipped off glibc.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess

import pytest

from conftest import PYTHON, REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

_SCRIPT = r"""
import ctypes, json
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
big = libc.malloc(16 << 20); libc.free(big)
blocks = []
for _ in range(160):
    p = libc.malloc(1 << 20); ctypes.memset(p, 1, 1 << 20); blocks.append(p)
for p in blocks[::2]:
    libc.free(p)
freed = rss()
from switch_emulator._alloc import malloc_trim
assert malloc_trim()
print(json.dumps({"freed": freed, "trimmed": rss()}))
"""


def test_malloc_trim_returns_the_pages_free_left_in_the_heap():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([PYTHON, "-c", _SCRIPT], capture_output=True, text=True, timeout=60,
                         check=True, env=env)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    print(rss)
    assert rss["freed"] - rss["trimmed"] > 50, rss   # 80 MiB of holes given back
