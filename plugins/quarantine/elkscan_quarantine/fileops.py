"""Taking a judged file off the host, and putting a file back, through directory descriptors.

The quarantine runs as root in directories other users may own, later than the scan. In between, the
owner can swap the name for another file (a hard link to something of root's, a symbolic link, a new
file) or change the file. So the file is looked up one component at a time from directory descriptors,
opened with ``O_NOFOLLOW`` relative to its directory, and compared with what was judged; its name is
then renamed aside within the same directory and removed only when what was renamed is still that inode,
else put back. A restore creates the file under a temporary name in a directory reached without
following any link, and moves it into place only where no file exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Iterator

from elkscan_core import ElkscanError
from elkscan_core.paths import Lookup, open_real

from .judged import Judged

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


class NotQuarantined(ElkscanError):
    """The file was not moved: it is gone, or is no longer what the engines judged."""


@contextlib.contextmanager
def locate(path: str) -> Iterator[tuple[int, str, str]]:
    """``(directory fd, name, canonical path)`` of ``path``: links are read from the objects opened, one
    component at a time, never resolved by name twice; the name is not a link."""
    with Lookup() as lookup:
        try:
            dir_fd, name, _, real = lookup.follow(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotQuarantined(f"{path} is gone (moved or deleted since it was judged)") from None
            raise
        yield dir_fd, name, real


def open_judged(dir_fd: int, name: str, path: str, judged: Judged) -> tuple[int, os.stat_result]:
    """Open ``name`` (no link followed) and return its fd and fstat, when it is the file that was judged:
    same device, inode, size and modification time (the caller checks the content's hash as it copies)."""
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotQuarantined(f"{path} is gone (moved or deleted since it was judged)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotQuarantined(f"{path} is now a symbolic link; it was not what was judged") from None
        raise
    try:
        st = os.fstat(fd)
        problem = differs(st, judged)
        if problem:
            raise NotQuarantined(f"{path} is not the file that was judged ({problem}): it was replaced or "
                                 "changed since the scan; left alone")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def differs(st: os.stat_result, judged: Judged) -> str:
    """What tells ``st`` apart from the judged file ('' when nothing does)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if (st.st_dev, st.st_ino) != (judged.dev, judged.ino):
        return f"inode {st.st_dev}:{st.st_ino}, judged {judged.dev}:{judged.ino}"
    if st.st_size != judged.size:
        return f"size {st.st_size}, judged {judged.size}"
    if st.st_mtime_ns != judged.mtime_ns:
        return "modified since"
    return ""


def remove_if_same(dir_fd: int, name: str, path: str, st: os.stat_result) -> None:
    """Remove ``name`` only if it still is the inode of ``st``. It is renamed aside first (an atomic step
    that takes whatever the name holds at that instant), and what was taken is checked; anything else is
    put back under its name and NotQuarantined raised."""
    aside = f".elkscan-quarantine-{secrets.token_hex(8)}"
    try:
        rename_noreplace(dir_fd, name, dir_fd, aside)
    except FileNotFoundError:
        raise NotQuarantined(f"{path} went away while it was being quarantined") from None
    now = os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
        os.unlink(aside, dir_fd=dir_fd)
        return
    try:
        rename_noreplace(dir_fd, aside, dir_fd, name)
        kept = "it was put back"
    except OSError as exc:
        kept = f"it is left as {aside} beside it ({exc.strerror})"
    raise NotQuarantined(f"{path} was replaced by another file while it was being quarantined; {kept}, "
                         "and the judged file is not in the vault")


def rename_noreplace(src_dir: int, src: str | bytes, dst_dir: int, dst: str | bytes) -> None:
    """``renameat2(RENAME_NOREPLACE)``: FileExistsError when ``dst`` exists, never an overwrite. Where the
    file system cannot, a hard link and an unlink do the same for a file."""
    if _renameat2 is not None:
        if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), os.fsdecode(dst))
    os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir)


def open_parent(path: bytes, follow: bool) -> tuple[int, bytes]:
    """An O_PATH descriptor of the directory that is to hold ``path`` (absolute), and the name in it.
    Without ``follow``, every component is reached without following a link, so a directory replaced
    by a link since fails (ENOTDIR) instead of leading elsewhere."""
    parent, name = os.path.split(path)
    if not name or name in (b".", b".."):
        raise ElkscanError(f"{os.fsdecode(path)}: not a file name")
    if follow:
        parent = os.path.realpath(parent)
    return open_real(os.fsdecode(parent)), name
