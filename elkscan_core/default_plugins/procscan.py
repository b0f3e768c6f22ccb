"""``procscan``: the executables of running processes, as Elkeid's process scan.

Every numeric ``/proc/<pid>``: read the ``exe`` link (kernel threads and vanished processes are
skipped), apply the filter prefixes, and open ``/proc/<pid>/exe`` itself, which reaches deleted
executables and those inside containers. Each distinct executable is scanned once per pass; its
target carries the pid so enrichers can describe the process.
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
        seen: set[tuple[int, int, int, int]] = set()
        own = os.getpid()
        for name in os.listdir(self.config.proc):
            if not name.isdigit() or int(name) == own or self.stopping.is_set():
                continue
            target = self._executable(int(name), seen)
            if target is not None:
                yield target

    def _executable(self, pid: int, seen: set) -> Target | None:
        link = f"{self.config.proc}/{pid}/exe"
        try:
            exe = os.readlink(link)  # kernel threads have none: ENOENT
        except OSError:
            return None
        if self.excluded(exe.removesuffix(DELETED)):
            return None
        try:
            fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if (not stat.S_ISREG(st.st_mode) or key in seen
                    or not self.config.min_size <= st.st_size <= self.config.max_size):
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return None
        seen.add(key)
        return Target(path=exe, origin=self.id, fd=fd, pid=pid, size=st.st_size)


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(Procscan)
