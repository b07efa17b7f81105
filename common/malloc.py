"""glibc tuning for services that move multi-megabyte buffers on every request."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Have glibc keep freed frame buffers for reuse instead of giving them back to the kernel.

    Every 720p segment allocates several 2.7 MB arrays; by default glibc maps such blocks fresh
    and unmaps (or trims) them on free, so each segment page-faults ~2,000 zeroed pages back in,
    measured at ~9 ms of a ~25 ms green-tint job (bench/bench_green_tint.py); the node relays
    the same bodies. Elsewhere a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # the largest glibc accepts on 64-bit
    libc.mallopt(m_trim_threshold, 128 * 1024 * 1024)
