"""The verdict cache: an unchanged file is not judged twice by the same rules; anything else is."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from attrs import frozen
from hypothesis import given, settings, strategies

from elkscan_core import KNOWN_GOOD, Detection, Engine, hookimpl
from elkscan_core.cache import _SLOTS_MIN, Claim, VerdictCache, dates_mmap_writes, identity
from elkscan_core.testing import SAMPLES, dated_directory, run

HERE = Path(__file__).resolve().parent  # a tmpfs /tmp dates no write: directories made here instead


@frozen
class CountingConfig:
    version: str = "rules-1"


class Counting(Engine):
    """Flags files containing 'bad' and counts what it was asked to judge."""

    id = "counting"
    Config = CountingConfig

    def start(self):
        self.judged: list[str] = []

    def version(self):
        return self.config.version

    def scan(self, subject):
        self.judged.append(os.path.basename(subject.path))
        return [Detection.from_signature(self.id, "Txt.Test.Bad")] if b"bad" in subject.read(4096) else []


class Other(Counting):
    id = "other"


class Versionless(Counting):
    id = "versionless"

    def version(self):
        return ""


class Vouching(Counting):
    """Vouches for 'fine content 0' and 'fine content 1' (as pkgverify does for package files)."""

    id = "vouching"
    vouches = True

    def scan(self, subject):
        self.judged.append(os.path.basename(subject.path))
        return KNOWN_GOOD if subject.read(4096) in (b"fine content 0", b"fine content 1") else []


class Engines:
    @hookimpl
    def elkscan_register_engines(self, registry):
        for cls in (Counting, Other, Versionless, Vouching):
            registry.add(cls)


def scan(root, cache_path, engines=("counting",), versions=None, cache=True, report_clean=False):
    versions = versions or {}
    pipeline = {"sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": [{"use": e, "with": {"version": versions[e]} if e in versions else {}}
                            for e in engines],
                "limits": {"cache": cache, "cache_path": str(cache_path)}}
    result = run(pipeline, extra_plugins=[Engines()], report_clean=report_clean)
    judged = {e.id: sorted(e.judged) for e in result.session.engines}
    return result, judged


@pytest.fixture(scope="module")
def settled(tmp_path_factory):
    """Trees whose files were last changed over a second ago: recent ones are never cached (their
    timestamps may not yet show a change made in the same clock tick)."""
    with dated_directory(tmp_path_factory.mktemp("settled"), HERE) as base:
        for name in ("shared", "modified", "rules", "corrupt", "cli", "open"):
            tree = base / name
            tree.mkdir()
            for i in range(5):
                (tree / f"clean{i}.txt").write_bytes(b"fine content %d" % i)
            (tree / "hit.txt").write_bytes(b"this is bad content")
        time.sleep(1.1)
        yield base


def test_unchanged_files_are_answered_from_the_cache(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    first, judged = scan(tree, db)
    assert judged["counting"] == sorted(os.listdir(tree)) and first.summary.cached == 0
    second, judged = scan(tree, db)
    assert judged["counting"] == ["hit.txt"]  # a file with detections is always judged again
    assert second.summary.cached == 5 and second.summary.files == 6
    assert second.detected == first.detected == {str(tree / "hit.txt"): ["Txt.Test.Bad"]}


def test_cached_files_are_still_reported_when_clean_files_are_asked_for(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    result, judged = scan(tree, db, report_clean=True)
    assert judged["counting"] == ["hit.txt"] and result.summary.cached == 5
    assert sorted(os.path.basename(r.target.path) for r in result.records) == sorted(os.listdir(tree))


def test_without_the_cache_option_every_file_is_judged(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    result, judged = scan(tree, db, cache=False)
    assert len(judged["counting"]) == 6 and result.summary.cached == 0


def test_a_modified_file_is_judged_again(settled, tmp_path):
    tree, db = settled / "modified", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    target = tree / "clean0.txt"
    before = os.stat(target)
    target.write_bytes(b"now bad content")  # same size: only the timestamps tell
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with mtime put back
    result, judged = scan(tree, db)
    assert judged["counting"] == ["clean0.txt", "hit.txt"]
    assert result.detected == {str(target): ["Txt.Test.Bad"], str(tree / "hit.txt"): ["Txt.Test.Bad"]}


def test_a_rule_update_invalidates_only_that_engines_verdicts(settled, tmp_path):
    tree, db = settled / "rules", tmp_path / "verdicts.sqlite"
    scan(tree, db, engines=("counting", "other"))
    result, judged = scan(tree, db, engines=("counting", "other"), versions={"counting": "rules-2"})
    assert len(judged["counting"]) == 6 and judged["other"] == ["hit.txt"]
    assert result.summary.cached == 5


def test_known_good_verdicts_are_cached_apart_and_spare_the_later_engines(settled, tmp_path):
    """A file an engine vouched for stays known good from the cache: the engines after it never read it,
    and its plain clean verdicts never pass for known good."""
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    first, judged = scan(tree, db, engines=("vouching", "counting"))
    assert judged["counting"] == ["clean2.txt", "clean3.txt", "clean4.txt", "hit.txt"]
    assert (first.summary.known_good, first.summary.clean) == (2, 5)
    second, judged = scan(tree, db, engines=("vouching", "counting"), report_clean=True)
    assert judged == {"vouching": [], "counting": ["hit.txt"]}
    assert (second.summary.known_good, second.summary.clean, second.summary.cached) == (2, 5, 9)
    known = {os.path.basename(r.target.path): (r.known_good, r.judged_by) for r in second.records}
    assert known["clean0.txt"] == ("vouching", ("vouching",))
    assert known["clean2.txt"] == ("", ("vouching", "counting"))
    fast, _ = scan(tree, db, engines=("vouching", "counting"))  # answered before the files are opened
    assert (fast.summary.known_good, fast.summary.cached) == (2, 9)


def test_an_engine_without_a_version_is_never_cached(settled, tmp_path):
    tree, db = settled / "shared", tmp_path / "verdicts.sqlite"
    scan(tree, db, engines=("versionless",))
    result, judged = scan(tree, db, engines=("versionless",))
    assert len(judged["versionless"]) == 6 and result.summary.cached == 0


def test_a_file_changed_just_now_is_not_cached(tmp_path):
    tree = tmp_path / "fresh"
    tree.mkdir()
    (tree / "new.txt").write_bytes(b"fresh content")
    db = tmp_path / "verdicts.sqlite"
    scan(tree, db)
    _, judged = scan(tree, db)
    assert judged["counting"] == ["new.txt"]


def test_a_corrupt_cache_is_rebuilt_with_a_warning(settled, tmp_path, caplog):
    tree, db = settled / "corrupt", tmp_path / "verdicts.sqlite"
    db.write_bytes(b"this is not an SQLite database, just garbage" * 100)
    with caplog.at_level(logging.WARNING, logger="elkscan.cache"):
        first, judged = scan(tree, db)
    assert len(judged["counting"]) == 6 and first.summary.errors == 0
    assert any("unreadable" in r.getMessage() and str(db) in r.getMessage() for r in caplog.records)
    assert (tmp_path / "verdicts.sqlite.corrupt").exists()
    second, judged = scan(tree, db)
    assert judged["counting"] == ["hit.txt"] and second.summary.cached == 5


def test_a_cache_others_can_write_is_not_trusted(settled, tmp_path, caplog):
    tree, shared = settled / "open", tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # whoever can write here could forge clean verdicts
    with caplog.at_level(logging.WARNING, logger="elkscan"):
        scan(tree, shared / "verdicts.sqlite")
        result, judged = scan(tree, shared / "verdicts.sqlite")
    assert len(judged["counting"]) == 6 and result.summary.cached == 0 and result.summary.errors == 0
    assert any("writable by others" in r.getMessage() for r in caplog.records)
    assert not (shared / "verdicts.sqlite").exists()


WRITER = textwrap.dedent("""
    import json, os, sys
    from elkscan_core.cache import VerdictCache
    db, tree, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cache = VerdictCache(db, settle=0)
    seen = 0
    for round in range(3):
        for i in range(start, stop):
            fd = os.open(os.path.join(tree, f"f{i}"), os.O_RDONLY)
            seen += cache.is_clean("counting", "v1", os.fstat(fd))
            cache.record_clean("counting", "v1", cache.claim(fd))
            os.close(fd)
        cache.flush()
    cache.close()
    print(json.dumps({"seen": seen}))
""")


def test_two_processes_share_one_cache(tmp_path, dated):
    tree = dated / "many"
    tree.mkdir()
    for i in range(3000):
        (tree / f"f{i}").write_bytes(b"x")
    db = str(tmp_path / "verdicts.sqlite")
    # Overlapping halves, written at the same time by two processes.
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, db, str(tree), str(a), str(b)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for a, b in ((0, 2000), (1000, 3000))]
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "Traceback" not in err, err
        assert json.loads(out)["seen"] >= 2000  # rounds 2 and 3 found their own verdicts
    cache = VerdictCache(db)
    assert len(cache) == 3000
    assert all(cache.is_clean("counting", "v1", os.stat(tree / f"f{i}")) for i in range(3000))
    cache.close()


def test_the_cli_uses_the_cache_unless_told_not_to(settled, tmp_path):
    """The real command with the real yara engine: the second run answers from the cache."""
    tree = settled / "cli"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "version": 1, "plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
        "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
        "engines": [{"use": "yara"}], "limits": {"cache": True}}))

    def scan(*extra):
        out = subprocess.run([sys.executable, "-m", "elkscan_core.cli", "scan", "-p", str(pipeline), *extra],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "from the cache" not in scan()
    assert "6 verdict(s) from the cache" in scan()
    assert "from the cache" not in scan("--no-cache")
    assert (tmp_path / "state" / "verdicts.sqlite").exists()


def test_a_walk_does_not_even_open_files_the_cache_holds_clean(settled, tmp_path, monkeypatch):
    tree, db = settled / "open", tmp_path / "verdicts.sqlite"
    scan(tree, db)
    opened, names = [], set(os.listdir(tree))
    real_open = os.open

    def spy(path, *args, **kwargs):  # observes, and opens for real (by path, or by name in a directory)
        if os.path.basename(path) in names:
            opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    result, judged = scan(tree, db)
    assert opened == ["hit.txt"] and result.summary.cached == 5 and result.summary.files == 6


def test_a_walk_asks_about_many_small_directories_together_and_opens_only_what_changed(dated, tmp_path):
    """dirscan asks about the files of several small directories at once (a duplicate of each one's
    descriptor kept until then): a second scan of 150 one-file directories judges exactly the files
    changed since, wherever they fall among the directories asked together, and leaves no descriptor
    open."""
    tree, db = dated / "many", tmp_path / "verdicts.sqlite"
    for i in range(150):
        (tree / f"d{i:03}" / "sub").mkdir(parents=True)
        (tree / f"d{i:03}" / f"f{i:03}.txt").write_bytes(b"fine content %d" % i)
    (tree / "d077" / "sub" / "hit.txt").write_bytes(b"this is bad content")
    time.sleep(1.1)
    first, judged = scan(tree, db)
    assert len(judged["counting"]) == 151 and first.summary.cached == 0
    changed = [0, 63, 64, 100, 149]
    for i in changed:
        (tree / f"d{i:03}" / f"f{i:03}.txt").write_bytes(b"now bad content")
    before = len(os.listdir("/proc/self/fd"))
    second, judged = scan(tree, db)
    assert judged["counting"] == sorted([f"f{i:03}.txt" for i in changed] + ["hit.txt"])
    assert second.summary.cached == 145 and second.summary.files == 151
    assert set(second.detected) == {str(tree / f"d{i:03}" / f"f{i:03}.txt") for i in changed} | {
        str(tree / "d077" / "sub" / "hit.txt")}
    assert len(os.listdir("/proc/self/fd")) == before


# -- attacks on the cache (issue 10, audit C2 and C3) -------------------------------------------------

REVERSE_SHELL = SAMPLES["revshell.sh"][0]

#: The attacker of audit C2: maps a file it may write MAP_SHARED and writes one byte (the one write
#: fault that dates the file), then on each command writes the page again, which changes no timestamp.
ATTACKER = textwrap.dedent("""
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    page = mmap.mmap(fd, 0, mmap.MAP_SHARED)
    os.close(fd)  # the mapping alone keeps the file writable
    page[0:1] = page[0:1]
    print("mapped", flush=True)
    for line in sys.stdin:
        if line.startswith("write "):
            payload = bytes.fromhex(line.split()[1])
            page[:len(payload)] = payload
        elif line.strip() == "unmap":
            page.close()
        print("done", flush=True)
""")


class Attacker:
    """A real process holding a shared writable mapping of ``path``."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", ATTACKER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "mapped\n"

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def write(self, payload: bytes) -> None:
        self.tell("write " + payload.hex())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def benign_script(size: int = 4096) -> bytes:
    """A harmless shell script as long as a page, with room for a payload written over its start."""
    return (b"#!/bin/sh\n# nothing to see here\n").ljust(size, b"\n")


def yara_scan(root, tmp_path, *, rules=None, extra_engines=(), extra_plugins=()):
    """The real pipeline: the yara engine (its bundled rules unless ``rules`` is a rule file) with the
    verdict cache on."""
    yara = {"use": "yara", "with": {"rules": [str(rules)]}} if rules else {"use": "yara"}
    pipeline = {"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(root): -1}, "type_filter": False}}],
                "engines": [yara, *({"use": e} for e in extra_engines)],
                "limits": {"cache": True, "cache_path": str(tmp_path / "verdicts.sqlite")}}
    return run(pipeline, extra_plugins=extra_plugins)


@pytest.fixture
def dated(tmp_path):
    with dated_directory(tmp_path, HERE) as directory:
        yield directory


def test_content_written_through_a_still_dirty_shared_mapping_is_judged_again(dated, tmp_path):
    """Audit C2, performed as the audit did: a page dirtied through MAP_SHARED takes later writes
    without any timestamp moving, even after munmap and sync."""
    (dated / "empty").mkdir()
    yara_scan(dated / "empty", tmp_path)  # compiles the rules now: the attack must fit in the dirty window
    for attempt in range(5):
        tree = dated / f"tree{attempt}"
        tree.mkdir()
        victim, control = tree / "x.sh", tree / "control.sh"
        victim.write_bytes(benign_script())
        control.write_bytes(benign_script())
        attacker = Attacker(victim)
        try:
            time.sleep(1.5)  # past the settle time: the file looks long unchanged
            first = yara_scan(tree, tmp_path)
            assert first.detected == {} and first.summary.files == 2
            before = os.stat(victim)
            attacker.write(REVERSE_SHELL)
            attacker.tell("unmap")
        finally:
            attacker.close()
        fd = os.open(victim, os.O_RDONLY)
        os.fsync(fd)  # the payload is on disk (as the audit's sync; this file only, not other tests')
        os.close(fd)
        if identity(os.stat(victim)) == identity(before):
            break  # the attack is real: nothing in the identity moved
        # The page was written back before the payload (another process's sync(), or writeback on a
        # loaded machine), so the payload's write fault dated the file: no attack. Again.
    else:
        pytest.fail("the dirtied page was written back before the payload in every attempt")
    assert victim.read_bytes().startswith(REVERSE_SHELL)
    second = yara_scan(tree, tmp_path)
    assert second.detected == {str(victim): ["Linux_ReverseShell_DevTcp"]}
    assert second.summary.cached == 1  # the control file: the cache is on and used


def test_a_mapping_made_after_the_verdict_dates_the_file_with_its_first_write(dated, tmp_path):
    """What the claim rests on: a verdict kept while nobody could write unseen is voided by the first
    write of any later mapping, however many silent writes follow."""
    tree = dated / "tree"
    tree.mkdir()
    victim = tree / "x.sh"
    victim.write_bytes(benign_script())
    time.sleep(1.1)
    assert yara_scan(tree, tmp_path).detected == {}
    assert yara_scan(tree, tmp_path).summary.cached == 1  # the verdict was kept
    attacker = Attacker(victim)  # maps the file and writes one byte
    try:
        attacker.write(REVERSE_SHELL)
        second = yara_scan(tree, tmp_path)
    finally:
        attacker.close()
    assert second.detected == {str(victim): ["Linux_ReverseShell_DevTcp"]} and second.summary.cached == 0


class Accomplice(Engine):
    """Judges after yara: tells the attacker that the victim has just been read (a real attacker learns
    it from inotify's IN_CLOSE_NOWRITE), so the payload lands and the mapping is gone before the run
    ends and writes its verdicts. Its own verdicts are never cached (no version)."""

    id = "accomplice"
    victim = attacker = None

    def scan(self, subject):
        if subject.path == str(Accomplice.victim):
            Accomplice.attacker.write(REVERSE_SHELL)
            Accomplice.attacker.tell("unmap")
        return []


class AccomplicePlugin:
    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Accomplice)


def test_a_mapping_dropped_right_after_the_scan_does_not_let_a_verdict_in(dated, tmp_path):
    """Whether a writer could change the file unseen is decided before an engine reads it: looking
    for mappings when the verdicts are written, after the scan, misses one dropped in between."""
    tree = dated / "tree"
    tree.mkdir()
    victim = tree / "x.sh"
    victim.write_bytes(benign_script())
    Accomplice.victim, Accomplice.attacker = victim, Attacker(victim)
    try:
        time.sleep(1.5)
        first = yara_scan(tree, tmp_path, extra_engines=["accomplice"], extra_plugins=[AccomplicePlugin()])
    finally:
        Accomplice.attacker.close()
    assert first.detected == {}  # yara read the benign content; the payload came after
    assert victim.read_bytes().startswith(REVERSE_SHELL)
    second = yara_scan(tree, tmp_path)
    assert second.detected == {str(victim): ["Linux_ReverseShell_DevTcp"]}


def test_a_hard_link_is_judged_under_its_own_name_when_rules_read_the_name(dated, tmp_path):
    """Audit C3: a rule on ``extension``; ``shell.php`` is a hard link of ``notes.txt``, which was
    found clean: that verdict must not cover the other name."""
    rules = tmp_path / "by_name.yar"
    rules.write_text('rule Php_Eval_By_Name { strings: $e = "eval(" condition: extension == "php" and $e }\n')
    tree = dated / "tree"
    tree.mkdir()
    (tree / "notes.txt").write_bytes(b"<?php eval($_GET['x']); ?>\n")
    os.link(tree / "notes.txt", tree / "shell.php")
    time.sleep(1.1)  # link() moved the ctime: let it settle
    for run_ in range(2):
        result = yara_scan(tree, tmp_path, rules=rules)
        assert result.detected == {str(tree / "shell.php"): ["Php_Eval_By_Name"]}, run_
    assert result.summary.cached == 1  # notes.txt, under its own name


def test_the_yara_engine_says_when_its_rules_read_the_file_name(tmp_path):
    plain, named = tmp_path / "plain.yar", tmp_path / "named.yar"
    plain.write_text('rule A { strings: $a = "x" condition: $a and filetype == "" and owner != "" }\n')
    named.write_text('rule B { condition: filename == "a" }\nrule C { condition: filepath == "/a" }\n')
    dependent = {}
    for rules in (plain, named):
        pipeline = {"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                    "sources": [], "engines": [{"use": "yara", "with": {"rules": [str(rules)]}}]}
        dependent[rules.name] = run(pipeline).session.engines[0].path_dependent
    assert dependent == {"plain.yar": False, "named.yar": True}


def test_a_verdict_kept_for_one_name_does_not_answer_for_another(tmp_path):
    victim = tmp_path / "f"
    victim.write_bytes(b"x")
    time.sleep(1.1)
    cache = VerdictCache(str(tmp_path / "v.sqlite"))
    claim = claim_of(cache, victim)
    cache.record_clean("e", "v1", claim, "/srv/notes.txt")
    cache.record_clean("e", "v1", claim)
    cache.flush()
    st = os.stat(victim)
    assert cache.is_clean("e", "v1", st, "/srv/notes.txt") and cache.is_clean("e", "v1", st)
    assert not cache.is_clean("e", "v1", st, "/srv/shell.php")
    cache.close()


def claim_of(cache, path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return cache.claim(fd)
    finally:
        os.close(fd)


def test_no_verdict_is_kept_for_a_file_another_process_can_write(dated, tmp_path):
    """An open writable descriptor or shared writable mapping anywhere (any process, any namespace)
    keeps a verdict out; a file nobody has open for writing is claimed."""
    victim = dated / "f"
    victim.write_bytes(benign_script())
    cache = VerdictCache(str(tmp_path / "v.sqlite"), settle=0)  # here only writers matter
    assert claim_of(cache, victim) is not None
    attacker = Attacker(victim)
    try:
        assert claim_of(cache, victim) is None
    finally:
        attacker.close()
    hold = "import sys; f = open(sys.argv[1], 'ab'); print(); input()"
    writer = subprocess.Popen([sys.executable, "-c", hold, str(victim)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    writer.stdout.readline()
    try:
        assert claim_of(cache, victim) is None
    finally:
        writer.communicate(b"\n", timeout=10)
    assert claim_of(cache, victim) is not None
    cache.close()


def test_no_verdict_is_kept_on_a_filesystem_that_does_not_date_mmap_writes(tmp_path):
    """tmpfs (and overlayfs, FUSE, NFS) may change content through a mapping with no timestamp."""
    fd = os.memfd_create("elkscan-test")  # shmem, as /dev/shm and tmpfs
    try:
        os.write(fd, b"content")
        cache = VerdictCache(str(tmp_path / "v.sqlite"), settle=0)
        assert not dates_mmap_writes(fd) and cache.claim(fd) is None
        cache.close()
    finally:
        os.close(fd)


CLAIMER = textwrap.dedent("""
    import os, sys, time
    from elkscan_core.cache import VerdictCache
    cache = VerdictCache(sys.argv[1], settle=0)
    end = time.monotonic() + 2
    while time.monotonic() < end:
        fd = os.open(sys.argv[2], os.O_RDONLY)
        cache.claim(fd)
        os.close(fd)
    print("alive")
""")


def test_a_writer_racing_the_lease_cannot_kill_the_scanner(dated, tmp_path):
    """A writer that opens the file while the claim holds its lease breaks it, and the kernel signals
    the holder: SIGIO, the default, would end the scan. Any user who can write a file can try."""
    victim = dated / "f"
    victim.write_bytes(b"x")
    scanner = subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path / "v.sqlite"), str(victim)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while scanner.poll() is None:
        os.close(os.open(victim, os.O_WRONLY))
    out, err = scanner.communicate()
    assert scanner.returncode == 0 and out == "alive\n", err


# -- the in-memory index (issue 14) -------------------------------------------------------------------

def synthetic(i: int, ctime_ns: int = 1_700_000_000_000_000_000):
    """A stat-like identity for the i-th of many files (the cache reads only what ``identity`` reads)."""
    return SimpleNamespace(st_dev=2049, st_ino=1000 + i, st_size=10 * i, st_mtime_ns=ctime_ns - 5_000_000_000,
                           st_ctime_ns=ctime_ns)


def test_the_index_answers_for_every_part_of_the_key(tmp_path):
    """A verdict answers only for its very engine, version, identity and name; no part may run into
    another (engine 'a' + version 'bc' is not engine 'ab' + version 'c')."""
    cache = VerdictCache(str(tmp_path / "v.sqlite"))
    st = synthetic(1)
    cache.record_clean("ab", "c", Claim(st), "/srv/x")
    assert cache.is_clean("ab", "c", st, "/srv/x")
    others = [("a", "bc", st, "/srv/x"), ("ab", "c", st, "/srv/y"), ("ab", "c", st, None),
              ("ab", "c2", st, "/srv/x"), ("ab", "", st, "/srv/x")]
    for field in ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns"):
        moved = synthetic(1)
        setattr(moved, field, getattr(moved, field) + 1)
        others.append(("ab", "c", moved, "/srv/x"))
    assert not any(cache.is_clean(*other) for other in others)
    cache.close()


def test_index_keys_are_secret_to_each_run(tmp_path):
    """Keys are hashed with a secret drawn per run: one run's keys tell nothing about another's, so a
    file cannot be given an identity whose key collides with a clean one."""
    first, second = VerdictCache(str(tmp_path / "a.sqlite")), VerdictCache(str(tmp_path / "b.sqlite"))
    st = synthetic(1)
    assert first._index.key("e", "v1", st, None) != second._index.key("e", "v1", st, None)
    first.close()
    second.close()


KEY_OF_A_RUN = textwrap.dedent("""
    from types import SimpleNamespace
    from elkscan_core.cache import _Index
    st = SimpleNamespace(st_dev=2049, st_ino=1001, st_size=10, st_mtime_ns=1, st_ctime_ns=2)
    print(_Index().key("e", "v1", st, None))
""")


def test_index_keys_stay_secret_when_the_interpreters_hash_seed_is_known():
    """The keys are Python's SipHash of bytes; with PYTHONHASHSEED set, that hash is no longer keyed by
    a secret, but each run's own secret prefix still is: two runs' keys of one identity differ."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    keys = {subprocess.run([sys.executable, "-c", KEY_OF_A_RUN], capture_output=True, text=True, env=env,
                           timeout=60, check=True).stdout for _ in range(2)}
    assert len(keys) == 2


def test_many_verdicts_are_found_in_the_run_that_recorded_them_and_in_the_next(tmp_path):
    """Past several growths of the index's table, every verdict this run recorded still answers, and the
    next run loads them all from the store; a changed ctime answers for none."""
    path = str(tmp_path / "v.sqlite")
    cache = VerdictCache(path)
    count = 5 * _SLOTS_MIN + 7
    for i in range(count):
        cache.record_clean("e", "v1", Claim(synthetic(i)))
    assert all(cache.is_clean("e", "v1", synthetic(i)) for i in range(count))
    cache.close()
    again = VerdictCache(path)
    assert len(again) == count
    assert all(again.is_clean("e", "v1", synthetic(i)) for i in range(count))
    assert not any(again.is_clean("e", "v1", synthetic(i, ctime_ns=1_800_000_000_000_000_000))
                   for i in range(count))
    again.close()


def test_a_batch_is_stored_row_for_row_as_it_was_recorded(tmp_path):
    """A batch goes to the store in one statement (its rows as JSON, their names as one BLOB): names
    empty and hashed, engines and versions outside ASCII or with quotes, and identities at the ends of
    their range all come back as they were recorded, and nothing else answers."""
    path = str(tmp_path / "v.sqlite")
    cache = VerdictCache(path)
    extremes = [SimpleNamespace(st_dev=(1 << 63) - 1, st_ino=(1 << 63) - 2, st_size=(1 << 63) - 3,
                                st_mtime_ns=-(1 << 63), st_ctime_ns=-1),
                SimpleNamespace(st_dev=0, st_ino=0, st_size=0, st_mtime_ns=0, st_ctime_ns=0)]
    recorded = []
    for i, st in enumerate([*extremes, *(synthetic(i) for i in range(50))]):
        engine, version = ("e\u00e9\"\\", "v\u2603 'x'") if i % 3 else ("e", "v1")
        name = f"/srv/\u00e9/{i}" if i % 2 else None
        cache.record_clean(engine, version, Claim(st), name)
        recorded.append((engine, version, st, name))
    cache.close()
    again = VerdictCache(path)
    assert len(again) == len(recorded)
    for engine, version, st, name in recorded:
        assert again.is_clean(engine, version, st, name)
        assert not again.is_clean(engine, version, st, None if name else "/srv/other")
        assert not again.is_clean(engine, version + "x", st, name)
    again.close()


def test_a_walks_look_ups_at_once_answer_as_one_at_a_time(tmp_path):
    """``clean_all`` (a directory's files at once) answers as ``is_clean`` does for each, names included,
    while the store was empty at start (only this run's verdicts, by their inodes' bits) and once loaded."""
    path = str(tmp_path / "v.sqlite")
    stats = [synthetic(i) for i in range(40)]
    names = [f"/srv/{i}" for i in range(40)]
    moved = [synthetic(i, ctime_ns=1_800_000_000_000_000_000) for i in range(40)]
    cache = VerdictCache(path)
    for i in range(0, 40, 3):
        cache.record_clean("e", "v1", Claim(stats[i]))
        cache.record_clean("n", "v1", Claim(stats[i]), names[i])
    for run_ in range(2):
        for engine, paths in (("e", None), ("n", names)):
            for each in (stats, moved):
                expected = [cache.is_clean(engine, "v1", st, None if paths is None else paths[i])
                            for i, st in enumerate(each)]
                assert cache.clean_all(engine, "v1", each, paths) == expected
                assert cache.clean_all(engine, "v2", each, paths) == [False] * 40
        assert sum(cache.clean_all("e", "v1", stats)) == 14
        cache.close()
        cache = VerdictCache(path)  # the next run: every key loaded from the store
    cache.close()


CRASHER = textwrap.dedent("""
    import os, sys
    from types import SimpleNamespace
    from elkscan_core.cache import Claim, VerdictCache
    cache = VerdictCache(sys.argv[1])
    for i in range(int(sys.argv[2])):
        st = SimpleNamespace(st_dev=2049, st_ino=1000 + i, st_size=10 * i, st_mtime_ns=1, st_ctime_ns=2)
        cache.record_clean("e", "v1", Claim(st))
        if i == 299:
            cache.flush()
    os.kill(os.getpid(), 9)  # no close, no flush: what is still pending is lost with the process
""")


def test_a_crash_loses_recent_verdicts_and_never_makes_a_wrong_one_count(tmp_path):
    path = str(tmp_path / "v.sqlite")
    crasher = subprocess.run([sys.executable, "-c", CRASHER, path, "400"], capture_output=True, text=True,
                             timeout=60)
    assert crasher.returncode == -9, crasher.stderr
    cache = VerdictCache(path)
    written = [cache.is_clean("e", "v1", SimpleNamespace(st_dev=2049, st_ino=1000 + i, st_size=10 * i,
                                                         st_mtime_ns=1, st_ctime_ns=2)) for i in range(400)]
    assert all(written[:300])  # flushed before the crash
    assert len(cache) == sum(written)  # what was still pending is gone whole, never half written
    assert not cache.is_clean("e", "v1", SimpleNamespace(st_dev=2049, st_ino=1000, st_size=0, st_mtime_ns=1,
                                                         st_ctime_ns=3))
    cache.close()


def test_a_walk_does_not_even_open_files_a_path_dependent_engine_holds_clean(dated, tmp_path, monkeypatch):
    """dirscan asks the cache with the path as well as the lstat: rules that read the name answer
    before the file is opened too, each name for itself."""
    rules = tmp_path / "by_name.yar"
    rules.write_text('rule Php_Eval_By_Name { strings: $e = "eval(" condition: extension == "php" and $e }\n')
    tree = dated / "tree"
    tree.mkdir()
    for name in ("notes.txt", "shell.php", "other.txt"):
        (tree / name).write_bytes(b"<?php eval($_GET['x']); ?>\n")
    time.sleep(1.1)
    yara_scan(tree, tmp_path, rules=rules)
    opened, names = [], set(os.listdir(tree))
    real_open = os.open

    def spy(path, *args, **kwargs):
        if os.path.basename(path) in names:
            opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    result = yara_scan(tree, tmp_path, rules=rules)
    assert opened == ["shell.php"] and result.summary.cached == 2
    assert result.detected == {str(tree / "shell.php"): ["Php_Eval_By_Name"]}


def test_a_limits_outcome_is_kept_as_not_scanned_under_its_version_and_limits(dated, tmp_path):
    """What an engine leaves unread for a limit of its own is remembered with its reason, never as
    clean, and only under the same version and limits (the engine's test with a real clamd is in
    plugins/clamav_backend/tests/test_limits.py)."""
    path = dated / "big"
    path.write_bytes(b"x" * 3000)
    db = str(tmp_path / "verdicts.sqlite")
    cache = VerdictCache(db, settle=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        cache.record_not_scanned("clamav", "v1", "MaxScanSize 2048", cache.claim(fd, st), None,
                                 "above clamav's max_scan_size")
        cache.record_not_scanned("clamav", "v1", "", cache.claim(fd, st), None, "limits unknown: not kept")
    finally:
        os.close(fd)
    assert cache.may_know(st)  # a hard link met later in this run is asked (no clean verdict on it)
    cache.close()
    cache = VerdictCache(db)
    assert cache.may_know(st)  # a store holding only such outcomes is asked too
    assert cache.not_scanned("clamav", "v1", "MaxScanSize 2048", st) == "above clamav's max_scan_size"
    assert not cache.is_clean("clamav", "v1", st)
    assert cache.not_scanned("clamav", "v2", "MaxScanSize 2048", st) == ""
    assert cache.not_scanned("clamav", "v1", "MaxScanSize 4096", st) == ""
    assert cache.not_scanned("clamav", "v1", "", st) == ""
    assert cache.not_scanned("yara", "v1", "MaxScanSize 2048", st) == ""
    assert cache.not_scanned("clamav", "v1", "MaxScanSize 2048", st, "/a/name") == ""  # keyed by name too
    os.truncate(path, 10)
    assert cache.not_scanned("clamav", "v1", "MaxScanSize 2048", os.stat(path)) == ""
    cache.close()


def test_a_first_scan_finds_the_verdicts_it_recorded_and_only_those(dated, tmp_path):
    """A store empty at start answers from this run's verdicts only: its look-ups skip the key of an
    inode nothing was recorded on (a walk does not even ask the engines' keys), and still find every file
    recorded (another pass of the same run), never one that shares the inode's bit (its number modulo
    the filter's size) or changed since."""
    from elkscan_core.cache import _INODE_BITS

    files = []
    for i in range(3):
        (dated / f"f{i}").write_bytes(b"fine content %d" % i)
        files.append(dated / f"f{i}")
    time.sleep(1.1)
    path = str(tmp_path / "v.sqlite")
    cache = VerdictCache(path)
    stats = [os.stat(f) for f in files]
    assert not any(cache.is_clean("e", "v1", st) or cache.may_know(st) for st in stats)
    cache.record_clean("e", "v1", claim_of(cache, files[0]))
    cache.record_clean("e", "v1", claim_of(cache, files[1]), str(files[1]))
    assert cache.is_clean("e", "v1", stats[0]) and cache.is_clean("e", "v1", stats[1], str(files[1]))
    assert not cache.is_clean("e", "v1", stats[1]) and not cache.is_clean("e", "v1", stats[2])
    assert cache.may_know(stats[0]) and not cache.may_know(stats[2])  # what a walk asks before any key
    alias = SimpleNamespace(st_dev=stats[0].st_dev, st_ino=stats[0].st_ino + _INODE_BITS,
                            st_size=stats[0].st_size, st_mtime_ns=stats[0].st_mtime_ns,
                            st_ctime_ns=stats[0].st_ctime_ns)
    assert not cache.is_clean("e", "v1", alias)
    with open(files[0], "ab") as f:
        f.write(b"!")
    assert not cache.is_clean("e", "v1", os.stat(files[0]))
    cache.close()
    again = VerdictCache(path)  # the next run loads them: a look-up hashes every key again
    assert again.is_clean("e", "v1", stats[0]) and not again.is_clean("e", "v1", stats[2])
    assert again.is_clean("e", "v1", stats[1], str(files[1])) and not again.is_clean("e", "v1", stats[1])
    assert again.may_know(stats[2])  # a store with verdicts at start: every file is asked by its key
    again.close()


def test_verdicts_are_stored_by_the_batch_and_the_rest_within_a_second(tmp_path):
    """The writer thread stores a full batch when it is woken once for it, and what is left of a
    smaller batch within a second, with no flush or close asked."""
    from elkscan_core.cache import _FLUSH_EVERY

    path = str(tmp_path / "v.sqlite")
    cache = VerdictCache(path)
    count = 2 * _FLUSH_EVERY + 5
    for i in range(count):
        cache.record_clean("e", "v1", Claim(synthetic(i)))
    deadline = time.monotonic() + 10
    while len(cache) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(cache) == count
    cache.close()


# -- times past what 64 bits hold ---------------------------------------------------------------------

YEAR_2400_NS = 13_569_465_600 * 10**9  # ext4, xfs, btrfs and tmpfs all keep it; 2**63 ns is in 2262


def test_a_file_dated_past_2262_is_judged_every_time_and_the_walk_goes_on(dated, tmp_path):
    """The attack: a local user dates a file of theirs in the year 2400, past what 64 bits of nanoseconds
    hold. The look-up of its identity raised, and the walk of its whole root ended with an error, no
    file judged. Now such a file is judged every time (its verdict cannot be stored) and the others
    still come from the cache."""
    tree, db = dated / "tree", tmp_path / "verdicts.sqlite"
    tree.mkdir()
    for i in range(3):
        (tree / f"clean{i}.txt").write_bytes(b"fine content %d" % i)
    time.sleep(1.1)  # settled: their verdicts may be kept
    scan(tree, db)
    future = tree / "future.txt"
    future.write_bytes(b"fine content from the future")
    os.utime(future, ns=(YEAR_2400_NS, YEAR_2400_NS))
    assert os.stat(future).st_mtime_ns == YEAR_2400_NS, "this filesystem cannot hold the year 2400"
    for _ in range(2):
        result, judged = scan(tree, db)
        assert result.summary.errors == 0 and result.summary.files == 4 and result.summary.cached == 3
        assert judged["counting"] == ["future.txt"]


def test_identities_past_64_bits_are_never_stored_and_never_found(tmp_path):
    """Times before 1678 or after 2262 and inodes past 2**63 do not fit the store's 64-bit integers: the
    claim refuses them (so nothing is stored under them), and looking them up, one at a time or a
    directory at once, answers 'not known' instead of raising, before and after the store is loaded."""
    path = str(tmp_path / "v.sqlite")
    fits = synthetic(1)
    fits.st_mode = stat.S_IFREG | 0o644
    beyond = []
    for field, value in (("st_mtime_ns", 1 << 64), ("st_mtime_ns", -(1 << 63) - 1), ("st_ctime_ns", 1 << 64),
                         ("st_ino", 1 << 63), ("st_ino", 1 << 64)):
        st = synthetic(1)
        st.st_mode = stat.S_IFREG | 0o644
        setattr(st, field, value)
        beyond.append(st)
    cache = VerdictCache(path)
    assert all(cache.claim(-1, st) is None for st in beyond)  # refused before the descriptor is used
    cache.record_clean("e", "v1", Claim(fits))
    cache.record_clean("n", "v1", Claim(fits), "/srv/x")
    for _ in range(2):
        assert cache.is_clean("e", "v1", fits) and cache.is_clean("n", "v1", fits, "/srv/x")
        assert not any(cache.is_clean("e", "v1", st) or cache.is_clean("n", "v1", st, "/srv/x") for st in beyond)
        assert cache.clean_all("e", "v1", [fits, *beyond]) == [True] + [False] * len(beyond)
        assert cache.clean_all("n", "v1", [fits, *beyond], ["/srv/x"] * 6) == [True] + [False] * len(beyond)
        assert all(cache.not_scanned("e", "v1", "limits", st) == "" for st in beyond)
        cache.close()
        cache = VerdictCache(path)  # the next run: the keys loaded from the store
    cache.close()


@pytest.mark.parametrize("row", [
    "INSERT INTO clean VALUES (2049, 7, 'e', x'', 1, 1.5e19, 1.5e19, 'v1')",
    "INSERT INTO not_scanned VALUES (2049, 7, 'e', x'', 1, 1.5e19, 1.5e19, 'v1', 'l', 'too big')",
])
def test_a_stored_row_no_scan_writes_is_damage(row, tmp_path, caplog):
    """A row whose time SQLite holds as a real number (what a time past 64 bits would have become) is
    not loaded into a key, or the walk would end: the store is moved aside and rebuilt, as a damaged one,
    and none of its verdicts counts (those loaded before the bad row included)."""
    import sqlite3

    path = tmp_path / "v.sqlite"
    cache = VerdictCache(str(path))
    cache.record_clean("e", "v1", Claim(synthetic(1)))
    cache.close()
    db = sqlite3.connect(path)
    db.execute(row)
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="elkscan.cache"):
        cache = VerdictCache(str(path))
    assert any("unreadable" in r.getMessage() and "no scan could have written" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "v.sqlite.corrupt").exists()
    cache.record_clean("e", "v1", Claim(synthetic(2)))
    assert cache.is_clean("e", "v1", synthetic(2)) and not cache.is_clean("e", "v1", synthetic(1))
    cache.close()


ANY_TIME = strategies.integers(-(1 << 96), 1 << 96)  # a filesystem's seconds times 10**9, and more


@settings(max_examples=500, deadline=None)
@given(dev=strategies.integers(0, (1 << 32) - 1), ino=strategies.integers(0, (1 << 64) - 1),
       size=strategies.integers(0, (1 << 63) - 1), mtime_ns=ANY_TIME, ctime_ns=ANY_TIME, named=strategies.booleans())
def test_any_status_is_looked_up_without_raising_and_found_only_when_stored(dev, ino, size, mtime_ns, ctime_ns,
                                                                            named, tmp_path_factory):
    """Fuzzed identities (hypothesis, 500 examples; any status a kernel may give: a FUSE filesystem picks
    its inode numbers and times, the kernel its 32-bit device numbers): a look-up never raises, and finds
    a verdict only when one was stored under that very identity, which happens only when it fits."""
    cache = VerdictCache(str(tmp_path_factory.mktemp("fuzz") / "v.sqlite"))
    path = "/srv/x" if named else None
    status = SimpleNamespace(st_dev=dev, st_ino=ino, st_size=size, st_mtime_ns=mtime_ns, st_ctime_ns=ctime_ns,
                             st_mode=stat.S_IFREG | 0o644)
    # a verdict on the same inode number (modulo 2**63), so that the look-ups make keys from the start
    cache.record_clean("e", "v1", Claim(SimpleNamespace(st_dev=dev, st_ino=ino % (1 << 63), st_size=size,
                                                        st_mtime_ns=-1, st_ctime_ns=-1)), path)
    assert not cache.is_clean("e", "v1", status, path) or (ino < 1 << 63 and mtime_ns == ctime_ns == -1)
    fits = ino < 1 << 63 and all(-(1 << 63) <= t < 1 << 63 for t in (mtime_ns, ctime_ns))
    if fits:
        cache.record_clean("e", "v1", Claim(status), path)
    for _ in range(2):
        assert cache.is_clean("e", "v1", status, path) == fits
        assert cache.clean_all("e", "v1", [status], None if path is None else [path]) == [fits]
        cache.close()
        cache = VerdictCache(cache.path)
    cache.close()
