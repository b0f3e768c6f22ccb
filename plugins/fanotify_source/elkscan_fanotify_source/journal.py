"""The change journal: what may have changed on the filesystems a periodic dirscan walks, between the
starts of two of its passes (elkscan_core.journal says how the walk uses it).

One fanotify group in file-handle mode (``FAN_REPORT_FID``: an event names its object by a handle, not
an open descriptor) with one filesystem mark per walked filesystem, so every mount of it is covered,
containers' included. The mask holds every way content or names change: ``FAN_MODIFY`` (write,
truncate, fallocate), ``FAN_CLOSE_WRITE``, ``FAN_ATTRIB``, the directory-entry events (create, delete,
rename, on directories too) and ``FAN_OPEN``: a writer through a shared mapping changes content with no
event at all, but it had to open the file first. A thread reads the queue as it fills and keeps the
distinct handles (elkscan's own opens left out, its writes kept); ``rotate()`` reads the queue to its end, resolves the
handles to device and inode, and starts anew.

It answers None, and the walk lists everything, whenever an event may have been missed: the first
time, a newly marked filesystem (the time before the mark), a queue overflow, a read that failed, more
distinct objects than it keeps, a handle it cannot resolve for another reason than the object being
gone, and kernels before 6.6, where writes through an overlay mount may not reach the upper
filesystem's mark (verified on 6.18 by the plugin's tests).
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import re
import select
import stat
import threading

from elkscan_core.journal import Changes

from . import fanotify as fan

log = logging.getLogger("elkscan.fanotify")

MASK = (fan.FAN_OPEN | fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE | fan.FAN_ATTRIB | fan.FAN_CREATE
        | fan.FAN_DELETE | fan.FAN_MOVED_FROM | fan.FAN_MOVED_TO | fan.FAN_ONDIR)
#: elkscan's own opens (its walk, its lease checks, its engines) are not changes; its own writes are.
_OWN_OPEN = fan.FAN_OPEN | fan.FAN_ONDIR
#: Distinct objects kept between two passes (about 150 bytes each); past it the journal is lost.
MAX_OBJECTS = 100_000
#: The first kernel whose overlayfs writes its upper files through backing files that report events
#: on the upper filesystem.
MIN_KERNEL = (6, 6)


def kernel_ok(release: str | None = None) -> bool:
    match = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= MIN_KERNEL


class Journal:
    """A change journal for ``session.journal`` (each periodic walk asks for its own answers, keyed by
    the walk); raises ``fan.FanotifyUnavailable`` when it cannot be."""

    def __init__(self) -> None:
        if not kernel_ok():
            raise fan.FanotifyUnavailable(f"the change journal needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} "
                                          f"or later (this is {platform.release()})")
        self.group = fan.Group(report_fid=True)
        self._lock = threading.Lock()
        self._filesystems: dict[int, tuple[int, int]] = {}  # fsid -> (st_dev, a descriptor to open handles)
        #: Each walk's distinct objects since its last rotate(), or None when that is lost
        self._pending: dict[int, set[tuple[int, bytes]] | None] = {}
        self._pid = os.getpid()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read_on, name="elkscan-journal", daemon=True)
        self._reader.start()

    def cover(self, path: str) -> None:
        """Mark the filesystem holding ``path`` (idempotent); one that refuses stays uncovered."""
        try:
            st, fsid = os.stat(path), os.statvfs(path).f_fsid
        except OSError:
            return
        with self._lock:
            if fsid in self._filesystems:
                return
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
            try:
                self.group.mark(path, MASK, filesystem=True)
            except OSError as exc:
                os.close(fd)
                log.info("change journal: %s is not covered (%s); it is walked whole every pass",
                         path, exc.strerror)
                return
            self._filesystems[fsid] = (st.st_dev, fd)
            self._lose()  # what happened there before the mark is not known

    def rotate(self, walk: object) -> Changes | None:
        """What may have changed since ``walk``'s last call (None: not known, as at its first), and
        start anew for it; each walk has its own answers."""
        with self._lock:
            self._drain()
            handles = self._pending.get(id(walk))
            self._pending[id(walk)] = set()
            filesystems = dict(self._filesystems)
        if handles is None:
            return None
        dirs: set[tuple[int, int]] = set()
        files: dict[int, set[int]] = {}
        for fsid, handle in handles:
            dev, mount_fd = filesystems[fsid]
            try:
                fd = fan.open_by_handle(mount_fd, handle)
            except OSError as exc:
                if exc.errno in (errno.ESTALE, errno.ENOENT):
                    continue  # gone: nothing left there to judge
                log.info("change journal: a handle cannot be opened (%s); walking everything", exc.strerror)
                return None
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                dirs.add((st.st_dev, st.st_ino))
            else:
                files.setdefault(st.st_dev, set()).add(st.st_ino)
        return Changes(frozenset(dev for dev, _ in filesystems.values()), frozenset(dirs), files)

    def _read_on(self) -> None:
        while not self._closing.is_set():
            try:
                ready, _, _ = select.select([self.group.fd], [], [], 0.5)
            except (OSError, ValueError):
                return  # closed
            if ready:
                with self._lock:
                    if self.group.fd >= 0:
                        self._drain()

    def _drain(self) -> None:
        """Read the queue to its end (under the lock): every event of what happened before is read."""
        while True:
            try:
                events = list(self.group.read())
            except OSError as exc:
                log.warning("change journal: reading events failed (%s); the next pass walks everything",
                            exc.strerror)
                self._lose()
                return
            if not events:
                return
            for event in events:
                if event.overflow or event.fsid not in self._filesystems:
                    self._lose()  # events were lost, or come from a filesystem it does not know
                elif event.pid != self._pid or event.mask & ~_OWN_OPEN:
                    for pending in self._pending.values():
                        if pending is not None:
                            pending.add((event.fsid, event.handle))
            for walk, pending in self._pending.items():
                if pending is not None and len(pending) > MAX_OBJECTS:
                    self._pending[walk] = None

    def _lose(self) -> None:
        """Every walk's next answer is None: something may have changed unseen."""
        self._pending = dict.fromkeys(self._pending)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self.group.close()
            for _, fd in self._filesystems.values():
                os.close(fd)
            self._filesystems.clear()
        self._reader.join(2)
