"""Elkeid's process set, read from ``/proc`` exactly as Elkeid reads it.

- ``comm``: ``Name:`` of ``status`` (not psutil's ``name()``, which may substitute the executable's
  name); ``ppid``, ``tgid``: from ``status``; ``uid``: the real uid (first of ``Uid:``);
- ``pgid``, ``sessionid``: fields 5 and 6 of ``stat``, parsed after the last ``)`` because ``comm``
  may hold spaces and parentheses;
- ``argv``: ``cmdline`` split on NUL, empty items dropped, joined by one space (psutil keeps empty
  items); bytes that are not UTF-8 become U+FFFD (Elkeid gives up and sends ``-3``);
- ``pns``: the number in ``pid:[...]`` of the ``ns/pid`` link;
- ``docker_id``: Elkeid's two patterns on ``cgroup``: the hex id ending a line after ``docker/``, else
  after ``kubepods/<one level>/``; ``""`` when neither matches.

Every file is opened relative to one descriptor of the ``/proc/<pid>`` directory: once the process
exits, every later read fails with ESRCH (never reading a new process that reuses the pid), and a
fact that cannot be read is ``-3``. Nothing here raises for a process that is gone.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from elkscan_core import UNREADABLE, ProcessFacts

_DOCKER = re.compile(r"docker/([0-9a-f]*)\n")
_KUBEPODS = re.compile(r"kubepods/[0-9a-z-]*/([0-9a-f]*)\n")
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def process_facts(pid: int, proc: str = "/proc") -> ProcessFacts:
    """Elkeid's facts about process ``pid`` as the ``proc`` mount sees it (``-3`` where unreadable)."""
    try:
        directory = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return ProcessFacts(pid=pid)
    try:
        return read_process(directory, pid)
    finally:
        os.close(directory)


def read_process(directory: int, pid: int) -> ProcessFacts:
    """The facts of ``pid`` through ``directory``, an open descriptor of its ``/proc/<pid>``."""
    facts: dict[str, Any] = {}
    status = _read(directory, "status")
    if status is not None:
        facts.update(_from_status(status))
    stat = _read(directory, "stat")
    if stat is not None:
        facts.update(_from_stat(stat))
    cmdline = _read(directory, "cmdline")
    if cmdline is not None:
        facts["argv"] = b" ".join(item for item in cmdline.split(b"\0") if item).decode("utf-8", "replace")
    try:
        link = os.readlink("ns/pid", dir_fd=directory)
        facts["pns"] = int(link.removeprefix("pid:[").removesuffix("]"))
    except (OSError, ValueError):
        pass
    cgroup = _read(directory, "cgroup")
    if cgroup is not None:
        facts["docker_id"] = docker_id_from_cgroup(cgroup.decode("utf-8", "replace"))
    return ProcessFacts(pid=pid, **facts)


def docker_id_from_cgroup(text: str) -> str:
    """The container id in a ``/proc/<pid>/cgroup`` text, by Elkeid's rule; ``""`` when none."""
    match = _DOCKER.search(text) or _KUBEPODS.search(text)
    return match.group(1) if match else ""


def _read(directory: int, name: str) -> Optional[bytes]:
    """A whole /proc file, or None when it cannot be read (the process is gone, or access denied)."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=directory)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def _number(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        return UNREADABLE


def _from_status(status: bytes) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for line in status.split(b"\n"):
        key, _, value = line.partition(b":")
        if key == b"Name":
            facts["comm"] = value.strip().decode("utf-8", "replace")
        elif key == b"PPid":
            facts["ppid"] = _number(value.strip())
        elif key == b"Tgid":
            facts["tgid"] = _number(value.strip())
        elif key == b"Uid":
            fields = value.split()
            facts["uid"] = _number(fields[0]) if fields else UNREADABLE
    return facts


def _from_stat(stat: bytes) -> dict[str, Any]:
    """``pid (comm) state ppid pgrp session ...``: fields 5 and 6 count from after ``comm``'s ``)``."""
    _, close, rest = stat.rpartition(b")")
    fields = rest.split()
    if not close or len(fields) < 4:
        return {}
    return {"pgid": _number(fields[2]), "sessionid": _number(fields[3])}
