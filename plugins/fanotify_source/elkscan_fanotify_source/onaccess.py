"""On-access scanning's waiting room: a written file settles, repeated writes are coalesced, and the
file is opened once, without following links, as a target for the engines."""

from __future__ import annotations

import collections
import os
import stat
import time
from collections.abc import Iterator
from typing import Any, Optional

from attrs import define

from elkscan_core import Target

MAX_PENDING = 4096       # written files waiting to settle before their scan
MAX_REMEMBERED = 8192    # identities of files recently sent to the engines
_SCAN_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@define
class Written:
    """A written file waiting ``settle`` seconds for more writes before it is scanned once. It is
    reached by the event's open file (notification group) or by its directory and name (the
    filesystem-wide group); ``facts`` is the writer's process set, read when it wrote (it may
    have exited by the time of the scan)."""

    path: str
    pid: int
    mask: int
    fd: Optional[int] = None
    dir_fd: Optional[int] = None
    name: str = ""
    facts: Optional[dict[str, Any]] = None
    due: float = 0.0

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dir_fd = None


class SettleQueue:
    """Written files by path, oldest first; counts what it does in ``stats``."""

    def __init__(self, settle: float, max_size: int, stats: collections.Counter) -> None:
        self.settle, self.max_size, self.stats = settle, max_size, stats
        self._pending: dict[str, Written] = {}
        self._scanned: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def add(self, written: Written, facts: dict[str, Any]) -> None:
        """Queue a write; a file written again before it settled is scanned once, after the last
        write (by the last writer)."""
        previous = self._pending.pop(written.path, None)
        if previous is not None:
            self.stats["coalesced"] += 1
            written.mask |= previous.mask
            previous.close()
        written.facts = facts
        written.due = time.monotonic() + self.settle
        self._pending[written.path] = written

    @property
    def next_due(self) -> Optional[float]:
        return next(iter(self._pending.values())).due if self._pending else None

    def due(self, now: float) -> Iterator[Target]:
        """Settled files as targets, oldest first (the oldest at once when too many wait)."""
        while self._pending:
            written = next(iter(self._pending.values()))
            if written.due > now and len(self._pending) <= MAX_PENDING:
                return
            del self._pending[written.path]
            target = self._open(written)
            if target is not None:
                yield target

    def clear(self) -> None:
        for written in self._pending.values():
            written.close()
        self._pending.clear()

    def _open(self, written: Written) -> Optional[Target]:
        """The settled file as a target; None when it is gone, not worth it, or unchanged."""
        try:
            if written.fd is not None:
                fd, written.fd = written.fd, None
            else:
                fd = os.open(written.name, _SCAN_OPEN, dir_fd=written.dir_fd)
        except OSError:
            self.stats["vanished"] += 1
            return None
        finally:
            written.close()
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or st.st_size > self.max_size:
            self.stats["not_scanned"] += 1
            os.close(fd)
            return None
        if self._scanned.get(written.path) == identity:
            self.stats["unchanged"] += 1
            os.close(fd)
            return None
        self._scanned[written.path] = identity
        self._scanned.move_to_end(written.path)
        while len(self._scanned) > MAX_REMEMBERED:
            self._scanned.popitem(last=False)
        self.stats["scans"] += 1
        extra = {**(written.facts or {}), "file_path": written.path, "file_mask": str(written.mask)}
        return Target(path=written.path, origin="fanotify", fd=fd, pid=written.pid, size=st.st_size,
                      extra=extra)
