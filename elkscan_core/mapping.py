"""A file's bytes for an engine that scans memory: a small file read whole, a large one mapped, handing
back the pages it has read as it goes.

libyara scans a file by mapping it whole, and every page it has read stays resident in the process
until the scan ends: an 18 MiB file adds 18 MiB to RSS while it is scanned, two workers two files. An
engine that also takes bytes-like data (yara-python's ``match(data=)``) scans ``contents(fd)`` instead.
A file under ``READ_BELOW`` is read in one call: for the small files that most trees hold, cheaper than
libyara's own open (by a /proc path), map and unmap, and nothing is mapped. A larger one is
``trimmed_map(fd)``: a mapping this module owns, whose resident pages one thread drops every
``TRIM_EVERY`` seconds (``madvise(MADV_DONTNEED)``). The mapping is read-only and shared with the file,
so a page read again comes back from the page cache (a minor fault) with the same bytes: the engine sees
the file as before, and RSS holds only what it read in the last moments (docs/performance.md, "Memory: what a scan holds").

A file mapped for a scan can be truncated by its owner meanwhile, and a read of a page past the new end
raises SIGBUS. libyara catches it while it scans (the scan fails, nothing dies); ``held_still(fd)`` keeps
it from happening at all: a read lease makes another process's truncate or open for writing wait until
the scan is over (docs/hardening.md, "A file that shrinks while it is read").
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager

#: Files smaller than this are read whole into their thread's buffer (two workers: 0.5 MiB held), larger
#: ones mapped and trimmed.
READ_BELOW = 256 << 10
#: Why a small file was not judged: what was read is neither the size it had when opened nor its size now.
CHANGED = "the file changed size while it was read (a writer holds it); not judged"
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


#: fcntl(2) keeping the GIL: a lease is set and dropped without waiting for I/O.
_fcntl = ctypes.PyDLL(None).fcntl
_fcntl.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)


@contextmanager
def held_still(fd: int) -> Iterator[bool]:
    """A read lease on the file open as ``fd`` (read-only) while in use: another process's truncate or
    open for writing waits until it is released here (or the kernel's lease-break-time, 45 s, passes).
    Its break is signalled with SIGURG, ignored (the default SIGIO would end the process). False when
    there is none: someone has the file open for writing or mapped writable, or no right to a lease
    (not our file without CAP_LEASE; a filesystem without leases)."""
    held = (_fcntl(fd, fcntl.F_SETSIG, signal.SIGURG) == 0
            and _fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK) == 0)
    try:
        yield held
    finally:
        if held:
            _fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


_TRIMMER = _Trimmer()
_BUFFERS = threading.local()
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


def contents(fd: int, size: int) -> ContextManager[memoryview | mmap.mmap]:
    """The whole file open as ``fd``, ``size`` bytes when it was opened, for a ``with`` block: its bytes
    when it is small (in the thread's buffer: valid until the block ends), else its mapping, held still
    and trimmed. OSError when a small file changed size while it was read (its reader judges nothing)."""
    if size < READ_BELOW:
        buffer = _BUFFERS.__dict__.get("view")
        if buffer is None:  # one per thread, kept: no allocation a file, and the allocator keeps no more
            buffer = _BUFFERS.view = memoryview(bytearray(READ_BELOW + 1))
        read = os.preadv(fd, (buffer,), 0)  # to its end, or one byte past what is read whole
        if read == size or (read <= READ_BELOW and read == os.fstat(fd).st_size):
            return nullcontext(buffer[:read])  # all of it: the size it had, or the size it has now
        if read <= READ_BELOW:
            raise OSError(CHANGED)
    return _mapped(fd)


@contextmanager
def _mapped(fd: int) -> Iterator[mmap.mmap]:
    with held_still(fd), trimmed_map(fd) as view:  # its owner cannot shrink it under the mapping
        yield view
