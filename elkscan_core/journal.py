"""Passes of a periodic walk that do not list what a change journal says is unchanged (issue 14).

A journal (the fanotify source's, put in ``session.journal``) says what may have changed on the walked
filesystems since the previous pass began: directories whose entries changed, and files that anyone
opened, wrote, truncated or changed the attributes of (``Changes``). dirscan remembers each directory it
listed whole and found *settled*, with its path, subdirectories and files (``Settled``); a later pass
enters such a directory without listing it and counts its files clean when the journal still covers
its filesystem, neither it nor any of its files changed, it is met under the same path, and every
engine's version is the same.

A directory is settled when each of its entries was a subdirectory, or a regular file with one link
that the verdict cache knew clean and that nobody had open for writing or mapped writable when checked
(a read lease) after the pass began. Any other entry (a skip, an error, a link, a file judged in this
pass, a file with other links) leaves it unsettled, and it is listed again next pass. Why no lost event
can make a changed file pass as clean: docs/performance.md ("The change journal").
"""

from __future__ import annotations

import array

from attrs import frozen


@frozen
class Changes:
    """What may have changed since the previous pass began, from a journal that saw every event since.
    ``devices``: the filesystems (``st_dev``) it covered for that whole time."""

    devices: frozenset[int]
    dirs: frozenset[tuple[int, int]]  # (dev, ino) of directories whose entries changed (or were opened)
    files: dict[int, set[int]]  # dev -> inodes of files opened, written or changed


class Journal:
    """What a journal offers dirscan (the fanotify source's ``Journal``)."""

    def cover(self, path: str) -> None:
        """Watch the filesystem that holds ``path`` from now on (a walk's root; idempotent)."""

    def rotate(self, walk: object) -> Changes | None:
        """What may have changed since ``walk``'s previous call, and start anew for it; None when that is
        not known (its first call, an overflow, a filesystem newly covered): the pass lists everything."""


class Settled:
    """A directory listed whole whose every entry was settled: what a later pass needs to skip it."""

    __slots__ = ("path", "subdirs", "inodes", "size")

    def __init__(self, path: str, subdirs: list[str], inodes: array.array, size: int) -> None:
        self.path, self.subdirs, self.inodes, self.size = path, subdirs, inodes, size


class Memo:
    """A directory being listed: what it would be remembered as, while it stays settled."""

    __slots__ = ("subdirs", "inodes", "size", "settled")

    def __init__(self) -> None:
        self.subdirs: list[str] = []
        self.inodes = array.array("Q")
        self.size = 0
        self.settled = True

    def done(self, path: str) -> Settled | None:
        return Settled(path, self.subdirs, self.inodes, self.size) if self.settled else None


class Recall:
    """One pass's use of the journal: the previous pass's settled directories (when the journal covered
    the time between) and this pass's, built as it goes."""

    def __init__(self, previous: dict[tuple[int, int], Settled] | None, changes: Changes | None) -> None:
        self.previous = previous if changes is not None else None
        self.changes = changes
        self.settled: dict[tuple[int, int], Settled] = {}

    def known(self, dev: int, ino: int, path: str) -> Settled | None:
        """The directory's memory when it may be skipped: unchanged since it was settled."""
        if self.previous is None:
            return None
        memory = self.previous.get((dev, ino))
        changes = self.changes
        if (memory is None or memory.path != path or dev not in changes.devices or (dev, ino) in changes.dirs
                or not changes.files.get(dev, _NONE).isdisjoint(memory.inodes)):
            return None
        self.settled[(dev, ino)] = memory
        return memory

    def keep(self, dev: int, ino: int, memory: Settled | None) -> None:
        if memory is not None:
            self.settled[(dev, ino)] = memory


_NONE: frozenset[int] = frozenset()

