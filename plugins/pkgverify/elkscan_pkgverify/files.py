"""Reading a package database's files as root, safely: only what root (or this user) owns and no one
else can write, opened relative to directories already checked, without following a link; and asking
whether the package manager is changing the database right now (it holds its lock)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from elkscan_core.trust import UntrustedError

_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: ``struct flock``: l_type, l_whence, l_start, l_len, l_pid (room to spare for the kernel's padding).
_FLOCK = "hhqqi"


def open_dir(path: str | bytes, dir_fd: int | None = None) -> int | None:
    """A descriptor of the directory, or None when it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def read_trusted(dir_fd: int, name: str | bytes, what: str) -> bytes | None:
    """The bytes of ``name`` in the directory ``dir_fd``, or None when there is no such file. Raises
    UntrustedError for a link, something other than a regular file, or a file another user owns or
    could write: its lines would decide what root calls a vendor's file."""
    try:
        fd = os.open(name, _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedError(f"{what} {os.fsdecode(name)} is a symbolic link; a package database file "
                                 "must be the file itself") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedError(f"{what} {os.fsdecode(name)} is not a regular file")
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise UntrustedError(f"{what} {os.fsdecode(name)} is owned by uid {st.st_uid} with mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}; another user could change what elkscan "
                                 "trusts: make it owned by root and writable only by its owner")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def lock_held(path: str) -> bool:
    """Whether some process holds a write lock on ``path`` (dpkg's and rpm's database locks are
    ``fcntl`` locks): the package manager is changing files and their digests right now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0).ljust(64, b"\0")
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        return struct.unpack_from(_FLOCK, answer)[0] != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def state(*paths: str) -> tuple:
    """What changes whenever one of ``paths`` (files or directories) is written, replaced or removed."""
    found = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)
