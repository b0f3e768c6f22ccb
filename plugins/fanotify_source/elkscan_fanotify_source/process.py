"""The writer of an event: its executable and its Elkeid process set.

The process set comes from the proc_enricher plugin (``elkscan_proc_enricher.process_facts``) when it
is installed; without it a minimal reader fills pid and comm and leaves the rest unreadable (``-3``),
so this plugin never duplicates the full process-set logic.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

from elkscan_core import ProcessFacts

DELETED = " (deleted)"
ARGV_LIMIT = 256  # Elkeid compares the first 256 bytes of the command line against its whitelist


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


class Writers:
    """Reads what an event needs about the process that wrote a file."""

    def __init__(self) -> None:
        self._facts, self.full = _load_facts_reader()

    def facts(self, pid: int) -> dict[str, Any]:
        """The process set (plus ``docker_id``) as fields; unreadable values are ``-3``."""
        try:
            return self._facts(pid).as_fields()
        except Exception:  # a reader bug must not cost the event; the record says what is known
            return ProcessFacts(pid=pid).as_fields()

    @staticmethod
    def exe(pid: int) -> Optional[str]:
        """The writer's executable path, or None when the process is gone (or a kernel thread)."""
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
        """An fd on the writer's executable (reaches deleted and container executables)."""
        try:
            return os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
