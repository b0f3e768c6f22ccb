"""``hashes`` with ``when: new``: a fleet host sends the digests of what it judged afresh in a pass (the
verdict cache answers the rest), so an unchanged tree sends nothing on the next pass."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from elkscan_core.cache import dates_mmap_writes
from elkscan_core.testing import run


@pytest.fixture
def settled(tmp_path):
    """A tree of files last changed over a second ago (the cache keeps no verdict on a file changed within
    its settle time), on a filesystem that dates writes through a shared mapping as the cache requires
    (else beside these tests: /tmp may be a tmpfs)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        base = tmp_path if dates_mmap_writes(fd) else Path(tempfile.mkdtemp(prefix="when-new-",
                                                                            dir=Path(__file__).resolve().parent))
    finally:
        os.close(fd)
    tree = base / "tree"
    tree.mkdir()
    for number in range(4):
        (tree / f"file{number}.txt").write_bytes(b"content %d\n" % number * (number + 1))
    time.sleep(1.2)
    yield tree, tmp_path
    if base != tmp_path:
        shutil.rmtree(base)


def scan(tree, state, listed=(), when="new", report_clean=False):
    lists = state / "listed.hashes"
    lists.write_text("".join(f"md5:{hashlib.md5(p.read_bytes()).hexdigest()}:*:Unix.Test.Listed-{n}\n"
                             for n, p in enumerate(listed)) or f"md5:{'0' * 32}:1:Unix.Test.Nothing-1\n")
    result = run({"plugins": ["hash_extractor", "yara_backend"], "state_dir": str(state / "state"),
                  "limits": {"cache": True, "cache_path": str(state / "verdicts.sqlite")},
                  "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "exclude": [],
                                                          "type_filter": False}}],
                  "engines": ["yara", {"use": "hashlist", "with": {"files": [str(lists)]}}],
                  "enrichers": [{"use": "hashes", "with": {"when": when}}]}, report_clean=report_clean)
    return result, {Path(r.target.path).name: r for r in result.records}


def test_each_file_judged_afresh_gets_its_digests_and_the_cache_answers_the_rest(settled):
    tree, state = settled
    first, records = scan(tree, state)
    assert sorted(records) == ["file0.txt", "file1.txt", "file2.txt", "file3.txt"]  # clean ones included
    for name, record in records.items():
        assert record.status == "clean" and record.facts["md5_hash"] == hashlib.md5((tree / name).read_bytes()).hexdigest()
        assert record.judged_by == ("yara", "hashlist")
    assert first.summary.cached == 0

    second, records = scan(tree, state)  # unchanged: the cache answers every file, nothing is sent
    assert records == {} and second.summary.files == 4 and second.summary.cached == 8

    (tree / "file2.txt").write_bytes(b"changed since the last pass\n")
    third, records = scan(tree, state)
    assert sorted(records) == ["file2.txt"]
    assert records["file2.txt"].facts["md5_hash"] == hashlib.md5(b"changed since the last pass\n").hexdigest()
    assert third.summary.cached == 6


def test_detections_are_reported_whatever_the_cache_and_hits_sends_only_them(settled):
    tree, state = settled
    _, records = scan(tree, state, listed=[tree / "file1.txt"])
    assert records["file1.txt"].status == "detected" and len(records) == 4
    _, records = scan(tree, state, listed=[tree / "file1.txt"])
    assert sorted(records) == ["file1.txt"] and records["file1.txt"].facts["md5_hash"]  # a detection is never cached
    _, records = scan(tree, state, listed=[tree / "file1.txt"], when="hits")
    assert sorted(records) == ["file1.txt"]


def test_without_the_cache_every_file_is_new(settled):
    tree, state = settled
    for _ in range(2):
        result = run({"plugins": ["hash_extractor", "yara_backend"], "state_dir": str(state / "state"),
                      "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "exclude": [],
                                                              "type_filter": False}}],
                      "engines": ["yara"], "enrichers": [{"use": "hashes", "with": {"when": "new"}}]})
        assert len(result.records) == 4 and all("md5_hash" in r.facts for r in result.records)
