"""A cgroup of its own, as Elkeid's scanner has: CPU and memory limits the kernel enforces on elkscan and on
every process it starts (the managed clamd), whatever the service around it allows.

The process creates ``elkscan-<pid>`` in each hierarchy holding a controller it needs: cgroup v2, or the
``cpu`` and ``memory`` hierarchies of cgroup v1 (which hybrid hosts use), and moves itself there, every
thread at once; processes it starts later are born there. ``top`` puts it at the top of the hierarchy, as
Elkeid does (out of the service's cgroup and its limits), else below the cgroup it was started in.
``leave()`` moves it back and removes what it made. Root-safe: it writes in no cgroup directory that
another user owns or can write, and a concurrent instance (another pid namespace) gets another name.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass

from .trust import UntrustedError, check_trusted

log = logging.getLogger("elkscan.governor")

PERIOD_US = 100_000  # the CPU period, Elkeid's and the kernel's default
_STALE_AFTER = 60.0  # seconds: an empty elkscan-* cgroup this old was left by an instance that died
_LEAF = re.compile(r"elkscan-\d+(\.\d+)?")
_NAME_TRIES = 8


class NoCgroup(Exception):
    """The process cannot be confined here; the message says why."""


@dataclass
class Place:
    """The process in one hierarchy: the cgroup it came from (``home``), the one it creates its own in
    (``parent``), its own (``leaf``), and the one it goes back to when it leaves (``back``)."""

    version: int
    controllers: frozenset
    home: str
    parent: str
    leaf: str = ""
    back: str = ""
    entered: bool = False


def _unescape(field: str) -> str:
    """A mountinfo field: spaces, tabs, newlines and backslashes come as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, set[str], str, str]]:
    """(fstype, super options, root in the hierarchy, mount point) of each cgroup mount in a
    /proc/<pid>/mountinfo text, in mount order; ValueError when a line is not one."""
    mounts = []
    for line in text.splitlines():
        left, dash, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not dash or len(fields) < 5 or len(after) < 3:
            raise ValueError(f"not a mountinfo line: {line[:80]!r}")
        if after[0] in ("cgroup", "cgroup2"):
            mounts.append((after[0], set(after[2].split(",")), _unescape(fields[3]), _unescape(fields[4])))
    return mounts


def parse_cgroup(text: str) -> dict[str, str]:
    """A /proc/<pid>/cgroup text: controller -> the process's cgroup path ("" for v2); ValueError when a
    line is not ``id:controllers:path``."""
    member = {}
    for line in text.splitlines():
        _id, controllers, path = line.split(":", 2)
        if not _id.isdigit() or not path.startswith("/"):
            raise ValueError(f"not a /proc/<pid>/cgroup line: {line[:80]!r}")
        for controller in controllers.split(",") if controllers else [""]:
            member[controller] = path
    return member


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _directory(mount_point: str, mount_root: str, path: str) -> str | None:
    """Where the cgroup ``path`` of a hierarchy is under a mount of it; None when outside the mount."""
    if ".." in path.split("/"):
        return None  # a cgroup outside this cgroup namespace's view
    if mount_root != "/":
        if path != mount_root and not path.startswith(mount_root + "/"):
            return None
        path = path[len(mount_root):]
    return os.path.normpath(os.path.join(mount_point, path.lstrip("/")))


def _names(controllers) -> str:
    return " and ".join(sorted(controllers))


def _find(mounts, fstype: str, controller: str, path: str | None) -> tuple[str, str] | None:
    """(mount point, the process's cgroup directory there) in the last mount of that kind holding
    ``controller`` ("" for v2) under which the process's ``path`` lies; None when there is none."""
    if path is None:
        return None
    for kind, options, root, point in reversed(mounts):  # the last mount on a point hides the others
        directory = _directory(point, root, path)
        if kind == fstype and (not controller or controller in options) and directory:
            return point, directory
    return None


def locate(wanted: set[str], top: bool) -> list[Place]:
    """Where the process can have each wanted controller: cgroup v2 when it offers it there, else the v1
    hierarchy holding it. Raises NoCgroup naming what is missing."""
    try:
        member, mounts = parse_cgroup(_read("/proc/self/cgroup")), parse_mountinfo(_read("/proc/self/mountinfo"))
    except (OSError, ValueError) as exc:
        raise NoCgroup(f"cannot read the process's cgroups: {getattr(exc, 'strerror', None) or exc}") from None
    places: dict[str, Place] = {}  # by mount point
    left, reasons = set(wanted), []
    v2 = _find(mounts, "cgroup2", "", member.get(""))
    if v2 is None:
        reasons.append("no cgroup v2 hierarchy")
    else:
        point, home = v2
        parent = point if top else home
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                offered = left & set(f.read().split())
        except OSError as exc:
            raise NoCgroup(f"cannot read {parent}/cgroup.controllers: {exc.strerror}") from None
        if offered:
            places[point] = Place(2, frozenset(offered), home, parent)
            left -= offered
        if left:
            reasons.append(f"cgroup v2 {parent} does not offer {_names(left)}")
    for controller in sorted(left):
        v1 = _find(mounts, "cgroup", controller, member.get(controller))
        if v1 is None:
            reasons.append(f"no cgroup v1 hierarchy has {controller}")
            continue
        point, home = v1
        if point in places:  # co-mounted with a controller already placed (cpu,memory)
            places[point].controllers |= {controller}
        else:
            places[point] = Place(1, frozenset({controller}), home, point if top else home)
    if left - {c for p in places.values() for c in p.controllers}:
        raise NoCgroup("; ".join(reasons))
    return list(places.values())


class Cgroup:
    """This process, confined in cgroups of its own (one per hierarchy)."""

    def __init__(self, places: list[Place], name: str) -> None:
        self.places, self.name = places, name
        self.controllers = frozenset().union(*(p.controllers for p in places))

    def __str__(self) -> str:
        versions = "/".join(sorted({f"v{p.version}" for p in self.places}))
        dirs = ", ".join(f"{_names(p.controllers)}: {p.leaf}" for p in self.places)
        return f"cgroup {versions} {self.name} ({dirs})"

    @classmethod
    def enter(cls, cpu: float | None, memory: int | None, top: bool = False) -> Cgroup:
        """Move this process into cgroups of its own limited to ``cpu`` (a share of one CPU) and ``memory``
        (bytes); NoCgroup says why not."""
        wanted = {name for name, limit in (("cpu", cpu), ("memory", memory)) if limit}
        places = locate(wanted, top)
        for place in places:
            try:
                check_trusted(place.parent, "cgroup")
            except UntrustedError as exc:
                raise NoCgroup(str(exc)) from None
            place.back = place.home if _trusted(place.home) else place.parent
        cgroup = cls(places, "")
        try:
            for place in places:
                _sweep(place.parent)
                if place.version == 2:
                    _write(os.path.join(place.parent, "cgroup.subtree_control"),
                           " ".join(f"+{c}" for c in sorted(place.controllers)))
            cgroup.name = _make_leaves(places)
            if cpu:
                cgroup.set_cpu(cpu)
            if memory:
                cgroup.set_memory(memory)
            for place in places:
                _write(os.path.join(place.leaf, "cgroup.procs"), str(os.getpid()))
                place.entered = True
        except OSError as exc:
            if cgroup.name:
                cgroup.leave()
            raise NoCgroup(f"cannot write {exc.filename}: {exc.strerror}{_hint(exc)}") from None
        return cgroup

    def set_cpu(self, share: float | None) -> None:
        """The CPU limit, a share of one CPU per 100 ms (None: none); OSError when the kernel refuses it."""
        quota = max(1000, round(share * PERIOD_US)) if share else None
        for place in self._holding("cpu"):
            if place.version == 2:
                _write(os.path.join(place.leaf, "cpu.max"), f"{quota or 'max'} {PERIOD_US}")
            else:
                _write(os.path.join(place.leaf, "cpu.cfs_period_us"), str(PERIOD_US))
                _write(os.path.join(place.leaf, "cpu.cfs_quota_us"), str(quota or -1))

    def set_memory(self, limit: int | None) -> None:
        """The hard memory limit in bytes (None: none); OSError when the kernel refuses it (v1: below what
        the cgroup uses and cannot reclaim)."""
        for place in self._holding("memory"):
            name = "memory.max" if place.version == 2 else "memory.limit_in_bytes"
            _write(os.path.join(place.leaf, name), str(limit) if limit else ("max" if place.version == 2 else "-1"))

    def leave(self) -> None:
        """Move back to where the process came from and remove its own cgroups."""
        for place in self.places:
            if not place.entered:
                continue
            try:
                _write(os.path.join(place.back, "cgroup.procs"), str(os.getpid()))
                place.entered = False
            except OSError as exc:
                log.info("cannot move back to %s: %s", place.back, exc.strerror)
        for place in self.places:
            if place.leaf:
                _remove(place.leaf)

    def _holding(self, controller: str) -> list[Place]:
        return [p for p in self.places if controller in p.controllers]


def _hint(exc: OSError) -> str:
    """What the kernel means by the errors it gives when the place is wrong."""
    name = os.path.basename(str(exc.filename))
    if exc.errno == errno.EBUSY and name == "cgroup.subtree_control":
        return (" (it holds processes, and cgroup v2 gives a cgroup with processes no controllers below it; "
                "cgroup: top avoids it)")
    if exc.errno == errno.EINVAL and name == "cpu.cfs_quota_us":
        return " (more CPU than a cgroup above allows; cgroup: top leaves it)"
    return ""


def _trusted(path: str) -> bool:
    try:
        check_trusted(path, "cgroup")
    except UntrustedError:
        return False
    return True


def _make_leaves(places: list[Place]) -> str:
    """Create a cgroup of the same new name in each place: ``elkscan-<pid>``, or ``.1``, ``.2``... when that
    is taken (an instance with the same pid in another pid namespace). Never joins an existing one."""
    pid = os.getpid()
    for attempt in range(_NAME_TRIES):
        name = f"elkscan-{pid}" + (f".{attempt}" if attempt else "")
        made = []
        try:
            for place in places:
                os.mkdir(os.path.join(place.parent, name))
                made.append(place)
        except FileExistsError:
            for place in made:
                _remove(os.path.join(place.parent, name))
            continue
        except OSError:
            for place in made:
                _remove(os.path.join(place.parent, name))
            raise
        for place in places:
            place.leaf = os.path.join(place.parent, name)
        return name
    raise OSError(errno.EEXIST, f"elkscan-{pid} to elkscan-{pid}.{_NAME_TRIES - 1} all exist",
                  os.path.join(places[0].parent, f"elkscan-{pid}"))


def _sweep(parent: str) -> None:
    """Remove the empty elkscan cgroups an instance that died (OOM-killed, SIGKILL) left in ``parent``; one
    in use is never removed (the kernel refuses to remove a cgroup holding a process)."""
    try:
        names = [n for n in os.listdir(parent) if _LEAF.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            if time.time() - os.stat(path).st_ctime < _STALE_AFTER:
                continue  # maybe an instance between creating it and moving in
            os.rmdir(path)
        except OSError:
            continue
        log.info("removed %s, left by an elkscan that ended without leaving it", path)


def _remove(path: str, wait: float = 2.0) -> None:
    """rmdir a cgroup; a process that just left it (clamd being reaped) may hold it for a moment."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.info("cgroup %s not removed: %s", path, exc.strerror)
                return
            time.sleep(0.05)


def _write(path: str, text: str) -> None:
    """Write a cgroup file (never creating one); an error names the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)
