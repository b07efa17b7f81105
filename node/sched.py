"""A short CPU time slice for the node's relaying threads, so they wake up when bytes arrive.

On a host whose cores a container's encoder keeps busy, Linux's EEVDF scheduler (6.6 and newer)
lets a woken thread preempt the running one only at an earlier deadline, one time slice out
(``base_slice_ns``: 1.4 ms on this project's 2-core hosts). The end of a live segment crosses the
gateway and the orchestrator twice, and each crossing waited up to a slice for the CPU: a per-hop
timeline of a 720p30 stream (2026-12-03) measured the node adding 2.0-4.4 ms to a segment's
latency with the default slice and 0.8-2.5 ms with a 0.1 ms one, in five alternating runs each.

Since Linux 6.12 a ``SCHED_OTHER`` thread may ask for its own slice (``sched_attr.sched_runtime``,
0.1-100 ms), with no privilege: a shorter one wakes with an earlier deadline and preempts sooner,
at the price of being preempted sooner too, which costs a thread that only passes bytes on
nothing. Threads inherit it; a thread that does heavy work (an encoder) asks for the default back
(:func:`default_slice`). Python has no binding for ``sched_setattr(2)``, hence ``ctypes``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import struct

log = logging.getLogger("sched")

RELAY_SLICE_NS = 100_000  # the shortest slice the kernel takes
# struct sched_attr, SCHED_ATTR_SIZE_VER1: size, policy, flags, nice, priority, runtime, deadline,
# period, util_min, util_max.
_ATTR = struct.Struct("=IIQiIQQQII")
_SCHED_OTHER = 0
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr


def _syscall(number: int, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, *args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def set_slice(nanoseconds: int) -> None:
    """This thread's time slice (0: the kernel's default), keeping its nice value; it raises
    :class:`OSError` where the kernel refuses it, or :class:`NotImplementedError` off Linux on
    x86_64/aarch64."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or not hasattr(os, "getpriority"):
        raise NotImplementedError(f"sched_setattr is not wired for {platform.system()} {platform.machine()}")
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    packed = _ATTR.pack(_ATTR.size, _SCHED_OTHER, 0, nice, 0, nanoseconds, 0, 0, 0, 0)
    attr = ctypes.create_string_buffer(packed, len(packed))
    _syscall(numbers[0], 0, attr, 0)


def slice_of(tid: int = 0) -> int:
    """Thread ``tid``'s requested slice in ns (0 on a kernel without custom slices)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise NotImplementedError(f"sched_getattr is not wired for {platform.machine()}")
    attr = ctypes.create_string_buffer(_ATTR.size)
    _syscall(numbers[1], tid, attr, _ATTR.size, 0)
    return int(_ATTR.unpack(attr.raw)[5])


def relay_slice() -> None:
    """Ask for :data:`RELAY_SLICE_NS` for this thread and the threads it starts; a kernel or
    platform that cannot is one log line, and the process runs on with the default slice."""
    try:
        set_slice(RELAY_SLICE_NS)
        taken = slice_of()
    except (OSError, NotImplementedError) as exc:
        log.info("the default CPU time slice stays (%s)", exc)
        return
    if taken != RELAY_SLICE_NS:  # accepted and ignored: no per-thread slices before Linux 6.12
        log.info("the default CPU time slice stays (this kernel has no per-thread slices)")
        return
    log.info("CPU time slice %.1f ms: a woken relay preempts a busy encoder sooner", taken / 1e6)


def default_slice() -> None:
    """The kernel's default slice again, for a thread that does heavy work (best effort)."""
    try:
        set_slice(0)
    except (OSError, NotImplementedError):
        pass
