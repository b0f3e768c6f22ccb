"""File facts the source reports itself: SHA-256 through an open fd and birth time through statx."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os

_CHUNK = 1024 * 1024
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_STATX_BTIME = 0x800


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32),
                ("stx_attributes", ctypes.c_uint64), ("stx_nlink", ctypes.c_uint32),
                ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32), ("stx_mode", ctypes.c_uint16),
                ("spare0", ctypes.c_uint16), ("stx_ino", ctypes.c_uint64), ("stx_size", ctypes.c_uint64),
                ("stx_blocks", ctypes.c_uint64), ("stx_attributes_mask", ctypes.c_uint64),
                ("stx_atime", _StatxTimestamp), ("stx_btime", _StatxTimestamp),
                ("stx_ctime", _StatxTimestamp), ("stx_mtime", _StatxTimestamp),
                ("spare", ctypes.c_uint64 * 20)]


_statx = None


def birth_time(path: str) -> int:
    """Creation time in unix seconds where the filesystem records one, else 0 (as ELKEID.md says)."""
    global _statx
    try:
        if _statx is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _statx = libc.statx
            _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                               ctypes.POINTER(_Statx)]
        buf = _Statx()
        if _statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, ctypes.byref(buf)) != 0:
            return 0
    except (AttributeError, OSError):  # a C library without statx
        return 0
    return int(buf.stx_btime.tv_sec) if buf.stx_mask & _STATX_BTIME else 0


def sha256_fd(fd: int, limit: int) -> str:
    """SHA-256 of the whole file read through ``fd``; "" when it is larger than ``limit`` or unreadable."""
    digest = hashlib.sha256()
    try:
        if os.fstat(fd).st_size > limit:
            return ""
        offset = 0
        while True:
            chunk = os.pread(fd, _CHUNK, offset)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
            offset += len(chunk)
            if offset > limit:
                return ""
    except OSError:
        return ""
