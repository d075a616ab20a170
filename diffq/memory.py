"""The process's memory: handing freed memory back to the system, and how much the system has free."""

from __future__ import annotations

import bisect
import ctypes
import functools
import mmap
from collections.abc import Callable, Iterable

import torch

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (file pages are read again if touched)


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


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):  # not glibc
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (``/proc/self/maps``), sorted."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return sorted(ranges)


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Take the pages of file-mapped CPU tensors that are no longer needed (a checkpoint's float
    weights, read through a memory map, once quantized) out of the process's resident memory.

    ``madvise(MADV_PAGEOUT)`` on the whole pages inside each contiguous tensor that lies in a
    file-backed mapping: nothing is lost, a page touched again is read from the file again. Tensors
    in anonymous memory are left alone. Returns the bytes advised; best effort (Linux >= 5.4,
    elsewhere 0).
    """
    madvise = _madvise()
    page = mmap.PAGESIZE
    spans = []
    for t in tensors:
        if t.device.type == "cpu" and t.is_contiguous() and t.numel():
            start = t.data_ptr()
            lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
            if hi > lo:
                spans.append((lo, hi))
    if madvise is None or not spans:
        return 0
    maps = _file_mappings()
    starts = [start for start, _ in maps]
    released = 0
    for lo, hi in spans:
        i = bisect.bisect_right(starts, lo) - 1
        if i >= 0 and hi <= maps[i][1] and madvise(lo, hi - lo, _MADV_PAGEOUT) == 0:
            released += hi - lo
    return released


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
