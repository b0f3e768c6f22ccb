"""Where to put marks: Elkeid's monitored directories, the same inside container root filesystems,
and the default web roots and download directories of on-access scanning."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from .policy import is_glob

#: Elkeid 2.x ``settings.toml``: direct children of these directories are monitored.
ELKEID_DIRECTORIES = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")

#: Elkeid 2.0's longer list (configuration, persistence and key directories; docs/elkeid-protocol.md
#: section 6).
ELKEID_2_0_DIRECTORIES = ELKEID_DIRECTORIES + (
    "/etc", "/etc/cron.d", "/etc/cron.hourly", "/etc/cron.daily", "/etc/cron.weekly", "/etc/cron.monthly",
    "/var/spool/cron", "/var/spool/cron/crontabs", "/etc/init.d", "/etc/systemd/system",
    "/lib/systemd/system", "/etc/profile.d", "/etc/ssh", "/root/.ssh", "/home/*/.ssh", "/dev/shm",
)

PROFILES = {"elkeid": ELKEID_DIRECTORIES, "elkeid-2.0": ELKEID_2_0_DIRECTORIES, "none": ()}

WEB_ROOTS = ("/var/www", "/srv/www", "/usr/share/nginx")
WEB_EXTENSIONS = ("php", "phtml", "php5", "jsp", "jspx", "asp", "aspx", "ashx")
DOWNLOAD_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def container_roots(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Root filesystems of running containers: Docker's overlay ``…/merged`` and containerd's
    ``…/rootfs`` mount points, as Elkeid finds them."""
    roots = []
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
    except OSError:
        return roots
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point.endswith("/merged") or point.endswith("/rootfs"):
            roots.append(point)
    return roots


def expand(patterns: Iterable[str], roots: Iterable[str] = ()) -> list[str]:
    """Existing real directories for ``patterns`` (shell globs allowed), on the host and under each
    container root; duplicates (``/bin`` -> ``/usr/bin``) appear once."""
    found: dict[str, None] = {}
    prefixes = ["", *roots]
    for prefix in prefixes:
        for pattern in patterns:
            for path in glob.glob(prefix + pattern) if is_glob(pattern) else [prefix + pattern]:
                real = os.path.realpath(path)
                if prefix and not real.startswith(prefix.rstrip("/") + "/"):
                    continue  # a container's absolute symlink points at the host: not ours to mark
                if os.path.isdir(real):
                    found[real] = None
    return list(found)
