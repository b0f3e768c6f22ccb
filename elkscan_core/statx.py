"""A file's birth time through ``statx(2)``: ``os.stat`` cannot return it on Linux (``st_birthtime``
is not set there, and the Pythons elkscan supports have no ``os.statx``), and Elkeid's ``create_at``
wants it where the filesystem records one."""

from __future__ import annotations

import ctypes
import platform
import struct
from typing import Callable, Optional

AT_EMPTY_PATH = 0x1000
STATX_BTIME = 0x800
_STATX_BUFFER = 256          # sizeof(struct statx)
_BTIME_SECONDS_OFFSET = 80   # struct statx: stx_btime.tv_sec (after mask..attributes_mask and stx_atime)
#: statx's system call number where glibc is older than 2.28 and has no wrapper.
_SYS_STATX = {"x86_64": 332, "aarch64": 291, "ppc64le": 383, "s390x": 379}
_StatxCall = Callable[[int, bytes, int, int, ctypes.Array], int]


def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def libc_statx() -> Optional[_StatxCall]:
    """glibc's ``statx`` wrapper (glibc 2.28 and later)."""
    libc = _libc()
    return getattr(libc, "statx", None) if libc is not None else None


def syscall_statx() -> Optional[_StatxCall]:
    """The raw system call, for older C libraries on kernels that have it (Linux 4.11 and later)."""
    libc, number = _libc(), _SYS_STATX.get(platform.machine())
    if libc is None or number is None:
        return None
    syscall = libc.syscall
    return lambda fd, path, flags, mask, buf: syscall(number, fd, path, flags, mask, buf)


_statx = libc_statx() or syscall_statx()


def birth_time(fd: int) -> int:
    """Unix seconds of the open file's creation, or 0 where the kernel, the C library or the
    filesystem does not know it (Elkeid sends 0 in that case too)."""
    if _statx is None:
        return 0
    buf = ctypes.create_string_buffer(_STATX_BUFFER)
    if _statx(ctypes.c_int(fd), b"", ctypes.c_int(AT_EMPTY_PATH), ctypes.c_uint(STATX_BTIME), buf) != 0:
        return 0
    (mask,) = struct.unpack_from("=I", buf.raw, 0)
    if not mask & STATX_BTIME:
        return 0
    (seconds,) = struct.unpack_from("=q", buf.raw, _BTIME_SECONDS_OFFSET)
    return max(seconds, 0)

