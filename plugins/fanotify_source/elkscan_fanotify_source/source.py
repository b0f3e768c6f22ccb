"""The ``fanotify`` source: file events (Elkeid 6012), on-access scanning, anti-ransomware (6005/6011).

Two fanotify groups feed one poll loop on the source's thread:

- a notification group with event fds: Elkeid's directories (direct children, inode marks with
  ``FAN_EVENT_ON_CHILD``, also inside container root filesystems) and the decoy directories;
- a ``FAN_REPORT_DFID_NAME`` group with one filesystem-wide mark per filesystem holding a web root or
  download directory: events name a directory handle and an entry, so whole trees are covered with
  no per-directory marks, and files renamed into a web root (PHP moves uploads there) are seen too.
  Where a filesystem refuses such a mark, its mount is marked in the notification group instead.

The optional permission mode runs a third group on its own thread (``permission.py``).

The control calls (``anti_ransom``, ``reset_honeypots``, ``file_monitor``) come from other threads
(the Elkeid transport); they only add or remove marks and swap immutable sets under a lock.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from collections.abc import Iterator
from typing import Optional, Union

from elkscan_core import (FILE_EVENT, LOG, RANSOM_EVENT, UNREADABLE, ComponentError, Measure, Outcome,
                          Record, Source, Target)

from . import fanotify as fan
from .config import FanotifyConfig
from .decoys import Decoys
from .files import sha256_fd
from .journal import Journal
from .locations import PROFILES, container_roots, expand
from .onaccess import SettleQueue, Written
from .permission import Guard
from .policy import FileEventFilter, RateLimit, ScanPolicy
from .process import Writers

log = logging.getLogger("elkscan.fanotify")

RANSOM_STATUS = "ransom_status"
EVENT_DIR_MASK = fan.FAN_CLOSE_WRITE | fan.FAN_ONDIR | fan.FAN_EVENT_ON_CHILD  # Elkeid's mask
DECOY_MASK = fan.FAN_CLOSE_WRITE | fan.FAN_EVENT_ON_CHILD
TREE_MASK = fan.FAN_CLOSE_WRITE | fan.FAN_MOVED_TO
Item = Union[Target, Record]
#: The counters of ``stats``, as the metrics endpoint shows them (``elkscan_fanotify_<name>_total``).
MEASURES = {
    "events": "fanotify events read from the kernel",
    "overflows": "Kernel event queue overflows: events were lost",
    "rate_limited": "File events dropped by the rate limit",
    "file_events": "File events reported (Elkeid 6012)",
    "skipped": "File events not reported: a skipped name or path",
    "whitelisted": "File events not reported: a whitelisted writer",
    "own": "Events caused by elkscan itself or its children, ignored",
    "ransom_events": "Decoy files written (anti-ransomware)",
    "decoy_unchanged": "Decoys opened for writing but left unchanged",
    "coalesced": "Writes folded into a later write of the same file before it settled",
    "scans": "Written files handed to the engines (on-access)",
    "unchanged": "Written files not scanned again: unchanged since their last scan",
    "not_scanned": "Written files not scanned: empty, above max_size or not a regular file",
    "vanished": "Written files gone before they could be scanned",
    "read_errors": "Failed reads of a fanotify group",
    "mount_changes": "Changes of the mount table (new containers are marked)",
    "permission_scans": "Executions or opens held for a scan (permission mode)",
    "permission_cached": "Executions or opens allowed from a remembered verdict",
    "denied": "Executions or opens denied (permission mode)",
    "permission_late_hits": "Detections that came after the latency budget let the file through",
    "permission_timeouts": "Held executions or opens let through by the latency budget, unjudged",
}


class FanotifySource(Source):
    """Monitors writes with fanotify until stopped; see the module docstring."""

    id = "fanotify"
    Config = FanotifyConfig

    def __init__(self, config: FanotifyConfig, session) -> None:
        super().__init__(config, session)
        events, access, ransom = config.file_events, config.on_access, config.anti_ransom
        resolve = session.resolve_path
        self.filter = FileEventFilter(events.skip_suffixes, events.skip_paths, events.exe_whitelist,
                                      events.argv_whitelist)
        self.rate = RateLimit(events.rate_limit, events.rate_window)
        self.directories = [*PROFILES[events.profile], *(resolve(d) for d in events.directories)]
        roots = {"web_roots": access.web_roots, "downloads": access.downloads}
        roots = {k: [resolve(p) for p in v] for k, v in roots.items()}
        # Events carry resolved paths: match against both the configured and the real spelling.
        self.policy = ScanPolicy(
            [*roots["web_roots"], *(os.path.realpath(p) for p in roots["web_roots"])],
            access.extensions,
            [*roots["downloads"], *(os.path.realpath(p) for p in roots["downloads"])],
            [resolve(g) for g in access.globs])
        self.passwd = resolve(ransom.passwd)
        self.homes = [resolve(h) for h in ransom.homes]
        #: What happened, by name (events, file_events, rate_limited, overflows, scans, ...).
        self.stats: collections.Counter[str] = collections.Counter()
        self._reported = collections.Counter()
        self._lock = threading.RLock()
        self.own_pid = os.getpid()
        self._file_events_on = events.enabled
        self._ransom_on = False
        self._event_dirs: frozenset[str] = frozenset()
        self._decoy_dirs: frozenset[str] = frozenset()
        self._mount_roots: tuple[str, ...] = ()     # on-access roots watched through a mount mark
        self._unwatchable: set[str] = set()         # warned about once, retried at every refresh
        self._mount_fds: dict[int, int] = {}        # fsid -> fd for open_by_handle_at
        self.waiting = SettleQueue(access.settle, access.max_size, self.stats)
        self.notify: Optional[fan.Group] = None
        self.tree: Optional[fan.Group] = None
        self._wake: Optional[tuple[int, int]] = None
        self._mounts: Optional[int] = None          # /proc/self/mountinfo, to notice new containers
        self.decoys: Optional[Decoys] = None
        self.guard: Optional[Guard] = None
        self.journal: Optional[Journal] = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.notify = fan.Group()
        except fan.FanotifyUnavailable as exc:
            raise ComponentError(str(exc)) from None
        access = self.config.on_access
        if access.enabled and access.filesystem_marks:
            try:
                self.tree = fan.Group(report_dfid_name=True)
            except fan.FanotifyUnavailable as exc:
                log.warning("fanotify: %s; on-access scanning falls back to mount marks "
                            "(files renamed into a web root are not seen)", exc)
        self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.writers = Writers()
        if not self.writers.full:
            log.info("fanotify: elkscan_proc_enricher is not installed; events carry pid and comm only")
        self.decoys = Decoys(self.passwd, self.homes,
                             os.path.join(self.session.state_dir, "fanotify-decoys.json"))
        self._mounts = self._watch_mounts()
        self.refresh_marks()
        self._start_journal()
        if self.config.anti_ransom.enabled:
            self.anti_ransom(True)
        permission = self.config.permission
        if permission.enabled:
            self.guard = Guard(self, permission.budget, permission.opens)
            try:
                self.guard.start([os.path.realpath(r) for r in self.policy.roots])
            except OSError as exc:
                self.close()
                raise ComponentError(f"permission mode: {exc}") from None

    def metrics(self) -> list[Measure]:
        """Every counter of ``stats`` (read by name: the poll thread may add keys meanwhile)."""
        return [Measure(f"fanotify_{name}", self.stats[name], "counter", help_) for name, help_ in MEASURES.items()]

    def stop(self) -> None:
        super().stop()
        if self._wake is not None:
            try:
                os.write(self._wake[1], b"x")
            except OSError:
                pass

    def _start_journal(self) -> None:
        """The change journal, for the periodic walks of this session (docs/performance.md)."""
        walks = [s for s in self.session.sources if s.id == "dirscan" and getattr(s.config, "every", None)]
        if not (self.config.journal and walks and self.session.journal is None):
            return
        try:
            self.journal = Journal()
        except fan.FanotifyUnavailable as exc:
            log.warning("fanotify: no change journal (%s); periodic walks list every directory", exc)
            return
        self.session.journal = self.journal

    def close(self) -> None:
        if self.journal is not None:
            if self.session.journal is self.journal:
                self.session.journal = None
            self.journal.close()
            self.journal = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        with self._lock:
            if self.notify is not None and self._ransom_on:
                self.anti_ransom(False)  # as Elkeid: a stopped scanner leaves no decoys behind
            self.waiting.clear()
            for fd in self._mount_fds.values():
                os.close(fd)
            self._mount_fds.clear()
            for group in (self.notify, self.tree):
                if group is not None:
                    group.close()
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
            if self._mounts is not None:
                os.close(self._mounts)
                self._mounts = None

    # -- control API (thread-safe; called by the Elkeid transport) -----------------------------

    def _require_running(self) -> None:
        if self.notify is None or self.notify.fd < 0:
            raise ComponentError("the fanotify source is not running (start the session first)")

    def anti_ransom(self, on: bool) -> None:
        """On: place (or restore) every decoy and watch it. Off: unwatch and remove every decoy made."""
        with self._lock:
            self._require_running()
            if on:
                placed, problems = self.decoys.place()
                for directory in placed:
                    try:
                        self.notify.mark(directory, DECOY_MASK)
                    except OSError as exc:
                        problems.append(f"{directory}: cannot watch: {exc.strerror}")
                self._decoy_dirs, self._ransom_on = frozenset(placed), True
            else:
                for directory in self._decoy_dirs:
                    try:
                        self.notify.mark(directory, DECOY_MASK, add=False)
                    except OSError:
                        pass  # already gone with its directory
                problems = self.decoys.remove()
                self._decoy_dirs, self._ransom_on = frozenset(), False
        for problem in problems:
            self.session.report(Outcome(self.id, "failed", message=f"anti-ransomware decoy: {problem}"))

    def reset_honeypots(self) -> None:
        """Restore every decoy's content (and re-create missing ones) when anti-ransomware is on."""
        with self._lock:
            if self._ransom_on:
                self.anti_ransom(True)

    def file_monitor(self, on: bool) -> None:
        """Turn file events (Elkeid 6012) on (marks refreshed) or off (marks removed)."""
        with self._lock:
            self._require_running()
            self._file_events_on = on
            if on:
                self._mark_event_dirs()
            else:
                for directory in self._event_dirs:
                    try:
                        self.notify.mark(directory, EVENT_DIR_MASK, add=False)
                    except OSError:
                        pass
                self._event_dirs = frozenset()

    @property
    def ransom_on(self) -> bool:
        return self._ransom_on

    # -- marks ---------------------------------------------------------------------------------

    def refresh_marks(self) -> None:
        """(Re)mark every monitored directory and on-access root that exists now (idempotent)."""
        with self._lock:
            if self._file_events_on:
                self._mark_event_dirs()
            if self.config.on_access.enabled:
                self._mark_trees()

    def _mark_event_dirs(self) -> None:
        roots = container_roots() if self.config.file_events.containers else []
        marked = set()
        for directory in expand(self.directories, roots):
            try:
                self.notify.mark(directory, EVENT_DIR_MASK)
                marked.add(directory)
            except OSError as exc:
                self._warn_once(directory, f"cannot watch {directory}: {exc.strerror}")
        self._event_dirs = frozenset(marked)

    def _mark_trees(self) -> None:
        mount_roots = list(self._mount_roots)
        for root in self.policy.roots:
            if not os.path.isdir(root):
                continue
            root = os.path.realpath(root)
            if self.tree is not None:
                try:
                    fsid = os.statvfs(root).f_fsid
                    if fsid not in self._mount_fds:
                        self.tree.mark(root, TREE_MASK, filesystem=True)
                        self._mount_fds[fsid] = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    continue
                except OSError as exc:
                    log.info("fanotify: no filesystem-wide mark for %s (%s); marking its mount",
                             root, exc.strerror)
            if root not in mount_roots:
                try:
                    self.notify.mark(root, fan.FAN_CLOSE_WRITE, mount=True)
                    mount_roots.append(root)
                except OSError as exc:
                    self._warn_once(root, f"cannot watch {root} for on-access scanning: {exc.strerror}")
        self._mount_roots = tuple(mount_roots)

    def _warn_once(self, path: str, message: str) -> None:
        if path not in self._unwatchable:
            self._unwatchable.add(path)
            log.warning("fanotify: %s", message)

    # -- the loop ------------------------------------------------------------------------------

    def targets(self) -> Iterator[Item]:
        config = self.config
        poller = select.poll()
        fds = {self._wake[0]: self._drain_wake, self.notify.fd: self._read_notify}
        if self.tree is not None:
            fds[self.tree.fd] = self._read_tree
        for fd in fds:
            poller.register(fd, select.POLLIN)
        if self._mounts is not None:  # a mount (a container's root filesystem) came or went: re-mark now
            fds[self._mounts] = self._mounts_changed
            poller.register(self._mounts, select.POLLPRI)
        now = time.monotonic()
        status_every = config.anti_ransom.status_every
        timers = {"refresh": now + config.refresh, "report": now + config.report_every,
                  "status": now + config.anti_ransom.status_first if status_every else float("inf")}
        try:
            while not self.stopping.is_set():
                due = min(timers.values())
                if self.waiting.next_due is not None:
                    due = min(due, self.waiting.next_due)
                timeout = min(max(due - time.monotonic(), 0.0), 0.5)
                for fd, _ in poller.poll(timeout * 1000):
                    try:
                        yield from fds[fd]()
                    except OSError as exc:  # e.g. no descriptor left for an event: report, go on
                        self.stats["read_errors"] += 1
                        self.session.report(Outcome(self.id, "failed",
                                                    message=f"reading fanotify events: {exc.strerror}"))
                        self.stopping.wait(0.05)
                now = time.monotonic()
                yield from self.waiting.due(now)
                if now >= timers["status"]:
                    timers["status"] = now + status_every
                    yield Record(kind=RANSOM_STATUS, facts={"status": "on" if self._ransom_on else "off"})
                if now >= timers["refresh"]:
                    timers["refresh"] = now + config.refresh
                    self.refresh_marks()
                if now >= timers["report"]:
                    timers["report"] = now + config.report_every
                    yield from self._loss_report()
        finally:
            self.waiting.clear()
            # The runner no longer takes items from a stopping source: hand the last report over directly.
            for record in self._loss_report():
                self.session.deliver(record)

    def _drain_wake(self) -> tuple[()]:
        try:
            while os.read(self._wake[0], 512):
                pass
        except BlockingIOError:
            pass
        return ()

    def _watch_mounts(self) -> Optional[int]:
        """``/proc/self/mountinfo`` polls POLLPRI when the mount table changes (when file events
        look inside containers). Opened before the first marks, so no change falls in between."""
        if not (self.config.file_events.enabled and self.config.file_events.containers):
            return None
        try:
            fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        self._read_all(fd)
        return fd

    @staticmethod
    def _read_all(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        while os.read(fd, 65536):
            pass

    def _mounts_changed(self) -> tuple[()]:
        self._read_all(self._mounts)
        self.stats["mount_changes"] += 1
        if self._file_events_on:
            with self._lock:
                self._mark_event_dirs()
        return ()

    def _loss_report(self) -> Iterator[Record]:
        """Say what was lost since the last report: queue overflows and rate-limited file events."""
        overflows = self.stats["overflows"] - self._reported["overflows"]
        limited = self.stats["rate_limited"] - self._reported["rate_limited"]
        if not (overflows or limited):
            return
        self._reported.update(overflows=overflows, rate_limited=limited)
        parts = []
        if overflows:
            parts.append(f"the kernel event queue overflowed {overflows} time(s) and events were lost "
                         f"({self.stats['overflows']} in total)")
        if limited:
            events = self.config.file_events
            parts.append(f"{limited} file event(s) were dropped by the rate limit of {events.rate_limit} "
                         f"per {events.rate_window:g}s ({self.stats['rate_limited']} in total)")
        message = "fanotify: " + "; ".join(parts)
        log.warning("%s", message)
        yield Record(kind=LOG, facts={"level": "WARN", "target": "fanotify", "msg": message})

    # -- the notification group: file events, decoys, mount-marked on-access roots ------------

    def _read_notify(self) -> Iterator[Item]:
        for event in self.notify.read():
            self.stats["events"] += 1
            if event.overflow:
                self.stats["overflows"] += 1
                continue
            if event.fd < 0:
                continue
            kept = False
            try:
                if event.pid == self.own_pid:
                    self.stats["own"] += 1
                    continue
                path = fan.fd_path(event.fd)
                directory = os.path.dirname(path)
                if directory in self._decoy_dirs:
                    item = self._ransom(event, path)
                    if item is not None:
                        yield item
                    continue
                if self._file_events_on and directory in self._event_dirs:
                    record = self._file_event(event, path)
                    if record is not None:
                        yield record
                if (self._mount_roots and any(path.startswith(r + "/") for r in self._mount_roots)
                        and self.policy.wants(path)):
                    kept = True
                    self._queue_scan(Written(path, event.pid, event.mask, fd=event.fd))
            except OSError:
                continue  # the file or the process vanished under us
            finally:
                if not kept:
                    os.close(event.fd)

    def _file_event(self, event: fan.Event, path: str) -> Optional[Record]:
        """An Elkeid 6012 for a write, after its skip lists, whitelists and rate limit."""
        if self.filter.skipped_name(path):
            self.stats["skipped"] += 1
            return None
        writer = self.writers.describe(event.pid)
        if self.filter.whitelisted(writer.exe, writer.argv):
            self.stats["whitelisted"] += 1
            return None
        if not self.rate.allow():
            self.stats["rate_limited"] += 1
            return None
        self.stats["file_events"] += 1
        facts = {**writer.exe_fields(), **writer.facts, "file_path": path,
                 "file_hash": sha256_fd(event.fd, self.config.file_events.hash_max_size),
                 "file_mask": str(event.mask)}
        return Record(kind=FILE_EVENT, facts=facts)

    def _ransom(self, event: fan.Event, path: str) -> Optional[Item]:
        """A decoy was written: scan the writer's executable and always report a ransom event."""
        name = os.path.basename(path)
        if self.decoys.unchanged(name, sha256_fd(event.fd, 1 << 20)):
            self.stats["decoy_unchanged"] += 1  # opened for writing but not changed (as Elkeid)
            return None
        self.stats["ransom_events"] += 1
        writer = self.writers.describe(event.pid, fresh=True)
        extra = {**writer.facts, "file_path": path, "file_mask": str(event.mask)}
        exe, fd = writer.exe, self.writers.open_exe(event.pid)
        if fd is None or exe is None:
            if fd is not None:
                os.close(fd)
            return Record(kind=RANSOM_EVENT, facts={**extra, "exe": exe or str(UNREADABLE)},
                          errors=(Outcome(self.id, "failed", message="the writer exited before its "
                                          "executable could be opened", target=path),))
        return Target(path=exe, origin="ransomware", fd=fd, pid=event.pid, kind=RANSOM_EVENT,
                      report_clean=True, extra=extra)

    # -- the filesystem-wide group: on-access scanning -----------------------------------------

    def _read_tree(self) -> tuple[()]:
        """Queue the written files the policy wants; their targets come out of ``_due_scans``."""
        for event in self.tree.read():
            self.stats["events"] += 1
            if event.overflow:
                self.stats["overflows"] += 1
                continue
            mount_fd = self._mount_fds.get(event.fsid)
            if event.pid == self.own_pid or mount_fd is None or not event.name:
                continue
            try:
                dir_fd = fan.open_by_handle(mount_fd, event.handle)
            except OSError:
                continue  # the directory is gone
            try:
                path = os.path.join(fan.fd_path(dir_fd), event.name)
            except OSError:
                path = ""
            if path and self.policy.wants(path):
                self._queue_scan(Written(path, event.pid, event.mask, dir_fd=dir_fd, name=event.name))
            else:
                os.close(dir_fd)
        return ()

    def _queue_scan(self, written: Written) -> None:
        """Hand a wanted write to the settle queue, unless the scanner's own child wrote it (a managed
        clamd's temporary files: scanning them could make more)."""
        writer = self.writers.describe(written.pid)
        if writer.facts.get("ppid") == self.own_pid:
            self.stats["own"] += 1
            written.close()
            return
        self.waiting.add(written, writer.facts)
