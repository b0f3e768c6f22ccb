"""Cgroups for the tests, on whatever the host has (tests/test_cgroup.py, the Elkeid agent tests): which
hierarchies hold cpu and memory, a cgroup like a service's to start a process in, and the cgroup
namespace that makes "the top of the hierarchy" a cgroup the test owns. Imported by path (the tests are
collected with --import-mode=importlib)."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from pathlib import Path


def cgroups(path: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> cgroup path ("" for v2), as /proc/<pid>/cgroup says; named hierarchies left out."""
    seen = {}
    with open(path) as f:
        for line in f:
            _, controllers, where = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                if not controller.startswith("name="):
                    seen[controller] = where
    return seen


def mount_points() -> dict[str, str]:
    """controller ("" for v2) -> where its hierarchy is mounted (the last mount wins)."""
    points = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split()[:3]
            if fstype == "cgroup2":
                points[""] = left.split()[4]
            elif fstype == "cgroup":
                for option in options.split(","):
                    points[option] = left.split()[4]
    return points


def host() -> str:
    """'v2' when the cgroup v2 hierarchy offers cpu and memory, 'v1' when both are mounted as cgroup v1
    hierarchies (hybrid hosts), '' when neither."""
    points = mount_points()
    if "" in points:
        with open(os.path.join(points[""], "cgroup.controllers")) as f:
            if {"cpu", "memory"} <= set(f.read().split()):
                return "v2"
    return "v1" if {"cpu", "memory"} <= set(points) else ""


HOST = host()
#: the hierarchies a confined process is in: v2's (""), or v1's cpu and memory
KEYS = [""] if HOST == "v2" else ["cpu", "memory"]
#: cgroup v2 lets no cgroup holding processes (the test's) have controllers below it: there, the tests
#: confine at the top of the hierarchy
BELOW = "top" if HOST == "v2" else True


def limit_files(cpu: str, memory: str) -> dict[str, str]:
    if HOST == "v2":
        return {"cpu.max": f"{cpu} 100000", "memory.max": memory}
    return {"cpu.cfs_quota_us": cpu, "cpu.cfs_period_us": "100000", "memory.limit_in_bytes": memory}


def homes() -> dict[str, str]:
    """key -> the directory of this process's cgroup there."""
    member, points = cgroups(), mount_points()
    return {key: os.path.join(points[key], member[key].lstrip("/")) for key in KEYS}


def tops() -> dict[str, str]:
    points = mount_points()
    return {key: points[key] for key in KEYS}


def remount(key: str) -> str:
    """Shell: mount the v1 hierarchy of ``key`` again where it is, so that in a new cgroup namespace it
    shows that namespace's root as its top."""
    point = mount_points()[key]
    with open("/proc/self/mountinfo") as f:
        options = next(line.partition(" - ")[2].split()[2] for line in f
                       if line.split()[4] == point and " - cgroup " in line)
    with open("/proc/cgroups") as f:
        known = {row.split()[0] for row in f if not row.startswith("#")}
    wanted = ",".join(o for o in options.split(",") if o in known or o.startswith("name="))
    return f"umount {point} && mount -t cgroup -o {wanted} cgroup {point}"


@contextlib.contextmanager
def service(owner: int = 0):
    """A cgroup like the Elkeid agent's unit (MemoryMax=250M, CPUQuota=10%), owned by ``owner``: below this
    test's cgroups on v1, at the top of the hierarchy on v2. Yields key -> its directory."""
    name = f"svc-{os.getpid()}"
    made = {}
    try:
        for key, parent in (homes() if HOST == "v1" else tops()).items():
            path = made[key] = os.path.join(parent, name)
            os.mkdir(path)
            for file, value in limit_files("10000", str(250 * 10**6)).items():
                if os.path.exists(os.path.join(path, file)):
                    Path(path, file).write_text(value)
            if owner:  # delegated, as systemd and container managers do it
                for file in ("", "cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"):
                    if os.path.exists(os.path.join(path, file)):
                        os.chown(os.path.join(path, file), owner, -1)
        yield made
    finally:
        for path in made.values():
            remove(path)


def enter(made: dict[str, str]) -> str:
    """Shell: move this shell into the cgroups ``made``."""
    return "\n".join(f"echo $$ > {shlex.quote(path)}/cgroup.procs" for path in made.values())


def enter_below_top(made: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """(shell, prefix) running a child in the service with the service's parent as the top of its
    hierarchies: on v1 a cgroup namespace rooted at this test's cgroups (so "the top" is still inside
    them), the hierarchies mounted again to show it; on v2 the service is at the top already."""
    if HOST == "v2":
        return enter(made), ()
    points = mount_points()
    moves = "\n".join(f"echo $$ > {shlex.quote(points[key])}/{os.path.basename(path)}/cgroup.procs"
                      for key, path in made.items())
    return "\n".join([remount(key) for key in made] + [moves]), (
        "unshare", "--cgroup", "--mount", "--propagation", "private", "--")


def remove(path: str) -> None:
    """rmdir a test's cgroup, ending what still runs in it."""
    deadline = time.monotonic() + 10
    while os.path.exists(path):
        for pid in Path(path, "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        try:
            os.rmdir(path)
        except OSError:
            assert time.monotonic() < deadline, f"{path} cannot be removed"
            time.sleep(0.05)


