"""Run by tests/test_cgroup.py in a child process (a test must not move pytest itself into a cgroup): a
real session over a directory, with the limits given, printing as JSON what the kernel says about the
cgroups of its threads, of the processes it started and of itself before, during and after.

Usage: python cgroup_child.py '{"tree": DIR, "limits": {...}, "clamav_db": DIR or null, "budget": bool,
"stale_after": seconds}'
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import elkscan_core.cgroup
from cgroup_helpers import cgroups, mount_points  # beside this file
from elkscan_core import Engine, Job, Source, Target, hookimpl
from elkscan_core.testing import run

LIMIT_FILES = ("cpu.max", "memory.max", "cpu.cfs_quota_us", "cpu.cfs_period_us", "memory.limit_in_bytes")


def limits_in_force() -> dict[str, str]:
    """The limit files of the cgroups this process is in now, for cpu and memory (v1 or v2)."""
    member, points = cgroups(), mount_points()
    found = {}
    for controller in ("", "cpu", "memory"):
        if controller in member and controller in points:
            directory = os.path.join(points[controller], member[controller].lstrip("/"))
            for name in LIMIT_FILES:
                if name.split(".")[0] == (controller or name.split(".")[0]):
                    try:
                        with open(os.path.join(directory, name)) as f:
                            found[name] = f.read().strip()
                    except OSError:
                        pass
    return found


def children(comm: str) -> list[int]:
    """This process's children named ``comm``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name == comm and int(rest[1]) == os.getpid():
            pids.append(int(entry))
    return pids


class Observer(Engine):
    """On its first file: the cgroups of every thread, of a process it starts, and of clamd."""

    id = "observer"

    def start(self):
        self.seen = None

    def scan(self, subject):
        if self.seen is None:
            helper = subprocess.run(["cat", "/proc/self/cgroup"], capture_output=True, text=True, check=True)
            child = {}
            for line in helper.stdout.splitlines():
                _, controllers, where = line.split(":", 2)
                child.update({c: where for c in (controllers.split(",") if controllers else [""])})
            self.seen = {
                "threads": {tid: cgroups(f"/proc/self/task/{tid}/cgroup") for tid in os.listdir("/proc/self/task")},
                "child": child,
                "clamd": [cgroups(f"/proc/{pid}/cgroup") for pid in children("clamd")],
                "limits": limits_in_force(),
            }
        return []


class Tree(Source):
    """The tree's files as one job; with ``budget``, first an Elkeid 6057's budget (20 % of a CPU,
    512 MiB), put back to the pipeline's once the job is done, the limits read at each step."""

    id = "tree"
    budget = False
    steps: dict = {}

    def targets(self):
        governor, limits = self.session.governor, self.session.pipeline.limits
        if self.budget:
            governor.set_cpu(0.2)
            governor.set_memory(512 * 2**20)
            Tree.steps["task"] = limits_in_force()
        job = Job(token="t")
        for name in sorted(os.listdir(self.session.resolve_path("."))):
            yield Target(path=self.session.resolve_path(name), origin=self.id, job=job)
        job.wait(timeout=60)
        if self.budget:
            governor.set_cpu(limits.cpu)
            governor.set_memory(limits.memory)
            Tree.steps["restored"] = limits_in_force()


class Components:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Observer)

    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Tree)


class Remember(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def main(config: dict) -> None:
    if "stale_after" in config:  # the age at which an empty leftover is removed (60 s)
        elkscan_core.cgroup._STALE_AFTER = config["stale_after"]
    log = Remember()
    logging.getLogger("elkscan").addHandler(log)
    logging.getLogger("elkscan").setLevel(logging.INFO)
    ready = threading.Event()
    early = threading.Thread(target=ready.wait, daemon=True)  # a thread started before the session
    early.start()
    Tree.budget = config.get("budget", False)
    engines = [{"use": "observer"}]
    plugins = []
    if config.get("clamav_db"):
        plugins = ["clamav_backend"]
        engines.append({"use": "clamav", "with": {"managed": True, "database": config["clamav_db"]}})
    before = cgroups()
    result = run({"plugins": plugins, "sources": [{"use": "tree"}], "engines": engines,
                  "limits": config["limits"]}, extra_plugins=[Components()], base_dir=config["tree"])
    ready.set()
    observer = next(e for e in result.session.engines if e.id == "observer")
    print(json.dumps({"pid": os.getpid(), "before": before, "during": observer.seen, "after": cgroups(),
                      "steps": Tree.steps, "early": early.native_id, "files": result.summary.files, "logs": log.lines,
                      "throttled": result.session.governor.throttled}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
