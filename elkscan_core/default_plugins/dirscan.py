"""``dirscan``: walk directory trees, as Elkeid's periodic scan does, but configurable.

Per-root maximum depth, one filesystem, directory symlinks never followed, regular files only, size
bounds, Elkeid's first-64-bytes file-type filter and filter prefixes. Each file is opened here, once,
without following a link that appeared after it was listed, and handed on by its descriptor.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from typing import Optional

import attrs
from attrs import frozen

from ..components import Source
from ..filetype import HEAD_SIZE, category
from ..hookspecs import hookimpl
from ..model import Outcome, Target
from ..paths import ELKEID_EXCLUDES, ELKEID_ROOTS, PathFilter, under
from ..units import Duration, MiB, Size

log = logging.getLogger("elkscan.dirscan")
LINK_POLICIES = ("inside", "never", "always")


def _check_links(_instance, _attribute, value: str) -> None:
    if value not in LINK_POLICIES:
        raise ValueError(f"expected one of {', '.join(LINK_POLICIES)}, got {value!r}")


@frozen
class DirscanConfig:
    """Options of ``use: dirscan`` (see docs/pipeline.md)."""

    roots: dict[str, int] = attrs.field(factory=lambda: dict(ELKEID_ROOTS))
    exclude: list[str] = attrs.field(factory=lambda: list(ELKEID_EXCLUDES))
    min_size: Size = Size(5)
    max_size: Size = Size(18 * MiB)
    type_filter: bool = True
    one_filesystem: bool = True
    links: str = attrs.field(default="inside", validator=_check_links)
    every: Optional[Duration] = None
    required: bool = False


class Dirscan(Source):
    """Walks ``roots``; repeats every ``every`` when set, else walks once."""

    id = "dirscan"
    Config = DirscanConfig
    origin = "dirscan"

    def __init__(self, config: DirscanConfig, session) -> None:
        super().__init__(config, session)
        self.excluded = PathFilter(config.exclude)
        self.roots = {os.path.abspath(session.resolve_path(r) if not os.path.isabs(r) else r): d
                      for r, d in config.roots.items()}

    def targets(self) -> Iterator[Target]:
        while True:
            for root, depth in self.roots.items():
                yield from self.walk(root, depth)
                if self.stopping.is_set():
                    return
            if self.config.every is None or self.stopping.wait(self.config.every):
                return

    def walk(self, root: str, max_depth: int) -> Iterator[Target]:
        """Targets under ``root`` down to ``max_depth`` (root = 0, negative = unlimited)."""
        if self.excluded(root):
            return
        try:
            root_stat = os.stat(root)
        except OSError as exc:
            log.info("scan root %s skipped: %s", root, exc.strerror)
            return
        if not stat.S_ISDIR(root_stat.st_mode):
            target = self._file(root, root_stat.st_dev, os.path.islink(root))
            if target:
                yield target
            return
        visited = {(root_stat.st_dev, root_stat.st_ino)}
        stack = [(root, 0)]
        while stack and not self.stopping.is_set():
            directory, depth = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    children = list(entries)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.session.report(Outcome(self.id, "failed", message=f"cannot list: {exc.strerror}",
                                            target=directory))
                continue
            for entry in children:
                path = entry.path
                if self.excluded(path):
                    continue
                try:
                    if entry.is_symlink():
                        if self.config.links == "never":
                            continue
                        if entry.is_dir():  # a link to a directory
                            if self.config.links == "always" and (max_depth < 0 or depth + 1 < max_depth):
                                st = entry.stat()
                                if (st.st_dev, st.st_ino) not in visited:  # no loops
                                    visited.add((st.st_dev, st.st_ino))
                                    stack.append((path, depth + 1))
                            continue
                        if entry.is_file() and (max_depth < 0 or depth + 1 <= max_depth):
                            target = self._file(path, root_stat.st_dev, link=True)
                            if target:
                                yield target
                    elif entry.is_dir(follow_symlinks=False):
                        if max_depth < 0 or depth + 1 < max_depth:
                            st = entry.stat(follow_symlinks=False)
                            if self.config.one_filesystem and st.st_dev != root_stat.st_dev:
                                continue
                            if (st.st_dev, st.st_ino) not in visited:
                                visited.add((st.st_dev, st.st_ino))
                                stack.append((path, depth + 1))
                    elif entry.is_file(follow_symlinks=False) and (max_depth < 0 or depth + 1 <= max_depth):
                        target = self._file(path, root_stat.st_dev, link=False)
                        if target:
                            yield target
                except FileNotFoundError:
                    continue  # vanished while we looked: not an error

    def _cached_clean(self, path: str) -> bool:
        """Whether the verdict cache already holds this unchanged file clean: then it is not even opened."""
        try:
            st = os.lstat(path)
        except OSError:
            return False  # the open below reports what is wrong
        return (stat.S_ISREG(st.st_mode) and self.config.min_size <= st.st_size <= self.config.max_size
                and self.session.known_clean(st))

    def _file(self, path: str, root_dev: int, link: bool) -> Target | None:
        """Open one file and decide whether it is scanned; the descriptor travels with the target."""
        if not link and self.session.cache is not None and self._cached_clean(path):
            return None
        real = path
        if link:
            real = os.path.realpath(path)
            if self.config.links == "inside" and not any(under(real, r) for r in self.roots):
                log.debug("%s links out of the scan roots to %s; not followed", path, real)
                return None
            if self.excluded(real):
                return None
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
                         | (0 if link else os.O_NOFOLLOW))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: became a link since it was listed
                return None
            self.session.report(Outcome(self.id, "failed", message=f"cannot open: {exc.strerror}",
                                        target=path))
            return None
        keep = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if self.config.one_filesystem and st.st_dev != root_dev and not link:
                return None
            skip = ("below min_size" if st.st_size < self.config.min_size else
                    "above max_size" if st.st_size > self.config.max_size else
                    "type filter" if self.config.type_filter and category(os.pread(fd, HEAD_SIZE, 0)) else "")
            if skip:
                return Target(path=path, origin=self.origin, size=st.st_size, skip=skip,
                              required=self.config.required)
            keep = True
            return Target(path=path, origin=self.origin, fd=fd, size=st.st_size, required=self.config.required)
        except OSError as exc:
            self.session.report(Outcome(self.id, "failed", message=f"cannot read: {exc.strerror}",
                                        target=path))
            return None
        finally:
            if not keep:
                os.close(fd)


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(Dirscan)
