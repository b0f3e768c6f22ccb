"""dirscan against real trees: links, loops, FIFOs, unreadable and vanishing files, depth, filters."""

import os
import pytest

from elkscan_core import make_plugin_manager, parse_pipeline
from elkscan_core.default_plugins.dirscan import Dirscan, DirscanConfig
from elkscan_core.pipeline import structure
from elkscan_core.runner import Session


def walker(**options):
    session = Session(parse_pipeline({"version": 1}), make_plugin_manager([]))
    return Dirscan(structure(options, DirscanConfig, "with"), session), session


def found(tree, depth=-1, **options):
    source, session = walker(roots={str(tree): depth}, type_filter=False, **options)
    targets = [t for t in source.walk(str(tree), depth) if not t.skip]  # judged ones; skips are counted
    for t in targets:
        os.close(t.fd)
    return sorted(os.path.relpath(t.path, tree) for t in targets), session


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b" / "c").mkdir(parents=True)
    for rel in ("top.sh", "a/one.sh", "a/b/two.sh", "a/b/c/three.sh"):
        (root / rel).write_text("#!/bin/sh\necho hi\n")
    return root


def test_depth_counts_from_the_root(tree):
    assert found(tree, 1)[0] == ["top.sh"]
    assert found(tree, 2)[0] == ["a/one.sh", "top.sh"]
    assert found(tree)[0] == ["a/b/c/three.sh", "a/b/two.sh", "a/one.sh", "top.sh"]


def test_directory_links_are_not_followed_and_loops_end(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.sh").write_text("#!/bin/sh\nexit 0\n")
    os.symlink(outside, tree / "a" / "to-outside")
    os.symlink(tree, tree / "a" / "b" / "loop")
    assert found(tree)[0] == ["a/b/c/three.sh", "a/b/two.sh", "a/one.sh", "top.sh"]
    names, _ = found(tree, links="always")  # followed on request, each directory once
    assert "a/to-outside/secret.sh" in names and len(names) == 5


def test_file_links_are_scanned_under_their_name_only_inside_the_roots(tree, tmp_path):
    outside = tmp_path / "outside.sh"
    outside.write_text("#!/bin/sh\nexit 0\n")
    os.symlink(tree / "top.sh", tree / "link-inside.sh")
    os.symlink(outside, tree / "link-outside.sh")
    os.symlink(tree / "missing", tree / "dangling.sh")
    names, _ = found(tree, 1)
    assert names == ["link-inside.sh", "top.sh"]
    assert "link-outside.sh" in found(tree, 1, links="always")[0]
    assert found(tree, 1, links="never")[0] == ["top.sh"]


def test_fifos_and_sizes_are_skipped_without_blocking(tree):
    os.mkfifo(tree / "pipe")
    (tree / "tiny").write_bytes(b"1234")
    (tree / "big").write_bytes(b"x" * 2000)
    assert found(tree, 1, max_size=1000)[0] == ["top.sh"]


def test_filter_prefixes_match_whole_components(tree):
    (tree / "ab").mkdir()
    (tree / "ab" / "kept.sh").write_text("#!/bin/sh\n")
    assert found(tree, exclude=[str(tree / "a")])[0] == ["ab/kept.sh", "top.sh"]


def test_type_filter_skips_media_and_archives_but_not_executables(tree):
    (tree / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (tree / "archive.gz").write_bytes(b"\x1f\x8b\x08" + b"\0" * 64)
    (tree / "prog").write_bytes(b"\x7fELF" + b"\0" * 64)
    source, _ = walker(roots={str(tree): 1})
    targets = list(source.walk(str(tree), 1))
    names = sorted(os.path.basename(t.path) for t in targets if not t.skip)
    assert names == ["prog", "top.sh"]
    assert sorted((os.path.basename(t.path), t.skip) for t in targets if t.skip) == [
        ("archive.gz", "type filter"), ("image.png", "type filter")]


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
    import json
    import logging

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
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
    names, session = found(tree)
    return names, session.summary.errors


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unreadable_files_and_directories_are_errors_and_the_walk_goes_on(tree):
    import shutil
    import tempfile
    from pathlib import Path

    public = Path(tempfile.mkdtemp(prefix="elkscan-test-"))  # reachable by nobody, unlike tmp_path
    public.chmod(0o755)
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
    assert any("cannot list: Permission denied" in line for line in logs)


def test_elkeid_filter_list_matches_whole_components_not_raw_prefixes():
    from elkscan_core.paths import ELKEID_EXCLUDES, PathFilter

    excluded = PathFilter(ELKEID_EXCLUDES)
    assert excluded("/dev") and excluded("/dev/shm/x") and excluded("/usr/bin/nc")
    assert excluded("/etc/elkeid/plugin/scanner/scanner")
    assert not excluded("/devices/x") and not excluded("/usr/bin/ncat") and not excluded("/usr/srcx")
    assert PathFilter(["/"])("/anything") and not PathFilter([])("/anything")
