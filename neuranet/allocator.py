"""Process-wide allocator settings for processes that move many MiB-sized buffers (agents, server).

glibc serves every buffer above its mmap threshold with a fresh mmap and returns it on free, so a
process receiving 1 MiB frames page-faults each one in again: bench/links.py measured 550-800 minor
faults per MB and about half the receiver's CPU. Keeping such buffers on the heap removes that churn.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds; True when applied (Linux/glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # musl or another libc: leave the defaults
        return False
