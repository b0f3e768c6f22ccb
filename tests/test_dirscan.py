"""dirscan against real trees and real attacks: links, loops, races, FIFOs, unreadable, deep and huge
directories, named paths, and the policy skips it reports instead of dropping."""

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from elkscan_core import Engine, filetype, hookimpl, make_plugin_manager, parse_pipeline
from elkscan_core.default_plugins.dirscan import OPEN_DIRS, Dirscan, DirscanConfig
from elkscan_core.paths import Lookup, Outside, under
from elkscan_core.pipeline import structure
from elkscan_core.runner import Session
from elkscan_core.testing import eicar, run

NOBODY = 65534


def walker(**options):
    session = Session(parse_pipeline({"version": 1}), make_plugin_manager([]))
    return Dirscan(structure(options, DirscanConfig, "with"), session), session


def walk(tree, depth=-1, **options):
    """(names of the files to judge, {name: skip reason}, session) of one walk of ``tree``."""
    options.setdefault("type_filter", False)
    source, session = walker(roots={str(tree): depth}, **options)
    judged, skipped = [], {}
    for target in source.walk(str(tree), depth):
        name = os.path.relpath(target.path, tree)
        if target.skip:
            assert target.fd is None
            skipped[name] = target.skip
        else:
            judged.append(name)
            os.close(target.fd)
    return sorted(judged), skipped, session


def found(tree, depth=-1, **options):
    return walk(tree, depth, **options)[0]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b" / "c").mkdir(parents=True)
    for rel in ("top.sh", "a/one.sh", "a/b/two.sh", "a/b/c/three.sh"):
        (root / rel).write_text("#!/bin/sh\necho hi\n")
    return root


def public_dir():
    """A fresh directory that ``nobody`` can reach (pytest's tmp_path is 0700 under root's)."""
    path = Path(tempfile.mkdtemp(prefix="elkscan-test-"))
    path.chmod(0o755)
    return path


def test_depth_counts_from_the_root(tree):
    assert found(tree, 1) == ["top.sh"]
    assert found(tree, 2) == ["a/one.sh", "top.sh"]
    assert found(tree) == ["a/b/c/three.sh", "a/b/two.sh", "a/one.sh", "top.sh"]


def test_directory_links_are_not_followed_and_loops_end(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.sh").write_text("#!/bin/sh\nexit 0\n")
    os.symlink(outside, tree / "a" / "to-outside")
    os.symlink(tree, tree / "a" / "b" / "loop")
    assert found(tree) == ["a/b/c/three.sh", "a/b/two.sh", "a/one.sh", "top.sh"]
    names = found(tree, links="always")  # followed on request, each directory once
    assert "a/to-outside/secret.sh" in names and len(names) == 5


def test_file_links_are_scanned_under_their_name_only_inside_the_roots(tree, tmp_path):
    outside = tmp_path / "outside.sh"
    outside.write_text("#!/bin/sh\nexit 0\n")
    os.symlink(tree / "top.sh", tree / "link-inside.sh")
    os.symlink("a/../a/b/../one.sh", tree / "relative.sh")
    os.symlink(outside, tree / "link-outside.sh")
    os.symlink("../outside.sh", tree / "relative-outside.sh")
    os.symlink(tree / "missing", tree / "dangling.sh")
    assert found(tree, 1) == ["link-inside.sh", "relative.sh", "top.sh"]
    assert found(tree, 1, links="always") == [
        "link-inside.sh", "link-outside.sh", "relative-outside.sh", "relative.sh", "top.sh"]
    assert found(tree, 1, links="never") == ["top.sh"]


def test_a_link_outside_the_roots_never_steers_a_link_inside(tree, tmp_path):
    """A link inside a root that goes through a link outside the roots is not followed, even when the
    outer link leads back in: whoever owns the outside link would decide what is opened."""
    hop = tmp_path / "hop"
    os.symlink(tree / "a", hop)
    os.symlink(hop / "one.sh", tree / "via-outside.sh")
    assert found(tree, 1) == ["top.sh"]


def test_special_files_are_counted_never_opened_and_sizes_are_reported(tree):
    os.mkfifo(tree / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tree / "sock"))
        os.symlink("/dev/zero", tree / "zero")
        (tree / "tiny").write_bytes(b"1234")
        (tree / "big").write_bytes(b"x" * 2000)
        writer = threading.Thread(target=lambda: os.close(os.open(tree / "pipe", os.O_WRONLY)), daemon=True)
        writer.start()  # blocks until someone opens the FIFO for reading
        judged, skipped, session = walk(tree, 1, max_size=1000, links="always", exclude=[])
        assert writer.is_alive(), "the walk opened the FIFO"
        os.close(os.open(tree / "pipe", os.O_RDONLY | os.O_NONBLOCK))
        writer.join(5)
    assert judged == ["top.sh"] and session.summary.errors == 0
    assert skipped == {"pipe": "not a regular file", "sock": "not a regular file", "zero": "not a regular file",
                       "tiny": "below min_size", "big": "above max_size"}


def test_special_files_met_in_a_walk_are_not_required_but_policy_skips_are(tree):
    os.mkfifo(tree / "pipe")
    (tree / "big").write_bytes(b"x" * 2000)
    source, _ = walker(roots={str(tree): 1}, max_size=1000, required=True)
    targets = {os.path.basename(t.path): t for t in source.walk(str(tree), 1)}
    os.close(targets.pop("top.sh").fd)
    assert targets["pipe"].skip == "not a regular file" and not targets["pipe"].required
    assert targets["big"].skip == "above max_size" and targets["big"].required


def test_filter_prefixes_match_whole_components_and_are_reported(tree):
    (tree / "ab").mkdir()
    (tree / "ab" / "kept.sh").write_text("#!/bin/sh\n")
    judged, skipped, _ = walk(tree, exclude=[str(tree / "a"), str(tree / "top.sh")])
    assert judged == ["ab/kept.sh"]
    assert skipped == {"a": "excluded", "top.sh": "excluded"}  # one for the directory, not its files


class Unpacker(Engine):
    """Stands for an engine that looks inside archives (clamav)."""
    id = "unpacker"
    unpacks_archives = True


def test_type_filter_skips_media_and_archives_unless_an_engine_unpacks_them(tree):
    (tree / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (tree / "archive.gz").write_bytes(b"\x1f\x8b\x08" + b"\0" * 64)
    (tree / "prog").write_bytes(b"\x7fELF" + b"\0" * 64)
    judged, skipped, _ = walk(tree, 1, type_filter=True)
    assert judged == ["prog", "top.sh"]
    assert skipped == {"image.png": "type filter: image", "archive.gz": "type filter: archive"}

    source, session = walker(roots={str(tree): 1})
    session.engines.append(Unpacker(None, session))
    targets = {os.path.basename(t.path): t for t in source.walk(str(tree), 1)}
    assert targets["image.png"].skip == "type filter: image"
    assert targets["archive.gz"].skip == "" and targets["archive.gz"].fd is not None
    for target in targets.values():
        if target.fd is not None:
            os.close(target.fd)

    source, session = walker(roots={str(tree): 1}, archives_to_engines=False)  # Elkeid's 6057
    session.engines.append(Unpacker(None, session))
    targets = {os.path.basename(t.path): t for t in source.walk(str(tree), 1)}
    assert targets["archive.gz"].skip == "type filter: archive" and targets["archive.gz"].fd is None
    for target in targets.values():
        if target.fd is not None:
            os.close(target.fd)


def test_what_a_walk_does_not_judge_is_counted_by_reason_and_shown_with_all(tmp_path):
    tree = tmp_path / "tree"
    (tree / "skip").mkdir(parents=True)
    (tree / "skip" / "eicar.com").write_bytes(eicar())
    (tree / "eicar.com").write_bytes(eicar())
    (tree / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (tree / "big.sh").write_bytes(b"#" * 2000)
    (tree / "tiny").write_bytes(b"1234")
    os.mkfifo(tree / "pipe")
    result = run(yara_pipeline(tmp_path, {str(tree): -1}, max_size=1000, exclude=[str(tree / "skip")]),
                 report_clean=True)
    assert result.summary.not_scanned == {"excluded": 1, "type filter: image": 1, "above max_size": 1,
                                          "below min_size": 1, "not a regular file": 1}
    assert result.summary.unjudged == 0 and result.summary.errors == 0
    outcome = {os.path.basename(r.target.path): (r.status, r.skipped) for r in result.records}
    assert outcome == {"eicar.com": ("detected", ""), "skip": ("not_scanned", "excluded"),
                       "image.png": ("not_scanned", "type filter: image"),
                       "big.sh": ("not_scanned", "above max_size"), "tiny": ("not_scanned", "below min_size"),
                       "pipe": ("not_scanned", "not a regular file")}


def elkscan_scan(tmp_path, *args):
    """The real command on named paths, with a YARA-only pipeline."""
    pipeline = tmp_path / "yara.json"
    pipeline.write_text(json.dumps({"version": 1, "plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
                                    "engines": [{"use": "yara"}]}))
    return subprocess.run([sys.executable, "-m", "elkscan_core.cli", "scan", "-p", str(pipeline), "-f", "jsonl",
                           *map(str, args)], capture_output=True, text=True, timeout=120)


def test_named_paths_are_judged_or_reported_with_exit_code_2(tmp_path):
    """Audit B4, B8, B9, B13: a named link is followed; a named FIFO, socket, device, dangling link or
    file over --max-size is reported not scanned with its reason, and the exit code is never 0."""
    (tmp_path / "real.com").write_bytes(eicar())
    os.symlink("real.com", tmp_path / "alias.com")
    os.symlink("nowhere", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.sh").write_bytes(b"#" * 2000)
    out = elkscan_scan(tmp_path, tmp_path / "alias.com", tmp_path / "dangling", tmp_path / "big.sh",
                       "--max-size", "1KiB")
    assert out.returncode == 1, out.stderr
    records = {json.loads(line)["path"]: json.loads(line).get("signature") for line in out.stdout.splitlines()}
    assert records == {str(tmp_path / "alias.com"): "Multios_TestFile_Eicar",  # named, so shown unjudged
                       str(tmp_path / "dangling"): None, str(tmp_path / "big.sh"): None}
    assert "2 not scanned" in out.stderr and "1 above max_size" in out.stderr and "1 does not exist" in out.stderr
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        for path in (tmp_path / "fifo", tmp_path / "sock", "/dev/zero", tmp_path / "dangling"):
            out = elkscan_scan(tmp_path, path)
            assert out.returncode == 2 and "1 not scanned" in out.stderr, (path, out.stderr)


def _category_reference(head):
    """The type filter as a plain scan of every magic in order, to check the indexed one against."""
    if head[:4] == b"RIFF":
        return filetype._RIFF.get(head[8:12])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "audio" if brand in filetype._FTYP_AUDIO else "image" if brand in filetype._FTYP_IMAGE else "video"
    return next((kind for offset, magic, kind in filetype._MAGIC if head.startswith(magic, offset)), None)


MAGICS = [magic for _, magic, _ in filetype._MAGIC] + [b"RIFF", b"ftyp", b"BOOKMOBI", b"\0" * 4]


@settings(max_examples=1000, deadline=None)
@given(head=st.one_of(st.binary(max_size=64),
                      st.lists(st.one_of(st.sampled_from(MAGICS), st.binary(max_size=8)), max_size=8).map(
                          lambda parts: b"".join(parts)[:64])))
def test_the_type_filter_reads_any_64_bytes_as_the_plain_scan_does(head):
    """Fuzzed heads (hypothesis, 1,000 examples, half built from the magics themselves)."""
    assert filetype.category(head) == _category_reference(head)


def test_a_file_deleted_mid_walk_is_skipped_quietly(tree):
    source, session = walker(roots={str(tree): -1}, type_filter=False)
    names = []
    for target in source.walk(str(tree), -1):
        names.append(os.path.basename(target.path))
        os.close(target.fd)
        if (tree / "a" / "one.sh").exists():
            os.unlink(tree / "a" / "one.sh")
            os.unlink(tree / "a" / "b" / "two.sh")
    assert "two.sh" not in names and session.summary.errors == 0


def as_nobody(fn, *args):
    """Run fn(*args) in a forked child that dropped root, so that permissions apply; its return value
    and its log lines come back through a pipe."""
    import logging

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            records = []
            handler = logging.Handler()
            handler.emit = lambda record: records.append(record.getMessage())
            logging.getLogger("elkscan").addHandler(handler)
            result = fn(*args)
            os.write(write, json.dumps([result, records]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _names_and_errors(tree):
    judged, _, session = walk(tree)
    return judged, session.summary.errors


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unreadable_files_and_directories_are_errors_and_the_walk_goes_on(tree):
    public = public_dir()
    tree = Path(shutil.copytree(tree, public / "root"))
    (tree / "locked.sh").write_text("#!/bin/sh\n")
    (tree / "locked.sh").chmod(0)
    (tree / "a" / "b").chmod(0)
    try:
        (names, errors), logs = as_nobody(_names_and_errors, tree)
    finally:
        (tree / "a" / "b").chmod(0o755)
        shutil.rmtree(public)
    assert names == ["a/one.sh", "top.sh"] and errors == 2
    assert any("locked.sh: dirscan: failed: cannot open: Permission denied" in line for line in logs)
    assert any("a/b: dirscan: failed: cannot list: Permission denied" in line for line in logs)


# -- a local user cannot stop the walk (audit B1-B3) ----------------------------------------------

def yara_pipeline(tmp_path, roots, **options):
    return {"plugins": ["yara_backend"], "state_dir": str(tmp_path / "state"),
            "sources": [{"use": "dirscan", "with": {"roots": roots, **options}}],
            "engines": [{"use": "yara"}]}


@pytest.fixture
def two_roots(tmp_path):
    """A symlink loop made by nobody in the first root, EICAR in the second (audit B1)."""
    first, second = tmp_path / "t5a", tmp_path / "t5b"
    (first / "home" / "user").mkdir(parents=True)
    (first / "home" / "user" / "note.sh").write_text("#!/bin/sh\necho note\n")
    os.symlink("y", first / "home" / "user" / "x")
    os.symlink("x", first / "home" / "user" / "y")
    for link in ("x", "y"):
        os.lchown(first / "home" / "user" / link, NOBODY, NOBODY)
    second.mkdir()
    (second / "eicar.com").write_bytes(eicar())
    return first, second


def test_a_symlink_loop_is_one_error_per_link_and_the_next_root_is_walked(tmp_path, two_roots):
    first, second = two_roots
    result = run(yara_pipeline(tmp_path, {str(first): 3, str(second): 3}))
    assert result.detected == {str(second / "eicar.com"): ["Multios_TestFile_Eicar"]}
    assert result.summary.errors == 2  # x and y: "cannot follow link: Too many levels of symbolic links"


class StopAfter:
    """Stops the session a few seconds after it starts, as SIGTERM stops ``elkscan run``."""

    def __init__(self, seconds):
        self.seconds = seconds

    @hookimpl
    def elkscan_session_start(self, session):
        threading.Timer(self.seconds, session.stop).start()


def test_a_periodic_walk_goes_on_after_a_symlink_loop(tmp_path, two_roots):
    first, second = two_roots
    result = run(yara_pipeline(tmp_path, {str(first): 3, str(second): 3}, every="1s"),
                 extra_plugins=[StopAfter(3.5)])
    hits = [r for r in result.records if r.detections and r.target.path == str(second / "eicar.com")]
    assert len(hits) >= 3  # one per pass: at 0 s, 1 s, 2 s, 3 s
    assert result.summary.errors == 2 * len(hits)


def deep_tree(base: Path, levels: int, name_length: int) -> str:
    """``levels`` nested directories of ``name_length``-byte names under ``base`` (made relative to
    directory descriptors: the path is longer than PATH_MAX), EICAR at the bottom; returns its path."""
    name = "d" * name_length
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("eicar.com", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, eicar())
        os.close(out)
    finally:
        os.close(fd)
    return str(base) + f"/{name}" * levels + "/eicar.com"


def test_a_path_longer_than_path_max_is_walked_to_the_bottom(tmp_path):
    deep = tmp_path / "deep"
    deep.mkdir()
    bottom = deep_tree(deep, 30, 200)  # audit B3: 30 nested 200-byte names
    assert len(bottom) > 6000
    result = run(yara_pipeline(tmp_path, {str(deep): -1}))
    assert result.detected == {bottom: ["Multios_TestFile_Eicar"]}
    assert result.summary.errors == 0


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_a_deep_walk_holds_a_bounded_number_of_descriptors_and_survives_a_move(tmp_path):
    """300 levels, each with a sibling directory holding a file: the walk keeps at most OPEN_DIRS
    directory descriptors; directories whose descriptor was closed are reopened through '..', or by
    their path when a child was moved away meanwhile (here: level 150 moved to the root while the walk
    is below it)."""
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(300):
        os.mkdir("s", dir_fd=fd)
        out = os.open(f"s/f{level}.sh", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"#!/bin/sh\n")
        os.close(out)
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    source, session = walker(roots={str(root): -1}, type_filter=False)
    base, most, names = open_fds(), 0, set()
    for target in source.walk(str(root), -1):
        most = max(most, open_fds() - base)
        names.add(os.path.basename(target.path))
        os.close(target.fd)
        if target.path.count("/d") == 200 and not (root / "moved").exists():
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            os.rename("d/" * 150, "moved", src_dir_fd=fd, dst_dir_fd=fd)
            os.close(fd)
    assert names == {f"f{level}.sh" for level in range(300)}
    assert session.summary.errors == 0
    assert most <= OPEN_DIRS + 4  # + a listing, a look-up, the target, /proc/self/fd itself


def _walk_peak(path, **options):
    source, _ = walker(roots={str(path): 1}, **options)
    tracemalloc.start()
    count = 0
    for target in source.walk(str(path), 1):
        count += 1
        if target.fd is not None:
            os.close(target.fd)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return count, peak


def test_a_huge_directory_is_streamed_not_held(tmp_path):
    """Audit B16/H3: the listing of a 10,000-entry directory is not held in memory (the old walk's list
    of its entries peaked at 2.1 MB; a 200,000-entry one at 40 MB, which limits.memory throttled)."""
    many = tmp_path / "many"
    many.mkdir()
    fd = os.open(many, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(10_000):
        os.close(os.open(f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    count, peak = _walk_peak(many)
    assert count == 10_000  # each one a skip target: below min_size
    assert peak < 500_000


def test_a_listing_pauses_to_walk_its_subdirectories_first(tmp_path, monkeypatch):
    """A directory keeps at most PENDING subdirectory names before its listing pauses (8 here); every
    file is still found, however the pauses nest."""
    from elkscan_core.default_plugins import dirscan

    monkeypatch.setattr(dirscan, "PENDING", 8)
    monkeypatch.setattr(dirscan, "PAUSED", 2)
    expected = []
    for i in range(20):
        for j in range(12):
            (tmp_path / "r" / f"{i}" / f"{j}").mkdir(parents=True)
            (tmp_path / "r" / f"{i}" / f"{j}" / "f.sh").write_text("#!/bin/sh\n")
            expected.append(f"{i}/{j}/f.sh")
    assert found(tmp_path / "r") == sorted(expected)


# -- links: the decision and the open see the same objects (audit B6) ------------------------------

RACER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE, SYS_renameat2 = -100, 2, 316
os.chdir(sys.argv[1])
swaps = 0
def done(*_):
    print(swaps, flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    if libc.syscall(SYS_renameat2, AT_FDCWD, b"real", AT_FDCWD, b"swap", RENAME_EXCHANGE) != 0:
        sys.exit(ctypes.get_errno())
    swaps += 1
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="renameat2 is syscall 316 on x86_64 only")
def test_a_directory_swapped_for_a_link_never_opens_a_file_outside_the_roots(tmp_path):
    """Audit B6: a racer exchanges ``race/real`` (a directory) with a link to a directory outside every
    root, in a tight loop, while ``race/l -> real/target`` is followed under ``links: inside``. The
    file outside (EICAR) must never be what a target holds, in 2,000 walks. (The old walk, which
    checked realpath() and then opened the path following links, opened it in some of them; the
    audit's CLI runs, in 62 of 243.)"""
    race, secret = tmp_path / "race", tmp_path / "secret"
    (race / "real").mkdir(parents=True)
    (race / "real" / "target").write_text("#!/bin/sh\necho inside\n")
    secret.mkdir()
    (secret / "target").write_bytes(eicar())
    outside = os.stat(secret / "target")
    os.symlink(secret, race / "swap")
    os.symlink("real/target", race / "l")
    racer = subprocess.Popen([sys.executable, "-c", RACER, str(race)], stdout=subprocess.PIPE, text=True)
    try:
        assert racer.stdout.readline() == "ready\n"
        source, _ = walker(roots={str(race): 1}, type_filter=False)
        followed = 0
        for _ in range(2000):
            for target in source.walk(str(race), 1):
                opened = os.fstat(target.fd)
                os.close(target.fd)
                assert (opened.st_dev, opened.st_ino) != (outside.st_dev, outside.st_ino), "opened outside"
                followed += target.path.endswith("/l")
        assert racer.poll() is None, "the racer stopped"
    finally:
        racer.terminate()
        swaps = int(racer.stdout.readline() or 0)
        racer.wait()
    assert swaps > 1000 and followed > 0  # the race ran, and the link is followed when it leads inside


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    """A small tree with links of every shape, for comparing Lookup with the kernel's resolution."""
    base = tmp_path_factory.mktemp("maze")
    (base / "a" / "b").mkdir(parents=True)
    (base / "c").mkdir()
    (base / "a" / "f").write_text("f")
    (base / "a" / "b" / "g").write_text("g")
    os.symlink("b", base / "a" / "lb")
    os.symlink("../c", base / "a" / "lc")
    os.symlink(str(base / "a" / "b"), base / "a" / "abs")
    os.symlink("loop", base / "a" / "loop")
    os.symlink("nowhere", base / "a" / "dangling")
    return base.resolve()


COMPONENTS = ["..", ".", "", "a", "b", "c", "f", "g", "lb", "lc", "abs", "loop", "dangling"]


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=8), absolute=st.booleans())
def test_lookup_agrees_with_the_kernel(maze, parts, absolute):
    """Fuzzed link texts (hypothesis, 400 examples): Lookup finds what the kernel's own resolution
    finds, or fails where it fails, and stays inside when asked to."""
    text = "/".join(parts)
    assume(text)
    text = f"{maze}/a/{text}" if absolute else text
    start = str(maze / "a")
    fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            expected = os.stat(text, dir_fd=fd)
        except OSError as exc:
            expected = exc.errno
        with Lookup() as lookup:
            try:
                dir_fd, name, lst, real = lookup.follow(text, start, fd)
                got = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                got = exc.errno
        if isinstance(expected, int):
            assert got == expected or {got, expected} <= {errno.ENOENT, errno.ENOTDIR}
            return
        assert (got.st_dev, got.st_ino) == (expected.st_dev, expected.st_ino)
        assert real == os.path.realpath(os.path.join(start, text))
        with Lookup(inside=lambda r: under(r, start)) as lookup:
            try:
                lookup.follow(text, start, fd)
                assert under(real, start)
            except Outside:
                assert not under(real, start) or "abs" in parts or "lc" in parts or ".." in parts
    finally:
        os.close(fd)


# -- named paths (audit B4, B8, B9, B13) --------------------------------------------------------

def named(path, **options):
    source, _ = walker(roots={str(path): -1}, required=True, exclude=[], type_filter=False, min_size=0,
                       **options)
    return list(source.walk(os.path.abspath(path), -1))


def test_a_named_link_is_followed_wherever_it_points(tmp_path):
    (tmp_path / "real.com").write_bytes(eicar())
    os.symlink("real.com", tmp_path / "alias.com")
    for path in (tmp_path / "alias.com", Path(os.path.realpath(sys.executable))):
        [target] = named(path)
        assert target.path == str(path) and target.required and not target.skip
        assert os.fstat(target.fd).st_ino == os.stat(path).st_ino
        os.close(target.fd)
    real_bin = tmp_path / "usr-bin"
    real_bin.mkdir()
    (real_bin / "tool").write_text("#!/bin/sh\n")
    os.symlink("usr-bin", tmp_path / "bin")  # a named directory link, like /bin -> usr/bin
    [target] = named(tmp_path / "bin")
    assert target.path == str(tmp_path / "bin" / "tool")
    os.close(target.fd)


def test_named_special_or_missing_paths_are_reported_not_scanned(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero-link")
    os.symlink("nowhere", tmp_path / "dangling")
    (tmp_path / "big").write_bytes(b"x" * 2000)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        cases = {"/dev/zero": "not a regular file", tmp_path / "fifo": "not a regular file",
                 tmp_path / "zero-link": "not a regular file", tmp_path / "sock": "not a regular file",
                 tmp_path / "dangling": "does not exist", tmp_path / "missing": "does not exist",
                 tmp_path / "big": "above max_size"}
        for path, reason in cases.items():
            [target] = named(path, max_size=1000)
            assert (target.skip, target.required, target.fd) == (reason, True, None), path


def test_a_named_file_that_comes_and_goes_is_always_accounted_for(tmp_path):
    """A racer renames a named file away and back in a tight loop: each walk of it yields exactly one
    target, judged or reported not scanned ("does not exist", "vanished"), never nothing."""
    (tmp_path / "named.sh").write_text("#!/bin/sh\n")
    racer = subprocess.Popen([sys.executable, "-c", "import os, sys\nos.chdir(sys.argv[1])\nprint(flush=True)\n"
                              "while True:\n os.rename('named.sh', 'away')\n os.rename('away', 'named.sh')",
                              str(tmp_path)], stdout=subprocess.PIPE)
    source, _ = walker(roots={str(tmp_path / "named.sh"): -1}, required=True, min_size=0)
    outcomes = set()
    try:
        racer.stdout.readline()
        for _ in range(2000):
            targets = list(source.walk(str(tmp_path / "named.sh"), -1))
            assert len(targets) == 1
            outcomes.add(targets[0].skip)
            if targets[0].fd is not None:
                os.close(targets[0].fd)
    finally:
        racer.kill()
        racer.wait()
    assert outcomes <= {"", "does not exist", "vanished"} and len(outcomes) >= 2, outcomes


def test_a_missing_configured_root_is_an_info_line_not_a_target(tmp_path, caplog):
    source, _ = walker(roots={str(tmp_path / "missing"): 2})
    with caplog.at_level("INFO", "elkscan"):
        assert list(source.walk(str(tmp_path / "missing"), 2)) == []
    assert "does not exist" in caplog.text


def test_elkeid_filter_list_matches_whole_components_not_raw_prefixes():
    from elkscan_core.paths import ELKEID_EXCLUDES, PathFilter

    excluded = PathFilter(ELKEID_EXCLUDES)
    assert excluded("/dev") and excluded("/dev/shm/x") and excluded("/usr/bin/nc")
    assert excluded("/etc/elkeid/plugin/scanner/scanner")
    assert not excluded("/devices/x") and not excluded("/usr/bin/ncat") and not excluded("/usr/srcx")
    assert PathFilter(["/"])("/anything") and not PathFilter([])("/anything")


COMPONENTS = st.sampled_from(["a", "b", "ab", "a.b", "[a]", "*"])


@settings(max_examples=500, deadline=None)
@given(prefixes=st.lists(st.lists(COMPONENTS, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
                         .map(lambda path: path + "/" * (len(path) % 2)), max_size=6),
       directory=st.lists(COMPONENTS, max_size=3).map(lambda parts: "/" + "/".join(parts)), name=COMPONENTS)
def test_a_walks_names_in_a_directory_are_excluded_as_their_paths_are(prefixes, directory, name):
    """A walk asks the exclusion list once a directory (``names_in``) instead of once an entry: for a
    directory that is not excluded itself, a name is excluded exactly when its path is (hypothesis, 500
    examples)."""
    from elkscan_core.paths import PathFilter, join

    excluded = PathFilter(prefixes)
    assume(not excluded(directory))
    assert (name in excluded.names_in(directory)) == excluded(join(directory, name))
