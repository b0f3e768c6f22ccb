"""Thread priorities: ``nice`` and ``ionice`` (``ioprio_set(2)``), parsed for the pipeline and applied by
the governor to every thread of the process (Linux keeps both per thread)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

log = logging.getLogger("elkscan.governor")

# ioprio_set(2): classes and the per-architecture syscall numbers.
IOPRIO_CLASSES = {"realtime": 1, "best-effort": 2, "idle": 3}
_IOPRIO_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "i686": (289, 290), "armv7l": (314, 315)}


def parse_ionice(value: str) -> tuple[int, int]:
    """``idle``, ``best-effort[:0-7]`` or ``realtime[:0-7]`` -> (class, level); ValueError otherwise."""
    name, _, level = str(value).partition(":")
    if name not in IOPRIO_CLASSES:
        raise ValueError(f"expected idle, best-effort[:0-7] or realtime[:0-7], got {value!r}")
    if name == "idle":
        if level:
            raise ValueError(f"the idle I/O class takes no level, got {value!r}")
        return IOPRIO_CLASSES[name], 0
    if level and (not level.isdigit() or not 0 <= int(level) <= 7):
        raise ValueError(f"an I/O priority level is 0 (highest) to 7 (lowest), got {value!r}")
    return IOPRIO_CLASSES[name], int(level or 4)


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _ioprio_syscall(get: bool) -> tuple[Callable[..., int], int]:
    import ctypes  # here, not at import: every session imports this module, few set ionice
    import platform

    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"ioprio is not known on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall, numbers[1 if get else 0]


def set_ionice(io_class: int, level: int, tid: int = 0) -> None:
    import ctypes

    syscall, number = _ioprio_syscall(get=False)
    if syscall(number, _IOPRIO_WHO_PROCESS, tid, (io_class << _IOPRIO_SHIFT) | level) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def get_ionice(tid: int = 0) -> tuple[int, int]:
    """(class, level) of a thread (0: the calling one), as ``ionice -p`` shows it."""
    import ctypes

    syscall, number = _ioprio_syscall(get=True)
    value = syscall(number, _IOPRIO_WHO_PROCESS, tid)
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return value >> _IOPRIO_SHIFT, value & ((1 << _IOPRIO_SHIFT) - 1)


def apply_priorities(nice: int | None, ionice: str | None) -> None:
    """Set nice and I/O priority on every thread now running; threads started later inherit them."""
    io = parse_ionice(ionice) if ionice else None
    for tid in _threads():
        try:
            if nice is not None:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            if io is not None:
                set_ionice(*io, tid=tid)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:
            log.warning("cannot set nice=%s ionice=%s: %s", nice, ionice, exc.strerror or exc)
            return
