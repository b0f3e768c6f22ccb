"""Each file judged once per pass: a walk that meets a file again under another name (a hard link, or a
symlink inside the roots) reports that name with the verdict the file already has.

A source that walks makes one ``Pass`` per walk and gives it to its targets (``Target.once``). The
session asks it before the engines read a file: the first name of a file is judged; a name met while the
first is still being judged waits for it; a name met later takes the verdicts of the engines whose
verdicts do not depend on the name, and the others (``Engine.path_dependent``) judge it under its own
name. Only verdicts that are safe to share are kept: every such engine found the file clean, or one
vouched for it (known good). A file with detections or errors, or one an engine did not read, is judged
again under each name.

A file is known by its device and inode, and its ctime must not have moved (any write, truncation, chmod
or rename moves it): a file changed between two of its names is judged again. About 140 bytes a file
(8 MB of RSS for 60,000, measured), freed when the pass ends. A walk that follows no links keeps only files with more than
one hard link: no other file can be met twice.
"""

from __future__ import annotations

import os
import threading
from typing import Any

#: What a pass keeps of a file's verdict: every name-independent engine found it clean, or (``n`` > 0)
#: the engine at index ``n - 1`` vouched for it (the ones before it found it clean, the ones after it
#: were not needed).
CLEAN = 0


def identity(st: os.stat_result) -> int:
    """The file, exactly: its device and inode."""
    return st.st_dev << 64 | st.st_ino


class Pass:
    """The files one walk has judged and the names waiting for a file being judged; thread-safe."""

    def __init__(self, every_file: bool = True) -> None:
        self._every = every_file  # False: only files with other hard links can be met again
        self._lock = threading.Lock()
        self._done: dict[int, int] = {}  # identity -> ctime_ns << 8 | code
        self._busy: dict[int, list[Any] | None] = {}  # identity -> names waiting for the name being judged

    def claim(self, st: os.stat_result, waiter: Any) -> tuple[str, int | None]:
        """Before judging a name of the file ``st`` describes: ("judge", None) for its first name (then
        ``publish``), ("shared", code) when its verdict is kept, ("wait", None) while another name is
        being judged: ``publish`` hands ``waiter`` back then."""
        if not self._every and st.st_nlink < 2:
            return "judge", None
        key = identity(st)
        with self._lock:
            code = self._code(key, st)
            if code is not None:
                return "shared", code
            if key not in self._busy:
                self._busy[key] = None
                return "judge", None
            self._busy[key] = (self._busy[key] or []) + [waiter]  # rare: two names in flight at once
            return "wait", None

    def publish(self, st: os.stat_result, code: int | None) -> list[Any]:
        """The first name's verdict (None: not to be shared); returns the names that waited for it."""
        if not self._every and st.st_nlink < 2:
            return []
        key = identity(st)
        with self._lock:
            if code is not None:
                self._done[key] = st.st_ctime_ns << 8 | code
            return self._busy.pop(key, None) or []

    def remember(self, st: os.stat_result, code: int) -> bool:
        """Keep a verdict had without judging (the verdict cache's); False when the file has one already
        in this pass, or is being judged under another name (this name is another name of it)."""
        if not self._every and st.st_nlink < 2:
            return True
        key = identity(st)
        with self._lock:
            if key in self._busy or self._code(key, st) is not None:
                return False
            self._done[key] = st.st_ctime_ns << 8 | code
            return True

    def remember_all(self, stats: list[os.stat_result], code: int = CLEAN) -> tuple[int, int]:
        """``remember`` for several files (a directory's known clean ones): how many were new to this
        pass, and their size in bytes."""
        remember, every = self.remember, self._every
        counted = size = 0
        for st in stats:
            if (not every and st.st_nlink < 2) or remember(st, code):
                counted += 1
                size += st.st_size
        return counted, size

    def _code(self, key: int, st: os.stat_result) -> int | None:
        kept = self._done.get(key)
        if kept is None or kept >> 8 != st.st_ctime_ns:
            return None
        return kept & 0xFF
