"""``procscan``: the executables of running processes, as Elkeid's process scan.

Every numeric ``/proc/<pid>``: read the ``exe`` link (kernel threads and vanished processes are
skipped), apply the filter prefixes, and reach the file through ``/proc/<pid>/exe`` itself, which
reaches deleted executables and those inside containers. Each distinct executable is scanned once per
pass, as one target that carries the pid of the first process found running it (so enrichers can
describe it) and, in ``extra["pids"]``, the pids of every process running it (so a transport can report
each process, as Elkeid does, from the one verdict).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Optional

import attrs
from attrs import frozen

from ..components import Source
from ..hookspecs import hookimpl
from ..model import Target
from ..paths import ELKEID_EXCLUDES, PathFilter
from ..units import Duration, MiB, Size

DELETED = " (deleted)"


@frozen
class ProcscanConfig:
    """Options of ``use: procscan`` (see docs/pipeline.md)."""

    exclude: list[str] = attrs.field(factory=lambda: list(ELKEID_EXCLUDES))
    min_size: Size = Size(9)
    max_size: Size = Size(18 * MiB)
    every: Optional[Duration] = None
    proc: str = "/proc"


class Procscan(Source):
    """Yields one target per distinct executable of the running processes."""

    id = "procscan"
    Config = ProcscanConfig

    def __init__(self, config: ProcscanConfig, session) -> None:
        super().__init__(config, session)
        self.excluded = PathFilter(config.exclude)

    def targets(self) -> Iterator[Target]:
        while True:
            yield from self.scan_processes()
            if self.config.every is None or self.stopping.wait(self.config.every):
                return

    def scan_processes(self) -> Iterator[Target]:
        """All processes are listed first, then each distinct executable is opened and yielded."""
        running: dict[tuple[int, int, int, int], list[tuple[int, str]]] = {}
        own = os.getpid()
        for name in os.listdir(self.config.proc):
            if self.stopping.is_set():
                return
            if name.isdigit() and int(name) != own:
                found = self._executable(int(name))
                if found is not None:
                    running.setdefault(found[0], []).append((int(name), found[1]))
        for key, processes in running.items():
            if self.stopping.is_set():
                return
            target = self._open(key, processes)
            if target is not None:
                yield target

    def _executable(self, pid: int) -> tuple[tuple[int, int, int, int], str] | None:
        """(identity, path) of the executable ``pid`` runs, when it is one to scan."""
        link = f"{self.config.proc}/{pid}/exe"
        try:
            exe = os.readlink(link)  # kernel threads have none: ENOENT
            if self.excluded(exe.removesuffix(DELETED)):
                return None
            st = os.stat(link)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or not self.config.min_size <= st.st_size <= self.config.max_size:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), exe

    def _open(self, key: tuple[int, int, int, int], processes: list[tuple[int, str]]) -> Target | None:
        """The executable, opened through the first of its processes still running it."""
        for pid, exe in processes:
            try:
                fd = os.open(f"{self.config.proc}/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # that process is gone
            try:
                st = os.fstat(fd)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == key:
                return Target(path=exe, origin=self.id, fd=fd, pid=pid, size=st.st_size,
                              extra={"pids": tuple(p for p, _ in processes)})
            os.close(fd)  # the pid now runs something else
        return None


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(Procscan)
