"""Root-safe configuration, as sshd's StrictModes: what steers the scanner must be ours.

elkscan runs as root on hosts where other users have accounts. A pipeline, a rule file, a clamd binary,
a database or a state directory that another user can write lets that user decide what root runs and
what it calls clean. So each such path, every directory above it, and whatever a symbolic link on the
way points to must be owned by root or by the user running elkscan, and be writable by no one else.
A sticky world-writable directory (``/tmp``) is accepted above an entry that is itself trusted: there,
no other user can replace that entry.
"""

from __future__ import annotations

import os
import stat

from .errors import ElkscanError

_MAX_LINKS = 40  # as the kernel's own bound on links followed in one lookup


class UntrustedError(ElkscanError):
    """A path that steers the scanner can be changed by a user other than root or the one running it."""


def _problem(st: os.stat_result, parent_of_trusted: bool, euid: int | None = None) -> str:
    if st.st_uid not in (0, os.geteuid() if euid is None else euid):
        return f"is owned by uid {st.st_uid}"
    writable = 0 if stat.S_ISLNK(st.st_mode) else st.st_mode & 0o022  # a link's own mode means nothing
    if writable and not (parent_of_trusted and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"is {'world' if writable & 0o002 else 'group'}-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def _check_chain(path: str, what: str, links_left: int, parents: set[str]) -> int:
    """Check ``path`` and each directory above it; a link is checked where it lies and where it points.
    ``parents``: directories already found trusted as parents (and not links), which are not checked again."""
    path = os.path.abspath(path)
    parts = [p for p in path.split("/") if p]
    current = "/"
    euid = os.geteuid()
    for depth in range(len(parts) + 1):
        if depth:
            current = os.path.join(current, parts[depth - 1])
        parent = depth < len(parts)
        if parent and current in parents:
            continue
        try:
            st = os.lstat(current)
        except OSError as exc:
            raise UntrustedError(f"{what} {path}: cannot check {current}: {exc.strerror}") from None
        problem = _problem(st, parent, euid)
        if problem:
            shown = path if current == path else f"{current} (above {path})"
            raise UntrustedError(f"{what} {shown} {problem}; another user could change what "
                                 "elkscan trusts: make it owned by root and writable only by its owner "
                                 f"(chown root {current}; chmod go-w {current})")
        if stat.S_ISLNK(st.st_mode):
            if links_left <= 0:
                raise UntrustedError(f"{what} {path}: too many symbolic links")
            target = os.path.join(os.path.dirname(current), os.readlink(current))
            rest = "/".join(parts[depth:])
            return _check_chain(os.path.join(target, rest) if rest else target, what, links_left - 1, parents)
        if parent:
            parents.add(current)
    return links_left


def check_trusted(path: str | os.PathLike, what: str, parents: set[str] | None = None) -> None:
    """Raise ``UntrustedError`` unless ``path`` (``what`` names it: "pipeline", "rule file") and every
    directory above it, links followed, are owned by root or this user and writable by no one else.
    Checks of many paths may share ``parents`` (an empty set to begin with): each directory above them
    is then checked once (248 rule files: 260 lstat calls instead of 1750)."""
    _check_chain(os.fspath(path), what, _MAX_LINKS, set() if parents is None else parents)


def check_trusted_tree(path: str | os.PathLike, what: str) -> None:
    """``check_trusted`` for a directory and everything under it (a rules or database directory)."""
    path = os.fspath(path)
    check_trusted(path, what)
    for directory, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            entry = os.path.join(directory, name)
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                check_trusted(entry, what)
            elif _problem(st, parent_of_trusted=False):
                check_trusted(entry, what)  # raises with the full message
