"""CPU training: keep freed activation buffers in the process instead of giving them back to the OS.

glibc serves a block above its mmap threshold (128 KiB at start, raised dynamically up to 32 MiB) with
its own mmap and unmaps it on free, and trims the top of the heap beyond 128 KiB. A training step
frees and re-allocates the same activation buffers every step, so by default each step page-faults
them in again (docs/performance.md has the measurement). Raising both thresholds makes glibc reuse
the blocks.

mallopt() changes this process from now on (the trainer calls it before it builds anything large).
The same settings are put into the environment as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_,
which glibc reads when a process starts, so processes started from here (spawned DataLoader workers,
compile workers) get them too; forked children inherit the settings with the heap. A value the user
already set in the environment is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the heap top


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None  # musl, macOS, Windows: different allocators, nothing to tune here
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc(environ=os.environ) -> bool:
    """Apply the thresholds (glibc only); True if glibc accepted them. Never raises."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    mmap = _int(environ.get("MALLOC_MMAP_THRESHOLD_"), MMAP_THRESHOLD)
    trim = _int(environ.get("MALLOC_TRIM_THRESHOLD_"), TRIM_THRESHOLD)
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    if ok:
        environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(mmap))
        environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(trim))
    return ok


def _int(text, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default  # glibc ignores a malformed value too
