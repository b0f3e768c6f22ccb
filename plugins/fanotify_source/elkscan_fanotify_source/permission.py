"""Optional permission mode: an exec (and, if asked, an open of a web script) waits for the engines.

A ``FAN_CLASS_CONTENT`` group with filesystem-wide ``FAN_OPEN_EXEC_PERM`` (and ``FAN_OPEN_PERM``)
marks on the filesystems of the on-access roots. Its own thread answers at once for everything
outside the scan policy, for its own process, and for files whose verdict it already knows; other
files are scanned on a small pool while the opener waits. A flagged file is denied (EPERM) and
reported as a finding with ``action: denied``. When a scan overruns the latency budget the open is
allowed (notify-only for that file): the scan goes on and its finding, if any, is still reported.
The thread never waits for a scan itself, so opens made by the engines cannot deadlock it; if the
process dies the kernel allows every pending open when the group's descriptor closes.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

from elkscan_core import FINDING, Record, Subject, Target

from . import fanotify as fan

if TYPE_CHECKING:
    from .source import FanotifySource

log = logging.getLogger("elkscan.fanotify")
_REMEMBERED = 8192


class _Waiter:
    """A permission event waiting for its verdict."""

    __slots__ = ("fd", "path", "pid", "mask", "deadline")

    def __init__(self, fd: int, path: str, pid: int, mask: int, deadline: float) -> None:
        self.fd, self.path, self.pid, self.mask, self.deadline = fd, path, pid, mask, deadline


class Guard:
    """The permission-mode thread of a fanotify source."""

    def __init__(self, source: FanotifySource, budget: float, guard_opens: bool) -> None:
        self.source, self.budget, self.guard_opens = source, budget, guard_opens
        self.group: Optional[fan.Group] = None
        self._lock = threading.Lock()
        self._verdicts: collections.OrderedDict[tuple, bool] = collections.OrderedDict()
        self._in_flight: dict[tuple, list[_Waiter]] = {}
        self._waiting: list[_Waiter] = []
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fanotify-permission")
        self._thread: Optional[threading.Thread] = None
        self._closing = threading.Event()

    def start(self, roots: list[str]) -> None:
        try:
            self.group = fan.Group(content=True)
        except fan.FanotifyUnavailable as exc:
            raise OSError(str(exc)) from None
        mask = fan.FAN_OPEN_EXEC_PERM | (fan.FAN_OPEN_PERM if self.guard_opens else 0)
        marked = set()
        for root in roots:
            if os.path.isdir(root) and os.stat(root).st_dev not in marked:
                self.group.mark(root, mask, filesystem=True)
                marked.add(os.stat(root).st_dev)
        self._thread = threading.Thread(target=self._loop, name="fanotify-permission", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False)  # running scans finish on their own and close their fds
        with self._lock:
            for waiter in self._waiting:
                self._respond(waiter.fd, True)
            self._waiting.clear()
        if self.group is not None:
            self.group.close()  # the kernel allows whatever is still pending

    # -- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.group.fd, select.POLLIN)
        while not self._closing.is_set():
            with self._lock:
                nearest = min((w.deadline for w in self._waiting), default=None)
            timeout = 0.2 if nearest is None else min(max(nearest - time.monotonic(), 0.0), 0.2)
            if poller.poll(timeout * 1000):
                try:
                    events = list(self.group.read())
                except OSError as exc:  # e.g. out of descriptors: the events stay queued; try again
                    log.warning("fanotify permission: cannot read events: %s", exc.strerror)
                    self._closing.wait(0.05)
                    events = []
                for event in events:
                    if event.fd < 0:
                        continue
                    try:
                        self._decide(event)
                    except Exception:  # never leave an open waiting on a bug: allow it
                        log.exception("fanotify permission: allowing an open after an error")
                        self._respond(event.fd, True)
            self._expire(time.monotonic())

    def _decide(self, event: fan.Event) -> None:
        source = self.source
        try:
            path = fan.fd_path(event.fd)
            st = os.fstat(event.fd)
        except OSError:
            self._respond(event.fd, True)
            return
        execution = bool(event.mask & fan.FAN_OPEN_EXEC_PERM)
        wanted = source.policy.wants(path) if execution else source.policy.wants_script(path)
        if event.pid == source.own_pid or not wanted:  # never hold the scanner's own opens
            self._respond(event.fd, True)
            return
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            verdict = self._verdicts.get(identity)
        if verdict is not None:
            self._respond(event.fd, not verdict)
            source.stats["denied" if verdict else "permission_cached"] += 1
            return
        scan_fd = os.dup(event.fd)  # before the event is registered: a failure leaves nothing behind
        waiter = _Waiter(event.fd, path, event.pid, event.mask, time.monotonic() + self.budget)
        with self._lock:  # a second open of a file being scanned waits for the same scan
            self._waiting.append(waiter)
            waiters = self._in_flight.get(identity)
            if waiters is not None:
                waiters.append(waiter)
                os.close(scan_fd)
                return
            self._in_flight[identity] = [waiter]
        source.stats["permission_scans"] += 1
        self._pool.submit(self._scan, identity, scan_fd, waiter)

    def _scan(self, identity: tuple, fd: int, first: _Waiter) -> None:
        """On the pool: run every engine on the file; answer whoever still waits; report a hit."""
        detections = []
        try:
            subject = Subject(Target(path=first.path, origin="fanotify", fd=fd, pid=first.pid), fd,
                              os.fstat(fd))
            for engine in self.source.session.engines:
                try:
                    detections.extend(engine.scan(subject))
                except Exception as exc:  # an engine failure must not block an open
                    log.warning("fanotify permission: %s failed on %s: %s", engine.id, first.path, exc)
        finally:
            os.close(fd)
        flagged = bool(detections)
        with self._lock:
            self._verdicts[identity] = flagged
            while len(self._verdicts) > _REMEMBERED:
                self._verdicts.popitem(last=False)
            waiters = self._in_flight.pop(identity, [])
            answered = [w for w in waiters if w in self._waiting]
            for waiter in answered:
                self._waiting.remove(waiter)
                self._respond(waiter.fd, not flagged)
        if flagged:
            denied = bool(answered)
            self.source.stats["denied" if denied else "permission_late_hits"] += 1
            writer = self.source.writers.describe(first.pid)
            self.source.session.deliver(Record(
                kind=FINDING, target=Target(path=first.path, origin="fanotify", pid=first.pid),
                detections=detections,
                facts={**writer.facts, "file_path": first.path, "file_mask": str(first.mask),
                       "action": "denied" if denied else "allowed (over the latency budget)"}))

    def _expire(self, now: float) -> None:
        with self._lock:
            late = [w for w in self._waiting if w.deadline <= now]
            for waiter in late:
                self._waiting.remove(waiter)
                self._respond(waiter.fd, True)
        self.source.stats["permission_timeouts"] += len(late)

    def _respond(self, fd: int, allow: bool) -> None:
        """Answer a permission event once and close its fd."""
        try:
            self.group.respond(fd, allow)
        except OSError:
            pass
        finally:
            os.close(fd)
