"""rpm's file digests read into the index, from output captured from the real rpm.

``data/rpm-qa.txt`` is what ``rpm -qa --qf QUERY`` (rpm 4.18.0, Debian's package) printed for three
packages built with rpmbuild and installed into a scratch root: ``elkscan-sample`` (SHA-256 digests,
noarch) with a program, a ``%config(noreplace)`` file, a directory, a file whose path holds spaces, a
symbolic link and a ``%ghost`` log; ``elkscan-sample-md5`` (built with
``_binary_filedigest_algorithm 1``: MD5, so rpm prints no algorithm) with a library; and
``elkscan-empty``, a package without files, which prints nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from elkscan_pkgverify import Aliases, IndexBuilder
from elkscan_pkgverify.rpm import parse_rpm_files

SAMPLE = Path(__file__).parent / "data" / "rpm-qa.txt"


def index_of(lines):
    builder = IndexBuilder(Aliases({b"/lib64/": b"/usr/lib64/"}))
    parse_rpm_files(lines, builder)
    return builder.build(), builder.problems


def owners(index, path):
    return [(p.name, p.version, p.arch, p.algorithm, digest.hex()) for p, digest in index.lookup(path)]


def test_the_captured_rpm_output_gives_every_verifiable_file_with_its_algorithm():
    with open(SAMPLE, "rb") as lines:
        index, problems = index_of(lines)
    assert problems == [] and len(index) == 3
    assert owners(index, "/usr/bin/elkscan-sample") == [
        ("elkscan-sample", "1.0-1", "noarch", "sha256", hashlib.sha256(b"#!/bin/sh\necho sample\n").hexdigest())]
    assert owners(index, "/usr/share/elkscan-sample/with space/a file.txt") == [
        ("elkscan-sample", "1.0-1", "noarch", "sha256", hashlib.sha256(b"data\n").hexdigest())]
    assert owners(index, "/lib64/libelkscan-sample.so.1") == [
        ("elkscan-sample-md5", "2.3-4.el7", "x86_64", "md5", hashlib.md5(b"\x7fELF not really a library\n").hexdigest())]
    for unverified in ("/etc/elkscan-sample.conf", "/var/log/elkscan-sample.log", "/usr/share/elkscan-sample",
                       "/usr/share/elkscan-sample/link"):
        assert owners(index, unverified) == [], unverified


def test_malformed_rpm_lines_are_skipped_and_named():
    lines = [b"short\tline\n", b"p\t1-1\tnoarch\t99\t0\t" + b"ab" * 16 + b"\t/usr/bin/unknown-algo\n",
             b"p\t1-1\tnoarch\t8\tx\t" + b"ab" * 32 + b"\t/usr/bin/bad-flags\n",
             b"p\t1-1\tnoarch\t8\t0\t" + b"ab" * 16 + b"\t/usr/bin/md5-width-for-sha256\n",
             b"p\t1-1\tnoarch\t8\t0\t" + b"ab" * 32 + b"\t/usr/bin/good\n", b"\n"]
    index, problems = index_of(lines)
    assert len(problems) == 4 and len(index) == 1
    assert owners(index, "/usr/bin/good")[0][4] == "ab" * 32
