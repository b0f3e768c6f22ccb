"""Path rules shared by sources: Elkeid's default scan roots and filter list, and prefix matching by
whole path components (Elkeid matches raw string prefixes, so its ``/dev`` filter also drops
``/devices``; elkscan does not, see docs/pipeline.md)."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable

#: Elkeid's periodic scan directories and maximum depths (root = depth 0).
ELKEID_ROOTS: dict[str, int] = {
    "/root": 3, "/home": 3, "/bin": 2, "/sbin": 2, "/usr/bin": 2, "/usr/sbin": 2, "/usr/local": 3,
    "/lib/systemd/system": 1, "/etc": 2, "/var/www": 12,
}

#: Elkeid's filter prefixes (skipped with everything below them), plus the agent's plugin directory.
ELKEID_EXCLUDES: tuple[str, ...] = (
    "/root/.debug", "/root/.vscode", "/root/.bash_history", "/usr/bin/killall", "/usr/bin/virt",
    "/usr/bin/upx", "/usr/bin/fim", "/usr/bin/nc", "/usr/bin/inputattach", "/usr/bin/clamdscan",
    "/usr/bin/clamconf", "/usr/bin/sigtool", "/usr/bin/clamdtop", "/usr/bin/clamsubmit",
    "/usr/bin/clambc", "/usr/bin/clamscan", "/usr/sbin/clamd", "/usr/sbin/clamonacc", "/bin/nc",
    "/bin/netcat", "/bin/upx", "/etc/alternatives/upx", "/etc/alternatives/nc",
    "/etc/alternatives/netcat", "/etc/dictionaries-common/words", "/dev", "/boot", "/sys", "/usr/src",
    "/usr/local/src", "/etc/elkeid/plugin",
)


def under(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or inside it, comparing whole components."""
    prefix = prefix.rstrip("/") or "/"
    return path == prefix or path.startswith(prefix if prefix == "/" else prefix + "/")


class PathFilter:
    """Answers 'is this path excluded?' for a set of prefixes, by whole components, with one regular
    expression (it runs for every directory entry of a walk)."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self.prefixes = tuple(p.rstrip("/") or "/" for p in prefixes)
        if "/" in self.prefixes:
            self._match = lambda path: True
        elif self.prefixes:
            alternatives = "|".join(re.escape(p) for p in self.prefixes)
            self._match = re.compile(f"(?:{alternatives})(?:/|$)").match
        else:
            self._match = lambda path: False
        names: dict[str, set[str]] = {}
        for prefix in self.prefixes:
            parent, _, name = prefix.rpartition("/")
            names.setdefault(parent or "/", set()).add(name)
        self._names = {parent: frozenset(each) for parent, each in names.items()}

    def __call__(self, path: str) -> bool:
        return bool(self._match(path))

    def names_in(self, directory: str) -> frozenset[str]:
        """The names of the entries of ``directory`` that are excluded, for a directory that is not
        excluded itself (so only a prefix naming one of its entries can match): a walk asks once a
        directory instead of matching every entry's path."""
        return self._names.get(directory, _NONE)


_NONE: frozenset[str] = frozenset()


#: An O_PATH descriptor of the entry itself, never of what a link names, and no open() side effects.
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: Links followed in one look-up before giving up with ELOOP, as the kernel does.
MAX_LINKS = 40


class Outside(Exception):
    """A link, or the object it names, lies outside the scan roots: it is not followed."""


def join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory != "/" else f"/{name}"


def open_real(real: str) -> int:
    """An O_PATH descriptor of the directory at the canonical path ``real``, reached one component at a
    time without following any link: a path recorded as canonical still names those directories, or
    the open fails (ENOTDIR, ENOENT)."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in real.split("/"):
            if part:
                child = os.open(part, PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parts(path: str) -> list[str]:
    """The components of ``path`` as a stack (the first one last); a trailing ``/`` becomes ``.``, which
    asks for a directory as the kernel does."""
    parts = path.split("/")
    if len(parts) > 1 and not parts[-1]:
        parts[-1] = "."
    return [p for p in reversed(parts) if p]


class Lookup:
    """Resolves a path as the kernel would, but one component at a time, relative to directory
    descriptors and with ``O_NOFOLLOW``: every link on the way is read here (from the very object that
    was opened), checked with ``inside`` when given, and expanded; nothing is resolved by name twice.
    The result is a directory descriptor and a name in it that is not a link, so the caller opens
    exactly the object that was checked. ``known(real)`` may lend an open descriptor of a directory by
    its canonical path (a walk's current path); other directories are opened from ``/``. A ``with``
    block closes the one descriptor a look-up holds."""

    def __init__(self, inside: Callable[[str], bool] | None = None,
                 known: Callable[[str], int | None] = lambda real: None) -> None:
        self.inside, self.known = inside, known
        self._owned: int | None = None

    def __enter__(self) -> Lookup:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hold(None)

    def _hold(self, fd: int | None) -> None:
        """Keep ``fd`` (opened here) as the current directory, closing the previous one."""
        if self._owned is not None:
            os.close(self._owned)
        self._owned = fd

    def _directory(self, real: str) -> int:
        fd = self.known(real)
        if fd is None:
            fd = open_real(real)
            self._hold(fd)
        return fd

    def _check(self, real: str) -> None:
        if self.inside is not None and not self.inside(real):
            raise Outside(real)

    def follow(self, path: str, real: str = "/", fd: int | None = None) -> tuple[int, str, os.stat_result, str]:
        """What ``path`` names, relative to the directory ``real`` (open as ``fd``, or None) unless it
        is absolute: ``(directory fd, name, lstat, canonical path)``; the name is ``.`` when the path
        ends on a directory reached by ``..`` or names the start itself. Raises ``Outside`` when a link
        on the way or the result is not ``inside``, OSError otherwise (ELOOP after MAX_LINKS links)."""
        todo = _parts(path)
        if path.startswith("/"):
            real, fd = "/", None
        links = 0
        while todo:
            part = todo.pop()
            if part == ".":  # we stand on a directory: only a file before a "." fails (ENOTDIR below)
                continue
            if part == "..":
                real, fd = os.path.dirname(real), None
                continue
            if fd is None:
                fd = self._directory(real)
            entry = os.open(part, PATH_FLAGS, dir_fd=fd)
            try:
                st = os.fstat(entry)
                text = os.readlink("", dir_fd=entry) if stat.S_ISLNK(st.st_mode) else None
            except BaseException:
                os.close(entry)
                raise
            here = join(real, part)
            if text is not None:
                os.close(entry)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), here)
                self._check(real)
                todo.extend(_parts(text))
                if text.startswith("/"):
                    real, fd = "/", None
                continue
            if not todo or not stat.S_ISDIR(st.st_mode):
                os.close(entry)
                if todo:
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), here)
                self._check(here)
                return fd, part, st, here
            self._hold(entry)
            real, fd = here, entry
        if fd is None:
            fd = self._directory(real)
        self._check(real)
        return fd, ".", os.fstat(fd), real
