"""Give freed memory back to the system: a periodic `malloc_trim` in the switch's processes.

What it owns: one daemon thread per switch process (the main one and each dataplane pipe) that
calls glibc's `malloc_trim(0)` every `TRIM_INTERVAL_S`. What it must never do: touch the
switch's state, or change how memory is allocated (the hot path keeps glibc's defaults).

Why: the switch allocates and frees large buffers all the time: libzmq's received messages (a
burst is up to 16 MiB), result buffers, and a slot pool per job (2 x slots x k int32, up to
8 MiB, for every JOIN, including a rogue's that are abandoned seconds later). glibc raises its
mmap threshold to the size of the largest block freed (up to 32 MiB), so such buffers then come
from the heap arenas (one per thread that allocates: the loop, libzmq's I/O thread, pyzmq's
garbage thread) and their pages stay with the process after `free`, scattered between live
blocks where the heap cannot shrink. A 10-minute soak against a rogue peer (tests/soak_rogue.py)
saw the RSS climb to 909 MiB while Python and numpy held under 100 MiB (SWITCHAGG_TRACEMALLOC,
`_memtrace`): retained free pages, not a leak. `malloc_trim(0)` returns every whole free page of
every arena (madvise), costs milliseconds, and needs no change to the allocation path; fixing
the mmap threshold instead would also bound it but page-faults every large buffer on every
burst. Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

__all__ = ["TRIM_INTERVAL_S", "malloc_trim", "start_trimming"]

log = logging.getLogger("switch_emulator.alloc")

#: Seconds between two trims: the RSS above what is live is at most what was freed meanwhile.
TRIM_INTERVAL_S = 2.0

_libc = None


def malloc_trim() -> bool:
    """Return free heap pages to the system now; False where libc has no malloc_trim."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)  # ctypes releases the GIL meanwhile: the loop goes on
    return True


def start_trimming(interval: float = TRIM_INTERVAL_S) -> bool:
    """Trim every `interval` seconds in a daemon thread; False (and no thread) without glibc."""
    if not malloc_trim():
        log.debug("no malloc_trim in this libc: freed memory is returned as the allocator sees fit")
        return False

    def loop() -> None:
        while True:
            time.sleep(interval)
            malloc_trim()

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()
    return True
