"""Decisions on one event, without I/O: Elkeid's skip lists and whitelists, its rate limit, and which
written files on-access scanning sends to the engines."""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Iterable

from elkscan_core.paths import under

#: Editor, shell and package-manager temporary names Elkeid never reports.
SKIP_SUFFIXES = (".swp", ".swa", ".svz", ".swn", ".swo", ".tmp", ".tmpx", ".bash_history", ".viminfo",
                 ".dpkg-new", "(deleted)")
SKIP_PATHS = ("/etc/ld.so.cache~",)
EXE_WHITELIST = ("/usr/bin/juno", "/usr/bin/bpfd", "/usr/bin/systemd-detect-virt", "/usr/sbin/qemu-ga",
                 "/usr/libexec/pk-command-not-found", "/bin/touch", "/sbin/ipset", "/sbin/audisp-mu",
                 "/lib/systemd/systemd", "/lib/systemd/systemd-journald")
ARGV_WHITELIST = ("yum repolist",)


class FileEventFilter:
    """Elkeid's per-event skips: temp names, whitelisted writers (exact exe, exact 256-byte argv)."""

    def __init__(self, skip_suffixes: Iterable[str], skip_paths: Iterable[str],
                 exe_whitelist: Iterable[str], argv_whitelist: Iterable[str]) -> None:
        self.skip_suffixes = tuple(skip_suffixes)
        self.skip_paths = frozenset(skip_paths)
        self.exe_whitelist = frozenset(exe_whitelist)
        self.argv_whitelist = frozenset(argv_whitelist)

    def skipped_name(self, path: str) -> bool:
        return path in self.skip_paths or path.endswith(self.skip_suffixes)

    def whitelisted(self, exe: str | None, argv: str) -> bool:
        return (exe is not None and exe in self.exe_whitelist) or argv in self.argv_whitelist


class RateLimit:
    """At most ``events`` per ``window`` seconds (Elkeid: 10 per 5 s); ``events`` 0 means no limit.
    A fixed window as Elkeid's, so the configured rate means the same thing in both."""

    def __init__(self, events: int, window: float, clock=time.monotonic) -> None:
        self.events, self.window, self.clock = events, window, clock
        self.started, self.count = clock(), 0

    def allow(self) -> bool:
        if self.events <= 0:
            return True
        now = self.clock()
        if now - self.started >= self.window:
            self.started, self.count = now, 0
        if self.count >= self.events:
            return False
        self.count += 1
        return True


def is_glob(pattern: str) -> bool:
    """Whether a path pattern has shell wildcards."""
    return any(c in pattern for c in "*?[")


def _glob_base(pattern: str) -> str:
    """The directory a glob's matches live under: its components before the first wildcard."""
    parts = []
    for part in pattern.split("/")[:-1]:
        if is_glob(part):
            break
        parts.append(part)
    return "/".join(parts) or "/"


class ScanPolicy:
    """Which written files are scanned on access: web scripts (by extension) under web roots, any
    file under download/temporary directories, and any path matching an extra glob."""

    def __init__(self, web_roots: Iterable[str], extensions: Iterable[str], downloads: Iterable[str],
                 globs: Iterable[str]) -> None:
        self.web_roots = tuple(web_roots)
        self.extensions = frozenset("." + e.lower().lstrip(".") for e in extensions)
        self.downloads = tuple(downloads)
        self.globs = tuple(globs)

    @property
    def roots(self) -> tuple[str, ...]:
        """Directories whose trees hold what this policy wants (where marks are needed)."""
        return self.web_roots + self.downloads + tuple(_glob_base(g) for g in self.globs)

    def wants(self, path: str) -> bool:
        if any(under(path, root) for root in self.downloads) or self.wants_script(path):
            return True
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.globs)

    def wants_script(self, path: str) -> bool:
        """A web script (by extension) under a web root."""
        return (os.path.splitext(path)[1].lower() in self.extensions
                and any(under(path, root) for root in self.web_roots))
