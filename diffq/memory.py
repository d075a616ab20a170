"""The process's memory: handing freed memory back to the system, and how much the system has free."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    """Ask glibc to hand freed memory back to the system (best effort; elsewhere a no-op). Without it
    the allocator keeps freed float weights for reuse and the process's peak grows by about a third."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_memory() -> int | None:
    """Bytes the system can give this process now: ``MemAvailable``, or less under a cgroup limit
    (``None`` where neither can be read)."""
    available = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available
