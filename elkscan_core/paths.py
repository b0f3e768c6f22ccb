"""Path rules shared by sources: Elkeid's default scan roots and filter list, and prefix matching by
whole path components (Elkeid matches raw string prefixes, so its ``/dev`` filter also drops
``/devices``; elkscan does not, see docs/pipeline.md)."""

from __future__ import annotations

import re
from collections.abc import Iterable

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

    def __call__(self, path: str) -> bool:
        return bool(self._match(path))
