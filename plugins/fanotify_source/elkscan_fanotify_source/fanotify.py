"""A small ctypes binding of Linux fanotify: create a group, add and remove marks, parse events.

Only what the source needs: the notification class with event fds (per-directory and mount marks),
the ``FAN_REPORT_DFID_NAME`` class for filesystem-wide marks (events name a directory handle and an
entry name, resolved with ``open_by_handle_at``), queue overflow, and the permission-response write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator

from attrs import frozen

# fanotify_init flags
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_CLASS_CONTENT = 0x04
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark flags
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100

# event mask bits
FAN_MODIFY = 0x02
FAN_ATTRIB = 0x04
FAN_CLOSE_WRITE = 0x08
FAN_OPEN = 0x20
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000

FAN_ALLOW = 0x01
FAN_DENY = 0x02
FANOTIFY_METADATA_VERSION = 3

# info record types
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3

_METADATA = struct.Struct("=IBBHQii")
_INFO_HEADER = struct.Struct("=BBH")
_FSID_HANDLE = struct.Struct("=iiIi")  # fsid.val[0], fsid.val[1], handle_bytes, handle_type
_RESPONSE = struct.Struct("=iI")
_READ_SIZE = 256 * 1024

_libc = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        lib.fanotify_init.restype = ctypes.c_int
        lib.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                      ctypes.c_char_p]
        lib.fanotify_mark.restype = ctypes.c_int
        lib.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.open_by_handle_at.restype = ctypes.c_int
        _libc = lib
    return _libc


class FanotifyUnavailable(Exception):
    """fanotify cannot be used here; the message names what is missing."""


def _explain_init(err: int, what: str) -> str:
    if err == errno.EPERM:
        return f"fanotify needs CAP_SYS_ADMIN to create a {what} group: run elkscan as root"
    if err == errno.ENOSYS:
        return "this kernel has no fanotify (built without CONFIG_FANOTIFY)"
    if err == errno.EINVAL:
        return f"this kernel does not support a fanotify {what} group (too old)"
    if err == errno.EMFILE:
        return "too many fanotify groups (fs.fanotify.max_user_groups) or open files"
    return f"fanotify_init failed: {os.strerror(err)}"


@frozen
class Event:
    """One fanotify event. ``fd`` is the event's open file (notification groups, -1 in FID mode);
    ``fsid``, ``handle`` and ``name`` locate the entry in FID mode (directory handle + entry name)."""

    mask: int
    fd: int
    pid: int
    fsid: int = 0
    handle: bytes = b""
    name: str = ""

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)


def fsid_key(val0: int, val1: int) -> int:
    """The kernel's two-int fsid as the single number ``os.statvfs().f_fsid`` reports."""
    return (val0 & 0xFFFFFFFF) | ((val1 & 0xFFFFFFFF) << 32)


class Group:
    """A fanotify group (one file descriptor). Non-blocking and close-on-exec; safe to mark from
    another thread while one thread reads."""

    def __init__(self, *, report_dfid_name: bool = False, report_fid: bool = False, content: bool = False) -> None:
        try:
            lib = _lib()
        except (OSError, AttributeError) as exc:
            raise FanotifyUnavailable(f"the C library has no fanotify calls ({exc})") from None
        flags = FAN_CLOEXEC | FAN_NONBLOCK | (FAN_CLASS_CONTENT if content else FAN_CLASS_NOTIF)
        if report_dfid_name:
            flags |= FAN_REPORT_DFID_NAME
        elif report_fid:
            flags |= FAN_REPORT_FID
        event_flags = os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE | os.O_NONBLOCK
        fd = lib.fanotify_init(flags, event_flags)
        if fd < 0:
            what = ("filesystem-wide (FAN_REPORT_DFID_NAME, Linux 5.9+)" if report_dfid_name
                    else "file-handle (FAN_REPORT_FID, Linux 5.1+)" if report_fid
                    else "permission" if content else "notification")
            raise FanotifyUnavailable(_explain_init(ctypes.get_errno(), what))
        self.fd = fd
        self.fid_mode = report_dfid_name or report_fid

    def mark(self, path: str, mask: int, *, add: bool = True, mount: bool = False,
             filesystem: bool = False) -> None:
        """Add (or remove) ``mask`` on an inode, its mount, or its whole filesystem; raises OSError."""
        flags = (FAN_MARK_ADD if add else FAN_MARK_REMOVE)
        if mount:
            flags |= FAN_MARK_MOUNT
        elif filesystem:
            flags |= FAN_MARK_FILESYSTEM
        if _lib().fanotify_mark(self.fd, flags, mask, -100, os.fsencode(path)) < 0:  # AT_FDCWD
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)

    def read(self) -> Iterator[Event]:
        """The events of one read (at most 256 KiB of them; none when the queue is empty). One read
        per call, so a caller that polls gets back to its timers even under a constant flood."""
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            yield from parse_events(data)
            return

    def respond(self, fd: int, allow: bool) -> None:
        """Answer a permission event."""
        os.write(self.fd, _RESPONSE.pack(fd, FAN_ALLOW if allow else FAN_DENY))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_events(data: bytes) -> Iterator[Event]:
    """Parse a buffer read from a fanotify group: metadata, then (FID mode) info records."""
    offset, end = 0, len(data)
    while offset + _METADATA.size <= end:
        event_len, version, _, metadata_len, mask, fd, pid = _METADATA.unpack_from(data, offset)
        if event_len < _METADATA.size or version != FANOTIFY_METADATA_VERSION:
            return  # a kernel ABI this binding does not know; nothing after it can be trusted
        fsid, handle, name = 0, b"", ""
        info, info_end = offset + metadata_len, offset + event_len
        while info + _INFO_HEADER.size <= info_end:
            info_type, _, length = _INFO_HEADER.unpack_from(data, info)
            if length < _INFO_HEADER.size:
                break
            if info_type in (FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_DFID,
                             FAN_EVENT_INFO_TYPE_FID) and not handle:
                body = info + _INFO_HEADER.size
                val0, val1, handle_bytes, _ = _FSID_HANDLE.unpack_from(data, body)
                start = body + 8  # the struct file_handle starts after the fsid
                stop = start + 8 + handle_bytes
                fsid, handle = fsid_key(val0, val1), bytes(data[start:stop])
                if info_type == FAN_EVENT_INFO_TYPE_DFID_NAME:
                    raw = data[stop:info + length]
                    name = os.fsdecode(raw.split(b"\0", 1)[0])
            info += length
        yield Event(mask=mask, fd=fd, pid=pid, fsid=fsid, handle=handle, name=name)
        offset += event_len


def open_by_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH | os.O_CLOEXEC) -> int:
    """Open the object a file handle names (CAP_DAC_READ_SEARCH); raises OSError (ESTALE when gone).

    ``mount_fd`` is a descriptor (opened for reading, not ``O_PATH``) of any file on that filesystem.
    """
    fd = _lib().open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def fd_path(fd: int) -> str:
    """The path the kernel has for an open file (``... (deleted)`` when unlinked)."""
    return os.readlink(f"/proc/self/fd/{fd}")
