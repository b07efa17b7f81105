"""Memory tuning for services that move multi-megabyte buffers and allocate thousands of small
objects on every request: glibc's allocator and Python's cycle collector."""

from __future__ import annotations

import ctypes
import gc


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


def collect_cycles_less_often() -> None:
    """Run Python's cycle collector a fraction as often, and never over what start-up made.

    At the default threshold (700 new objects) a request served or relayed in Python triggers a
    young collection every request or two, and each full one walks every module, class and
    route made at start-up. ``gc.freeze()`` after start-up sets those aside for good; collections
    come after 10,000 new objects instead of 700. Measured side by side (bench/bench_compare.py,
    a /live stream through the local topology): the node's CPU per frame 0.955 of before.
    Call it once start-up is done, right before serving.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
