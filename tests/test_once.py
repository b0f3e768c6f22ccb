"""Each file is read once per pass (issue 14): a hard link or a symlink inside the roots is another name
of a file the walk already judged; every name is reported, with its own path, and the summary counts
the file once. Engines whose rules read the name (yara's filename/filepath/extension) still judge each
name under its own name. Real files, real links, the real yara engine."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from elkscan_core import KNOWN_GOOD, Detection, Engine, hookimpl
from elkscan_core.cache import dates_mmap_writes
from elkscan_core.testing import run


class Reads(Engine):
    """Counts how often each file (device, inode) is read; detects files holding 'bad'."""

    id = "reads"
    seen: Counter = Counter()
    delay = 0.0
    version_ = ""

    def scan(self, subject):
        Reads.seen[(subject.stat.st_dev, subject.stat.st_ino)] += 1
        time.sleep(self.delay)
        data = subject.read(1 << 20)
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in data else []

    def version(self):
        return Reads.version_


class Vouch(Engine):
    """Vouches for files whose content starts with 'pkg' (as pkgverify does for a package's files)."""

    id = "vouch"

    @property
    def vouches(self):
        return True

    def scan(self, subject):
        return KNOWN_GOOD if subject.read(3) == b"pkg" else []


class Plugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Reads)
        registry.add(Vouch)


@pytest.fixture(autouse=True)
def fresh_counts():
    Reads.seen.clear()
    Reads.delay, Reads.version_ = 0.0, ""


def scan(root, engines, *, workers=2, report_clean=True, limits=None, **pipeline):
    return run({"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": engines, "limits": {"workers": workers, **(limits or {})}, **pipeline},
               extra_plugins=[Plugin()], report_clean=report_clean)


def by_name(result, root):
    return {os.path.relpath(r.target.path, root): r for r in result.records if r.target.path}


@pytest.fixture
def tree(tmp_path):
    """real.sh and its hard link hard.sh, two symlinks to it (one relative, one absolute), a detected file
    and a symlink to it, and a file of its own."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "real.sh").write_bytes(b"#!/bin/sh\necho hello\n")
    os.link(root / "real.sh", root / "sub" / "hard.sh")
    os.symlink("real.sh", root / "rel-link.sh")
    os.symlink(root / "real.sh", root / "sub" / "abs-link.sh")
    (root / "bad.txt").write_bytes(b"this is bad\n")
    os.symlink("../bad.txt", root / "sub" / "bad-link.txt")
    (root / "alone.sh").write_bytes(b"#!/bin/sh\nexit 0\n")
    return root


def test_a_file_is_read_once_and_every_name_is_reported(tree):
    result = scan(tree, ["reads"])
    records = by_name(result, tree)
    names = {"real.sh", "sub/hard.sh", "rel-link.sh", "sub/abs-link.sh", "bad.txt", "sub/bad-link.txt", "alone.sh"}
    assert set(records) == names
    real = os.stat(tree / "real.sh")
    assert Reads.seen[(real.st_dev, real.st_ino)] == 1  # four names, one read
    for name in ("real.sh", "sub/hard.sh", "rel-link.sh", "sub/abs-link.sh", "alone.sh"):
        assert records[name].status == "clean" and records[name].judged_by == ("reads",), name
        assert records[name].target.path == str(tree / name)
    # a file with detections is judged under each of its names
    assert records["bad.txt"].status == records["sub/bad-link.txt"].status == "detected"
    bad = os.stat(tree / "bad.txt")
    assert Reads.seen[(bad.st_dev, bad.st_ino)] == 2
    summary = result.summary
    assert (summary.files, summary.names, summary.clean, summary.detected_files) == (4, 7, 5, 2)
    assert summary.bytes == real.st_size + 2 * bad.st_size + os.stat(tree / "alone.sh").st_size


def test_names_in_flight_at_once_wait_for_the_first(tmp_path):
    """Eight names of one file, two workers and a slow engine: the names met while the first is being
    judged wait for it instead of reading the file again; none is lost."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f0").write_bytes(b"one file, many names\n")
    for i in range(1, 8):
        os.link(root / "f0", root / f"f{i}")
    Reads.delay = 0.3
    result = scan(root, ["reads"], workers=2)
    assert sorted(by_name(result, root)) == [f"f{i}" for i in range(8)]
    assert list(Reads.seen.values()) == [1]
    assert (result.summary.files, result.summary.names, result.summary.clean) == (1, 8, 8)
    assert not result.session._waiting


def test_rules_that_read_the_name_judge_every_name(tree, tmp_path):
    """Audit C3 for links within one pass: notes.txt holds what a rule flags only in a .php file; its
    hard link shell.php and a symlink x.php are judged by that rule under their own names, while an
    engine that does not read the name reads the file once."""
    rules = tmp_path / "by_name.yar"
    rules.write_text('rule Php_Eval_By_Name { strings: $e = "eval(" condition: extension == "php" and $e }\n')
    root = tmp_path / "php"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"<?php eval($_GET['x']); ?>\n")
    os.link(root / "notes.txt", root / "shell.php")
    os.symlink("notes.txt", root / "x.php")
    result = scan(root, [{"use": "yara", "with": {"rules": [str(rules)]}}, "reads"], plugins=["yara_backend"])
    assert result.session.engines[0].path_dependent
    records = by_name(result, root)
    assert {name: [d.signature for d in r.detections] for name, r in records.items()} == {
        "notes.txt": [], "shell.php": ["Php_Eval_By_Name"], "x.php": ["Php_Eval_By_Name"]}
    assert all(r.judged_by == ("yara", "reads") for r in records.values())
    assert list(Reads.seen.values()) == [1]


def test_a_known_good_verdict_is_shared_and_the_engines_after_it_are_spared(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "pkgfile").write_bytes(b"pkg: a package's own file\n")
    os.symlink("pkgfile", root / "alias")
    result = scan(root, ["vouch", "reads"])
    records = by_name(result, root)
    assert {n: (r.status, r.known_good, r.judged_by) for n, r in records.items()} == {
        "pkgfile": ("clean", "vouch", ("vouch",)), "alias": ("clean", "vouch", ("vouch",))}
    assert not Reads.seen and (result.summary.files, result.summary.names, result.summary.known_good) == (1, 2, 2)


def test_a_file_changed_between_its_names_is_judged_again(tmp_path):
    """One worker: the first name's judging ends before the second is opened; the file is written
    meanwhile (its ctime moves), so the second name is judged on what it holds now."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"harmless at first\n")
    os.link(root / "a", root / "b")

    class Writer(Engine):
        id = "writer"

        def scan(self, subject):
            if subject.path.endswith("/a") or subject.path.endswith("/b"):
                if not getattr(Writer, "done", False):
                    Writer.done = True
                    with open(subject.path, "ab") as handle:
                        handle.write(b"now bad\n")
            return []

    class WriterPlugin:
        @hookimpl
        def elkscan_register_engines(self, registry):
            registry.add(Writer)

    result = run({"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                  "engines": ["writer", "reads"], "limits": {"workers": 1}},
                 extra_plugins=[Plugin(), WriterPlugin()], report_clean=True)
    assert list(Reads.seen.values()) == [2]
    assert [r.status for r in result.records].count("detected") >= 1
    assert (result.summary.files, result.summary.names) == (2, 2)


@pytest.fixture
def dated(tmp_path):
    """A directory whose filesystem the verdict cache keeps verdicts on (ext4, xfs, btrfs)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if dates_mmap_writes(fd):
            yield tmp_path
            return
    finally:
        os.close(fd)
    directory = Path(tempfile.mkdtemp(prefix="once-test-", dir=Path(__file__).resolve().parent))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_from_the_verdict_cache_a_file_is_counted_once_too(dated, tmp_path):
    root = dated / "root"
    root.mkdir()
    (root / "real").write_bytes(b"clean content\n")
    os.link(root / "real", root / "hard")
    os.symlink("real", root / "soft")
    time.sleep(1.1)  # settled: the cache keeps its verdict
    Reads.version_ = "v1"
    cache = {"cache": True, "cache_path": str(tmp_path / "verdicts.sqlite")}
    first = scan(root, ["reads"], limits=cache, report_clean=False, state_dir=str(tmp_path / "state"))
    again = scan(root, ["reads"], limits=cache, report_clean=False, state_dir=str(tmp_path / "state"))
    assert list(Reads.seen.values()) == [1]  # the first pass read it once; the second, never
    assert (first.summary.files, first.summary.names) == (1, 3)
    assert (again.summary.files, again.summary.names, again.summary.clean, again.summary.cached) == (1, 3, 3, 3)


def test_a_new_pass_judges_again(tmp_path):
    """A periodic walk's passes are apart: an unchanged file is read once in each (without the cache)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"plain\n")
    os.symlink("f", root / "g")

    class Stopper(Engine):
        id = "stopper"

        def scan(self, subject):
            if sum(Reads.seen.values()) >= 2:
                self.session.stop()  # the second pass has read the file
            return []

    class StopperPlugin:
        @hookimpl
        def elkscan_register_engines(self, registry):
            registry.add(Stopper)

    result = run({"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False,
                                                          "every": 0.2}}],
                  "engines": ["reads", "stopper"], "limits": {"workers": 1}},
                 extra_plugins=[Plugin(), StopperPlugin()])
    assert list(Reads.seen.values()) == [2]
    assert result.summary.files == 2 and result.summary.names >= 3


def test_a_walk_that_follows_no_links_keeps_only_hard_linked_files(tree):
    """links: never: a file with one name cannot be met again, so the pass keeps nothing of it; a hard
    link is still judged once."""
    result = scan(tree, ["reads"], workers=1, report_clean=True)
    kept_all = len(result.session.sources[0]._pass._done)
    result = run({"sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False,
                                                          "links": "never"}}],
                  "engines": ["reads"]}, extra_plugins=[Plugin()], report_clean=True)
    assert sorted(by_name(result, tree)) == ["alone.sh", "bad.txt", "real.sh", "sub/hard.sh"]
    assert result.session.sources[0]._pass._done.keys() == {os.stat(tree / "real.sh").st_dev << 64
                                                            | os.stat(tree / "real.sh").st_ino}
    assert kept_all == 2  # real.sh and alone.sh (bad.txt had detections: not shared, not kept)
    real = os.stat(tree / "real.sh")
    assert Reads.seen[(real.st_dev, real.st_ino)] == 2  # once in each of the two runs
