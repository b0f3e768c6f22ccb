"""The change journal: a periodic walk lists only directories that may have changed since its last pass,
and no change (a write, a shared mapping, an overlay mount, a hard link, a lost queue) passes as clean.
Real fanotify marks, real files on the disk filesystem beside the tests, real writer processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from elkscan_core import FINDING
from elkscan_fanotify_source.journal import Journal, kernel_ok

EVIL = "journal" + "-test-evil-marker"
RULE = f'rule Journal_Evil {{ strings: $a = "{EVIL}" condition: $a }}\n'
DIRS, FILES = 4, 10


@pytest.fixture
def tree():
    """A tree on the filesystem of these tests (the verdict cache keeps nothing on tmpfs), settled:
    changed over a second ago, as the cache requires before it keeps a verdict."""
    base = Path(tempfile.mkdtemp(prefix="journal-test-", dir=Path(__file__).resolve().parent))
    try:
        for d in range(DIRS):
            (base / "tree" / f"d{d}").mkdir(parents=True)
            for f in range(FILES):
                (base / "tree" / f"d{d}" / f"f{f}.txt").write_text(f"harmless {d} {f}\n" * 8)
        (base / "rules.yar").write_text(RULE)
        time.sleep(1.2)
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base / "merged")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def walking(tools, base: Path):
    pipeline = {"limits": {"cache": True},
                "engines": ({"use": "yara", "with": {"rules": [str(base / "rules.yar")]}},),
                "plugins": ("yara_backend",)}
    options = {"file_events": {"enabled": False}, "on_access": {"enabled": False}}
    walk = {"use": "dirscan", "with": {"roots": {str(base / "tree"): -1}, "every": 0.3, "min_size": 0,
                                       "type_filter": False, "exclude": []}}
    with tools.monitoring(options, engines=pipeline["engines"], plugins=pipeline["plugins"],
                          pipeline={"limits": pipeline["limits"], "sources": [
                              {"use": "fanotify", "with": options}, walk]}) as monitor:
        monitor.walk = monitor.session.find("source", "dirscan")
        assert monitor.session.journal is not None
        yield monitor


def settle(monitor) -> None:
    """Until a whole pass entered every directory without listing one."""
    every = DIRS + 1
    monitor.wait_for(lambda: monitor.walk.stats["recalled"] >= 2 * every, timeout=30)


def detected(monitor, path: Path):
    return monitor.wait_for(lambda: [r for r in monitor.kinds(FINDING) if r.target.path == str(path)
                                     and r.detections], timeout=30)


needs_kernel = pytest.mark.skipif(not kernel_ok(), reason="the change journal needs Linux 6.6")


@needs_kernel
def test_unchanged_directories_are_not_listed_and_a_write_is_judged(tree, tools):
    with walking(tools, tree) as monitor:
        settle(monitor)
        victim = tree / "tree" / "d2" / "f3.txt"
        with tools.Writer('printf %s "$2" >> "$1"', str(victim), EVIL):
            detected(monitor, victim)
        listed, recalled = monitor.walk.stats["listed"], monitor.walk.stats["recalled"]
        time.sleep(2)
        listed, recalled = monitor.walk.stats["listed"] - listed, monitor.walk.stats["recalled"] - recalled
    # each pass lists d2 (a detection is judged and reported every pass) and enters the rest unlisted
    assert recalled >= 3 * listed > 0
    assert monitor.result.summary.detected_files >= 2


@needs_kernel
def test_content_written_through_a_shared_mapping_is_judged(tree, tools):
    """The writer opens the file (an event), then writes through a mapping it keeps (no event at all)."""
    victim = tree / "tree" / "d1" / "f4.txt"
    script = ("import mmap, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR); m = mmap.mmap(fd, 0)\n"
              "time.sleep(1.5); m[0:len(sys.argv[2])] = sys.argv[2].encode()\n"
              "print('written', flush=True); sys.stdin.readline()\n")
    with walking(tools, tree) as monitor:
        settle(monitor)
        writer = subprocess.Popen([sys.executable, "-c", script, str(victim), EVIL], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline() == "written\n"
            detected(monitor, victim)
        finally:
            writer.communicate("\n", timeout=10)


@needs_kernel
def test_a_hard_link_outside_the_roots_cannot_hide_a_write(tree, tools):
    victim = tree / "tree" / "d0" / "f1.txt"
    with walking(tools, tree) as monitor:
        settle(monitor)
        with tools.Writer('ln "$1" "$2" && printf %s "$3" >> "$2"', str(victim), str(tree / "outside"), EVIL):
            detected(monitor, victim)


@needs_kernel
def test_a_write_through_an_overlay_mount_onto_a_walked_upper_layer_is_judged(tree, tools):
    """An overlay's upper layer inside the walked tree, written through the overlay mount."""
    upper, work, lower, merged = (tree / "tree" / "d3"), tree / "work", tree / "lower", tree / "merged"
    for directory in (work, lower, merged):
        directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, mounted.stderr
    with walking(tools, tree) as monitor:
        settle(monitor)
        with tools.Writer('printf %s "$2" >> "$1"', str(merged / "f5.txt"), EVIL):
            detected(monitor, upper / "f5.txt")


@needs_kernel
def test_the_journal_is_lost_when_it_cannot_know(tree):
    """Nothing before the first answer or a newly covered filesystem is known; a queue that overflowed
    (events held back while the kernel's queue of 16,384 fills with distinct opens) loses everything."""
    journal, walk, other = Journal(), object(), object()
    try:
        journal.cover(str(tree / "tree"))
        assert journal.rotate(walk) is None  # the time before the mark is not known
        assert journal.rotate(walk) is not None
        assert journal.rotate(other) is None  # another walk's first answer
        (tree / "tree" / "d0" / "new.txt").write_text("new")
        changes = journal.rotate(walk)
        # (other work on this filesystem may add its own directories and files to the answers)
        assert changes.devices == {os.stat(tree).st_dev} and _key(tree / "tree" / "d0") in changes.dirs
        assert _key(tree / "tree" / "d0") in journal.rotate(other).dirs  # each walk has its own answers
        assert _key(tree / "tree" / "d0") not in journal.rotate(walk).dirs
        many = tree / "many"
        many.mkdir()
        with journal._lock:  # the reader is held back: the kernel's queue fills
            for i in range(17_000):
                os.close(os.open(many / f"{i}", os.O_CREAT | os.O_WRONLY, 0o600))
        assert journal.rotate(walk) is None and journal.rotate(other) is None
        assert journal.rotate(walk) is not None
    finally:
        journal.close()


@needs_kernel
def test_a_writer_that_opened_before_the_marks_is_never_taken_as_settled(tree, tools):
    """A verdict stored by an earlier run, a writer that opened and mapped the file before this run's
    marks (so no event tells of it), and writes through the mapping once the walk has settled: the
    lease asked when a directory is settled sees the writer, so that directory is listed every pass."""
    victim = tree / "tree" / "d2" / "f7.txt"
    with walking(tools, tree) as monitor:
        settle(monitor)  # the verdicts are stored
    script = ("import mmap, os, sys\n"
              "fd = os.open(sys.argv[1], os.O_RDWR); m = mmap.mmap(fd, 0)\n"
              "print('mapped', flush=True); sys.stdin.readline()\n"
              "m[0:len(sys.argv[2])] = sys.argv[2].encode()\n"
              "print('written', flush=True); sys.stdin.readline()\n")
    writer = subprocess.Popen([sys.executable, "-c", script, str(victim), EVIL], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "mapped\n"
        with walking(tools, tree) as monitor:
            settle(monitor)
            listed = monitor.walk.stats["listed"]
            monitor.wait_for(lambda: monitor.walk.stats["listed"] >= listed + 3)  # d2, pass after pass
            writer.stdin.write("\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == "written\n"
            detected(monitor, victim)
    finally:
        writer.communicate("\n", timeout=10)


def _key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
