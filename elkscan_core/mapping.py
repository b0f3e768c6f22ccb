"""A large file mapped for an engine that scans memory, handing back the pages it has read as it goes.

libyara scans a file by mapping it whole, and every page it has read stays resident in the process
until the scan ends: an 18 MiB file adds 18 MiB to RSS while it is scanned, two workers two files. An
engine that also takes bytes-like data (yara-python's ``match(data=)``) scans ``trimmed_map(fd)``
instead: a mapping this module owns, whose resident pages one thread drops every ``TRIM_EVERY`` seconds
(``madvise(MADV_DONTNEED)``). The mapping is read-only and shared with the file, so a page read again
comes back from the page cache (a minor fault) with the same bytes: the engine sees the file as before,
and RSS holds only what it read in the last moments (docs/performance.md, "Memory: what a scan holds").
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Files this large or larger are worth it; below, two workers' files hold at most 2 MiB together.
TRIM_ABOVE = 1 << 20
#: Seconds between two hand-backs: yara reads 1 to 3 MB in that time; each costs the scanning threads
#: a TLB flush, so more often costs measurable CPU (5 ms: +4-6 % on large files, 10 ms: +2-4 %).
TRIM_EVERY = 0.01


class _Trimmer:
    """One thread for every mapping in use; it sleeps while there is none."""

    def __init__(self) -> None:
        self._views: set[mmap.mmap] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, view: mmap.mmap) -> None:
        with self._changed:
            self._views.add(view)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="elkscan-trim", daemon=True)
                self._thread.start()
            self._changed.notify()

    def discard(self, view: mmap.mmap) -> None:
        with self._changed:  # after this, the thread no longer touches it: the caller may close it
            self._views.discard(view)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._views:
                    self._changed.wait()
                for view in self._views:
                    view.madvise(mmap.MADV_DONTNEED)
                self._changed.wait(TRIM_EVERY)

    def _forked(self) -> None:
        """In a child process the thread is gone (and the lock may be held by a thread that is too)."""
        self.__init__()


_TRIMMER = _Trimmer()
os.register_at_fork(after_in_child=_TRIMMER._forked)


@contextmanager
def trimmed_map(fd: int) -> Iterator[mmap.mmap]:
    """The whole file open as ``fd``, mapped read-only, its resident pages handed back while in use."""
    view = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    try:
        _TRIMMER.add(view)
        try:
            yield view
        finally:
            _TRIMMER.discard(view)
    finally:
        view.close()
