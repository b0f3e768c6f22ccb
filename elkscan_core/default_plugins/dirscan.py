"""``dirscan``: walk directory trees, as Elkeid's periodic scan does, but configurable.

Per-root maximum depth, one filesystem, size bounds, Elkeid's first-64-bytes file-type filter and
filter prefixes, a link policy. The walk holds directory descriptors, never full paths: each directory
is opened relative to its parent with ``O_NOFOLLOW``, so depth has no PATH_MAX limit and a directory
swapped for a link is never entered. Each file is opened here, once, relative to its directory and
without following a link; what was opened is checked (``fstat``) and handed on by its descriptor.
Links are resolved component by component (``paths.Lookup``), so the decision to follow one and the
open see the same objects. A file that is not judged by policy is yielded as a skip target with the
reason; an entry that cannot be read is one counted error, and the walk goes on.

A one-off walk can be split into shares (``take_share``, elkscan_core/shares.py): each of N processes
lists every directory and judges the regular files whose inode modulo N is its own, so every name of a
file (hard links, links followed to it) meets the one process that owns its inode; what is not a regular
file's verdict (exclusions, other file types, directories that cannot be listed) is reported by share 0.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from typing import Optional

import attrs
from attrs import frozen

from ..components import Measure, Source
from ..filetype import HEAD_SIZE, category
from ..hookspecs import hookimpl
from ..journal import Memo, Recall, Settled
from ..model import Outcome, Target
from ..once import Pass
from ..paths import ELKEID_EXCLUDES, ELKEID_ROOTS, Lookup, Outside, PathFilter, join, open_real, under
from ..units import Duration, MiB, Size

log = logging.getLogger("elkscan.dirscan")
LINK_POLICIES = ("inside", "never", "always")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: Directory descriptors kept open along the current path (deeper ones are reopened through "..").
OPEN_DIRS = 16
#: Subdirectory names a directory collects before its listing pauses so they are walked first.
PENDING = 1024
#: Listings that may pause at once (each holds two descriptors); past it, the names just accumulate.
PAUSED = 16
#: Regular files of a listing asked about together (the verdict cache's look-ups), then opened.
CHUNK = 64
#: Reasons a file met in a walk is not judged.
NOT_REGULAR = "not a regular file"


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
    archives_to_engines: bool = True
    one_filesystem: bool = True
    links: str = attrs.field(default="inside", validator=_check_links)
    every: Optional[Duration] = None
    required: bool = False


class Dirscan(Source):
    """Walks ``roots``; repeats every ``every`` when set, else walks once."""

    id = "dirscan"
    Config = DirscanConfig
    origin = "dirscan"
    asks_known_clean = True  # with the lstat it has: a file the cache holds clean is not even opened

    def __init__(self, config: DirscanConfig, session) -> None:
        super().__init__(config, session)
        self.excluded = PathFilter(config.exclude)
        self.roots = {os.path.abspath(session.resolve_path(r) if not os.path.isabs(r) else r): d
                      for r, d in config.roots.items()}
        self._real_roots: list[str] = []
        self._archives_to_engines = False
        self._pass = self._new_pass()  # each file judged once per pass, whatever names it is met under
        self._settled: dict[tuple[int, int], Settled] | None = None  # the last pass's, for the journal
        self._signature: tuple | None = None  # the engines' versions it was settled with
        #: Directories listed, and entered without listing because the change journal says they are
        #: unchanged (``recalled``), over every pass.
        self.stats: collections.Counter[str] = collections.Counter()
        self._share: tuple[int, int] | None = None  # (k, n): judge only files whose inode % n == k
        self.reports = True  # reports what belongs to no file's owner (share 0's job when split)

    @property
    def splits(self) -> bool:
        """A one-off walk may be split into shares; a periodic one keeps its passes in one process."""
        return self.config.every is None

    def take_share(self, k: int, n: int) -> None:
        """Walk everything, judge only the regular files whose inode % ``n`` is ``k``."""
        self._share, self.reports = (k, n), k == 0

    def owns(self, ino: int) -> bool:
        share = self._share
        return share is None or ino % share[1] == share[0]

    def metrics(self) -> list[Measure]:
        return [Measure(f"dirscan_directories_{name}", self.stats[name], "counter", help_)
                for name, help_ in (("listed", "Directories a walk listed"),
                                    ("recalled", "Directories a walk entered without listing them: the change "
                                                 "journal says they are unchanged"))]

    def describe(self) -> str:
        roots = ", ".join(self.roots) if len(self.roots) <= 3 else f"{len(self.roots)} roots"
        return (f"dirscan: {roots}; {len(self.excluded.prefixes)} exclusion(s), links {self.config.links}"
                + (f", every {self.config.every:g}s" if self.config.every else ""))

    def targets(self) -> Iterator[Target]:
        while True:
            self._pass = self._new_pass()
            started, before = time.monotonic(), collections.Counter(self.stats)
            recall = self._recall()
            for root, depth in self.roots.items():
                try:
                    yield from self.walk(root, depth, recall)
                except Exception as exc:  # a bug must not end a periodic walk for good
                    log.debug("walk of %s failed", root, exc_info=True)
                    if self.reports:
                        self.session.report(Outcome(self.id, "failed", target=root,
                                                    message=f"{type(exc).__name__}: {exc}"))
                if self.stopping.is_set():
                    return
            self._settled = recall.settled if recall is not None else None
            if self.config.every is not None:  # a periodic walk says what each pass cost
                seconds, done = time.monotonic() - started, self.stats - before
                log.info("dirscan: a pass over %s in %.2f s: %d directories listed, %d entered from the change "
                         "journal", ", ".join(self.roots), seconds, done["listed"], done["recalled"],
                         extra={"pass_seconds": seconds})
            if self.config.every is None or self.stopping.wait(self.config.every):
                return

    def _recall(self) -> Recall | None:
        """A periodic walk's use of the session's change journal for this pass (None: list everything).
        The journal is asked before anything is listed, so whatever changes from now on is in its next
        answer."""
        journal = self.session.journal
        if journal is None or self.config.every is None or self.config.links == "always":
            return None
        signature = self.session.clean_signature()
        if signature is None:
            return None
        for root in self.roots:
            journal.cover(os.path.realpath(root))
        changes = journal.rotate(self)
        previous = self._settled if signature == self._signature else None
        self._signature = signature
        return Recall(previous, changes)

    def _new_pass(self) -> Pass:
        """A walk that follows no links meets a file twice only through its hard links."""
        return Pass(every_file=self.config.links != "never")

    def walk(self, root: str, max_depth: int, recall: Recall | None = None) -> Iterator[Target]:
        """Targets under ``root`` down to ``max_depth`` (root = 0, negative = unlimited). A root that is
        a link is followed, as for any path a user names."""
        self._real_roots = [os.path.realpath(r) for r in self.roots]
        self._archives_to_engines = self.config.archives_to_engines and any(
            engine.unpacks_archives for engine in self.session.engines)
        path = root.rstrip("/") or "/"
        if self.excluded(path):
            if self.reports:
                yield self._skip_excluded(path)
            return
        tree = None
        with Lookup() as lookup:
            try:
                dir_fd, name, st, real = lookup.follow(path)
                if stat.S_ISDIR(st.st_mode):
                    tree = _Tree(self, os.open(name, _DIR_FLAGS, dir_fd=dir_fd), path, real, max_depth, recall)
                elif stat.S_ISREG(st.st_mode):
                    target = self._regular(dir_fd, name, path, st, None, named=True) if self.owns(st.st_ino) \
                        else None
                    if target is not None:
                        yield target
                elif self.reports:
                    yield self._skip(path, NOT_REGULAR)
            except (FileNotFoundError, NotADirectoryError):
                if self.config.required and self.reports:
                    yield self._skip(path, "does not exist")
                else:
                    log.info("scan root %s skipped: it does not exist", path)
            except OSError as exc:
                self._failed(path, "cannot open", exc)
        if tree is not None:
            yield from tree.walk()

    # -- one file -------------------------------------------------------------------------------

    def _regular(self, dir_fd: int, name: str, path: str, st: os.stat_result, dev: int | None,
                 named: bool = False) -> Target | None:
        """The target for the regular file ``name`` in ``dir_fd``, whose lstat is ``st``: opened and
        checked, or a skip target; None when the verdict cache already knows it clean, when it vanished
        (a ``named`` root that vanishes is reported, "vanished"), or when it lies on another filesystem
        than ``dev``."""
        return next(self._regulars(dir_fd, ((name, path, st),), dev, named), None)

    def _regulars(self, dir_fd: int, files: Sequence[tuple[str, str, os.stat_result]], dev: int | None,
                  named: bool = False, memo: Memo | None = None) -> Iterator[Target]:
        """``_regular`` for several files of one directory (name, path, lstat): the verdict cache is asked
        about them at once, and only those it does not know clean are opened. ``memo``: the directory's,
        when the journal is in use; a file known clean stays settled only with one link and no writer."""
        return self._grouped(((dir_fd, files),), dev, named, memo)

    def _grouped(self, groups: Sequence[tuple[int, Sequence[tuple[str, str, os.stat_result]]]], dev: int | None,
                 named: bool = False, memo: Memo | None = None) -> Iterator[Target]:
        """``_regulars`` for the files of several directories, each group with its directory's descriptor:
        one look-up in the verdict cache for all (a walk's small directories, asked together)."""
        low, high = int(self.config.min_size), int(self.config.max_size)
        files = [(dir_fd, *file) for dir_fd, each in groups for file in each] if len(groups) > 1 else \
            [(groups[0][0], *file) for file in groups[0][1]]
        asked = [file for file in files if (dev is None or file[3].st_dev == dev) and low <= file[3].st_size <= high]
        if len(asked) < len(files):  # (one comprehension for the usual case: every file within the bounds)
            for _, _, path, st in files:
                reason = "" if dev is not None and st.st_dev != dev else self._size_policy(st.st_size)
                if reason:
                    if memo is not None:
                        memo.settled = False
                    yield self._skip(path, reason, st.st_size)
        known = (self.session.known_clean_all([(st, path) for _, _, path, st in asked], once=self._pass)
                 if self.session.cache is not None and asked else [False] * len(asked))
        if memo is None and all(known):
            return  # every file unchanged since every engine found it clean: none is even opened
        for (dir_fd, name, path, st), clean in zip(asked, known):
            if clean:  # unchanged since every engine found it clean: not even opened
                if memo is not None and memo.settled:
                    from ..cache import unwritten  # sqlite3 is imported only when the cache is on

                    if st.st_nlink == 1 and unwritten(dir_fd, name, st):
                        memo.inodes.append(st.st_ino)
                        memo.size += st.st_size
                    else:
                        memo.settled = False
                continue
            if memo is not None:
                memo.settled = False
            target = self._open(dir_fd, name, path, named)
            if target is not None:
                yield target

    def _open(self, dir_fd: int, name: str, path: str, named: bool) -> Target | None:
        """Open the regular file ``name`` in ``dir_fd`` and check what was opened: the target, a skip
        target, or None (vanished, or unreadable: counted)."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno == errno.ELOOP:
                return self._skip(path, "vanished") if named else None  # gone, or a link now (ELOOP)
            self._failed(path, "cannot open", exc, mine=True)
            return None
        keep = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return self._skip(path, NOT_REGULAR)
            reason = self._size_policy(st.st_size)
            if reason:
                return self._skip(path, reason, st.st_size)
            kind = category(os.pread(fd, HEAD_SIZE, 0)) if self.config.type_filter else None
            if kind and not (kind == "archive" and self._archives_to_engines):
                return self._skip(path, f"type filter: {kind}", st.st_size)
            keep = True
            return Target(path=path, origin=self.origin, fd=fd, stat=st, size=st.st_size,
                          required=self.config.required, once=self._pass)
        except OSError as exc:
            self._failed(path, "cannot read", exc, mine=True)
            return None
        finally:
            if not keep:
                os.close(fd)

    def _size_policy(self, size: int) -> str:
        if size < self.config.min_size:
            return "below min_size"
        if size > self.config.max_size:
            return "above max_size"
        return ""

    def _skip(self, path: str, reason: str, size: int | None = None, required: bool | None = None) -> Target:
        return Target(path=path, origin=self.origin, size=size, skip=reason,
                      required=self.config.required if required is None else required)

    def _skip_excluded(self, path: str) -> Target:
        """The skip target of an excluded path: asked for, so never required, even under a named root."""
        return self._skip(path, "excluded", required=False)

    def _failed(self, path: str, what: str, exc: OSError, mine: bool = False) -> None:
        """One counted error for the entry ``path``; nothing when it vanished meanwhile. Split into
        shares, share 0 reports it, unless it is about a file of this share's own (``mine``)."""
        if not isinstance(exc, FileNotFoundError) and (mine or self.reports):
            self.session.report(Outcome(self.id, "failed", message=f"{what}: {exc.strerror or exc}",
                                        target=path))

    def inside(self, real: str) -> bool:
        """Whether the canonical path ``real`` is inside a scan root."""
        return any(under(real, root) for root in self._real_roots)


class _Dropped(list):
    """A list that keeps nothing."""

    def append(self, item: object) -> None:
        pass


class _Unremembered:
    """What a listing is told about itself when no journal is kept: dropped (a ``Memo`` costs an array)."""

    __slots__ = ("settled",)
    subdirs = _Dropped()


class _Dir:
    """A directory on the walk's current path. Its path and canonical path are prefixes of the walk's
    (only their lengths are kept, so a deep path costs linear memory); ``outer_real`` is the canonical
    path of its parent when it was entered through a link."""

    __slots__ = ("fd", "depth", "dev", "ino", "path_len", "real_len", "outer_real", "pending", "listing", "memo")

    def __init__(self, fd: int, depth: int, st: os.stat_result, path: str, real: str,
                 outer_real: str | None = None, memory: Settled | None = None, memo: Memo | None = None) -> None:
        self.fd: int | None = fd
        self.depth, self.dev, self.ino = depth, st.st_dev, st.st_ino
        self.path_len, self.real_len, self.outer_real = len(path), len(real), outer_real
        self.memo = memo  # what it is being found to be, when the journal is in use
        if memory is None:
            self.pending: list[str] = []
            self.listing = os.scandir(fd)
        else:  # unchanged since a pass found it settled: its subdirectories are walked, it is not listed
            self.pending = list(memory.subdirs)
            self.listing = None


class _Tree:
    """One walk of one directory tree, depth first. A directory's listing is streamed: files become
    targets as they come, subdirectory names are kept until the listing ends (or pauses at PENDING
    names), then walked. At most OPEN_DIRS directory descriptors stay open; a directory whose
    descriptor was closed is reopened through ``..`` of its child and checked to be the same."""

    def __init__(self, scan: Dirscan, fd: int, path: str, real: str, max_depth: int,
                 recall: Recall | None = None) -> None:
        self.scan, self.max_depth, self.recall = scan, max_depth, recall
        self.follow_dirs = scan.config.links == "always"
        self.path, self.real = path, real
        self.stack: list[_Dir] = []
        try:
            st = os.fstat(fd)
            self.stack.append(self._frame(fd, 0, st, path, real))
        except BaseException:
            os.close(fd)
            raise
        self.dev = st.st_dev if scan.config.one_filesystem else None
        self.ancestors = {(st.st_dev, st.st_ino)}  # a bind mount or a followed link cannot loop
        self.visited = set(self.ancestors) if self.follow_dirs else None  # each directory once
        #: Listed directories' regular files kept to be asked about together (with the verdict cache on and
        #: no journal), each group with a duplicate of its directory's descriptor (CHUNK files at most).
        self.gather = scan.session.cache is not None and recall is None
        self.groups: list[tuple[int, list[tuple[str, str, os.stat_result]]]] = []
        self.grouped = 0

    def _frame(self, fd: int, depth: int, st: os.stat_result, path: str, real: str,
               outer: str | None = None) -> _Dir:
        """The directory to walk next: listed, or, when the journal says it is unchanged since it was
        settled, its files counted clean from memory (never below a followed link)."""
        recall = self.recall
        if recall is None or outer is not None:
            self.scan.stats["listed"] += 1
            return _Dir(fd, depth, st, path, real, outer)
        memory = recall.known(st.st_dev, st.st_ino, path)
        if memory is None:
            self.scan.stats["listed"] += 1
            return _Dir(fd, depth, st, path, real, memo=Memo())
        self.scan.stats["recalled"] += 1
        frame = _Dir(fd, depth, st, path, real, memory=memory)
        count = len(memory.inodes)
        if count:
            self.scan.session.count_clean(count, count, memory.size, count * len(self.scan.session.engines))
        return frame

    def walk(self) -> Iterator[Target]:
        stack, stopping = self.stack, self.scan.stopping
        try:
            while stack and not stopping.is_set():
                top = stack[-1]
                if top.pending:
                    self._enter(top, top.pending.pop())
                elif top.listing is not None:
                    yield from self._list(top)
                else:
                    self._leave()
            if self.groups and not stopping.is_set():
                yield from self._flush()
        finally:
            for fd, _ in self.groups:
                os.close(fd)
            self.groups = []
            for frame in stack:
                if frame.listing is not None:
                    frame.listing.close()
                if frame.fd is not None:
                    os.close(frame.fd)
            stack.clear()

    def _list(self, top: _Dir) -> Iterator[Target]:
        """Targets from ``top``'s listing, streamed; returns at its end or when it pauses. With the
        journal in use, a listing to its end whose every entry was settled is remembered. Regular files,
        most entries, are told first (by the listing's file type: no call of the walk's own for them)."""
        scan, depth, max_depth = self.scan, top.depth + 1, self.max_depth
        files_here = max_depth < 0 or depth <= max_depth
        dirs_here = max_depth < 0 or depth < max_depth
        links = scan.config.links
        files: list[tuple[str, str, os.stat_result]] = []  # regular files listed, asked about together
        memo = top.memo if top.memo is not None else _Unremembered()  # without the journal
        owns = scan.owns if scan._share is not None else None  # split into shares: whose file it is
        reports, stopping = scan.reports, scan.stopping.is_set
        excluded = scan.excluded.names_in(self.path)  # this directory is not excluded: only these names are
        prefix = self.path + "/" if self.path != "/" else "/"
        listing = top.listing
        try:
            for entry in listing:
                if stopping():
                    break
                try:
                    name = entry.name
                    is_file = entry.is_file(follow_symlinks=False)
                    is_dir = not is_file and entry.is_dir(follow_symlinks=False)
                    if not (dirs_here if is_dir else files_here):
                        continue
                    if name in excluded:
                        memo.settled = False
                        if reports:
                            yield scan._skip_excluded(prefix + name)
                        continue
                    if is_file:
                        if owns is not None and not owns(entry.inode()):
                            continue  # another share's file
                        files.append((name, prefix + name, entry.stat(follow_symlinks=False)))
                        if len(files) >= CHUNK:
                            yield from scan._regulars(top.fd, files, self.dev, memo=top.memo)
                            files = []
                    elif is_dir:
                        top.pending.append(name)
                        memo.subdirs.append(name)
                        if len(top.pending) >= PENDING and self._may_pause():
                            memo.settled = False  # the rest of the listing comes later: not remembered
                            yield from scan._regulars(top.fd, files, self.dev, memo=top.memo)
                            return
                    elif entry.is_symlink():
                        if links != "never":
                            memo.settled = False
                            target = self._link(top, name, prefix + name, dirs_here)
                            if target is not None:
                                yield target
                    elif reports:  # FIFO, socket, device: not a file to judge, and never opened
                        memo.settled = False
                        yield scan._skip(prefix + name, NOT_REGULAR, required=False)
                except OSError as exc:
                    memo.settled = False
                    scan._failed(prefix + entry.name, "cannot read", exc)
        except OSError as exc:  # the listing itself failed
            scan._failed(self.path, "cannot list", exc)
            memo.settled = False
        if not stopping():
            if files and self.gather:  # asked about with the next directories' (most hold a few files)
                self.groups.append((os.dup(top.fd), files))
                self.grouped += len(files)
                if self.grouped >= CHUNK:
                    yield from self._flush()
            elif files:
                yield from scan._regulars(top.fd, files, self.dev, memo=top.memo)
            if top.memo is not None and self.recall is not None:
                self.recall.keep(top.dev, top.ino, memo.done(self.path))
        listing.close()
        top.listing = None

    def _flush(self) -> Iterator[Target]:
        """The gathered directories' files, asked about at once; their descriptors closed after."""
        groups, self.groups, self.grouped = self.groups, [], 0
        try:
            yield from self.scan._grouped(groups, self.dev)
        finally:
            for fd, _ in groups:
                os.close(fd)

    def _may_pause(self) -> bool:
        return sum(frame.listing is not None for frame in self.stack) <= PAUSED

    def _link(self, top: _Dir, name: str, path: str, dirs_here: bool) -> Target | None:
        """The target of a link met in ``top``; a link to a directory, with ``links: always``, is kept
        to be walked like a subdirectory."""
        scan = self.scan
        inside = scan.inside if scan.config.links == "inside" else None
        with Lookup(inside, self._known) as lookup:
            try:
                dir_fd, final, st, real = lookup.follow(name, self.real, top.fd)
            except Outside as out:
                log.debug("%s links out of the scan roots to %s; not followed", path, out)
                return None
            except (FileNotFoundError, NotADirectoryError):
                return None  # dangling, or changed meanwhile
            except OSError as exc:
                scan._failed(path, "cannot follow link", exc)
                return None
            if stat.S_ISDIR(st.st_mode):
                if self.follow_dirs and dirs_here:
                    top.pending.append(name)
                return None
            if not stat.S_ISREG(st.st_mode) or scan.excluded(real):
                if not scan.reports:
                    return None
                return scan._skip_excluded(path) if scan.excluded(real) else scan._skip(path, NOT_REGULAR,
                                                                                          required=False)
            if not scan.owns(st.st_ino):
                return None  # the share that owns the file it names judges this name
            return scan._regular(dir_fd, final, path, st, None)

    def _known(self, real: str) -> int | None:
        """The open descriptor of a directory on the current path with canonical path ``real``."""
        for frame in reversed(self.stack[-OPEN_DIRS - 1:]):
            if frame.fd is not None and frame.real_len == len(real) and self.real.startswith(real):
                return frame.fd
            if frame.outer_real is not None:
                break  # below a followed link, canonical paths are no longer prefixes of ours
        return None

    def _enter(self, top: _Dir, name: str) -> None:
        """Descend into the subdirectory ``name`` of ``top`` (a link to one with ``links: always``)."""
        scan = self.scan
        path = join(self.path, name)
        outer = None
        try:
            st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                with Lookup(None, self._known) as lookup:
                    dir_fd, final, st, real = lookup.follow(name, self.real, top.fd)
                    fd = os.open(final, _DIR_FLAGS, dir_fd=dir_fd)
                outer = self.real
            elif stat.S_ISDIR(st.st_mode) and (self.dev is None or st.st_dev == self.dev):
                fd = os.open(name, _DIR_FLAGS, dir_fd=top.fd)
                real = join(self.real, name)
            else:
                return  # another filesystem, or no longer a directory
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            scan._failed(path, "cannot list", exc)
            return
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in self.ancestors or (self.visited is not None and key in self.visited) or (
                    outer is None and self.dev is not None and st.st_dev != self.dev):
                os.close(fd)
                return
            child = self._frame(fd, top.depth + 1, st, path, real, outer)
        except OSError as exc:
            os.close(fd)
            scan._failed(path, "cannot list", exc)
            return
        self.stack.append(child)
        self.ancestors.add(key)
        if self.visited is not None:
            self.visited.add(key)
        self.path, self.real = path, real
        if len(self.stack) > OPEN_DIRS + 1:
            frame = self.stack[-OPEN_DIRS - 2]
            if frame.fd is not None and frame.listing is None and frame is not self.stack[0]:
                os.close(frame.fd)
                frame.fd = None

    def _leave(self) -> None:
        """Done with the top directory: back to its parent, reopening the parent if its descriptor was
        closed (through ``..``, checked to be the same directory; else by its canonical path)."""
        done = self.stack.pop()
        self.ancestors.discard((done.dev, done.ino))
        try:
            if not self.stack:
                return
            parent = self.stack[-1]
            self.path = self.path[:parent.path_len]
            self.real = done.outer_real if done.outer_real is not None else self.real[:parent.real_len]
            if parent.fd is None:
                parent.fd = self._reopen(parent, done.fd)
            if parent.fd is None:
                if self.scan.reports:
                    self.scan.session.report(Outcome(self.scan.id, "failed", target=self.path,
                                                     message="moved during the walk; not walked further"))
                parent.pending.clear()
        finally:
            if done.fd is not None:
                os.close(done.fd)

    def _reopen(self, parent: _Dir, child_fd: int | None) -> int | None:
        attempts = []
        if child_fd is not None:
            attempts.append(lambda: os.open("..", _DIR_FLAGS, dir_fd=child_fd))
        attempts.append(lambda: _open_dir(open_real(self.real)))
        for attempt in attempts:
            try:
                fd = attempt()
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (parent.dev, parent.ino):
                return fd
            os.close(fd)
        return None


def _open_dir(path_fd: int) -> int:
    """A listable descriptor of the directory that the O_PATH descriptor ``path_fd`` holds (closed)."""
    try:
        return os.open(".", _DIR_FLAGS, dir_fd=path_fd)
    finally:
        os.close(path_fd)


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(Dirscan)
