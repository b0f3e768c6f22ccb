"""The writer of an event: its executable, command line and Elkeid process set.

The process set comes from the proc_enricher plugin (``elkscan_proc_enricher.process_facts``) when it
is installed; without it a minimal reader fills pid and comm and leaves the rest unreadable (``-3``),
so this plugin never duplicates the full process-set logic.

A burst of writes usually comes from one process, so what was read about a pid is kept for a moment
(``ttl``, one second) as long as its executable link still reads the same (an ``exec`` is noticed):
reading all of ``/proc/<pid>`` once per event would cap the event rate.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import Any, Optional

from attrs import frozen

from elkscan_core import UNREADABLE, ProcessFacts

from elkscan_core.statx import birth_time

ARGV_LIMIT = 256  # Elkeid compares the first 256 bytes of the command line against its whitelist
_REMEMBERED = 1024


def _minimal_facts(pid: int) -> ProcessFacts:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return ProcessFacts(pid=pid, comm=handle.read().rstrip("\n"))
    except OSError:
        return ProcessFacts(pid=pid)


def _load_facts_reader() -> tuple[Callable[[int], ProcessFacts], bool]:
    try:
        from elkscan_proc_enricher import process_facts
    except ImportError:
        return _minimal_facts, False
    return process_facts, True


@frozen
class Writer:
    """What an event says about its writer. ``exe`` is None when the process was already gone."""

    pid: int
    exe: Optional[str]
    argv: str
    facts: dict[str, Any]
    exe_size: int = UNREADABLE
    create_at: int = UNREADABLE
    modify_at: int = UNREADABLE

    def exe_fields(self) -> dict[str, Any]:
        """Elkeid's ``exe, exe_size, create_at, modify_at`` of a 6012 (``-3`` when unreadable)."""
        return {"exe": self.exe or str(UNREADABLE), "exe_size": self.exe_size, "create_at": self.create_at,
                "modify_at": self.modify_at}


class Writers:
    """Reads (and briefly remembers) what events need about the processes that write files."""

    def __init__(self, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._facts, self.full = _load_facts_reader()
        self.ttl, self.clock = ttl, clock
        self._known: collections.OrderedDict[int, tuple[float, Writer]] = collections.OrderedDict()

    def describe(self, pid: int, *, fresh: bool = False) -> Writer:
        """The writer ``pid``; ``fresh`` reads /proc again whatever is remembered."""
        now = self.clock()
        exe = self.exe(pid)
        known = self._known.get(pid)
        if not fresh and known is not None and now - known[0] < self.ttl and known[1].exe == exe:
            return known[1]
        writer = self._read(pid, exe)
        self._known[pid] = (now, writer)
        self._known.move_to_end(pid)
        while len(self._known) > _REMEMBERED:
            self._known.popitem(last=False)
        return writer

    def _read(self, pid: int, exe: Optional[str]) -> Writer:
        try:
            facts = self._facts(pid).as_fields()
        except Exception:  # a reader bug must not cost the event; the record says what is known
            facts = ProcessFacts(pid=pid).as_fields()
        sizes = {}
        if exe is not None:
            try:
                fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    st = os.fstat(fd)
                    sizes = {"exe_size": st.st_size, "create_at": birth_time(fd), "modify_at": int(st.st_mtime)}
                finally:
                    os.close(fd)
        return Writer(pid=pid, exe=exe, argv=self.argv(pid), facts=facts, **sizes)

    @staticmethod
    def exe(pid: int) -> Optional[str]:
        """The executable's path, or None when the process is gone (or a kernel thread)."""
        try:
            return os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None

    @staticmethod
    def argv(pid: int) -> str:
        """The first 256 bytes of the command line, NULs as spaces, as Elkeid's whitelist sees it."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                raw = handle.read(ARGV_LIMIT)
        except OSError:
            return ""
        return raw.replace(b"\0", b" ").rstrip().decode("utf-8", "replace")

    @staticmethod
    def open_exe(pid: int) -> Optional[int]:
        """An fd on the executable itself (reaches deleted and container executables)."""
        try:
            return os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
