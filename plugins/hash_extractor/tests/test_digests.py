"""Elkeid's file facts checked against independent computations: hashlib, xxhash, os.stat and
coreutils ``stat`` (which reads the birth time through statx)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest
import xxhash

from elkscan_core.statx import birth_time
from elkscan_hash_extractor import exe_hash, file_facts


def facts_of(path, **options):
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_facts(fd, os.fstat(fd), **options)
    finally:
        os.close(fd)


def coreutils_birth_time(path) -> int:
    """``stat -c %W``: coreutils' own statx call; 0 when the birth time is unknown."""
    out = subprocess.run(["stat", "-c", "%W", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.parametrize("content, expected", [
    (b"", "34c96acdcadb1bbb"),
    (b"hello world\n", "5c5781b12bd27266"),
    (bytes(i % 251 for i in range(100000)), "22d5d9a0f502b839"),
], ids=["empty", "hello-world", "100000-bytes"])
def test_elkeid_exe_hash_vectors(tmp_path, content, expected):
    path = tmp_path / "f"
    path.write_bytes(content)
    assert facts_of(path).exe_hash == expected
    assert exe_hash(len(content), content[:32768]) == expected


@pytest.mark.parametrize("size", [0, 1, 32767, 32768, 32769, 5 * 1024 * 1024 + 3],
                         ids=lambda s: f"{s}-bytes")
def test_file_facts_match_independent_computations(tmp_path, size):
    content = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    facts = facts_of(path, sha256=True)
    st = os.stat(path)
    assert facts.exe_size == size == st.st_size
    assert facts.exe_hash == xxhash.xxh64(size.to_bytes(8, "little") + content[:32768]).hexdigest()
    assert facts.md5_hash == hashlib.md5(content).hexdigest()
    assert facts.sha256 == hashlib.sha256(content).hexdigest()
    assert facts.modify_at == int(st.st_mtime)
    assert facts.create_at == coreutils_birth_time(path)
    assert facts.as_fields().keys() == {"exe_size", "exe_hash", "md5_hash", "sha256", "create_at",
                                        "modify_at"}


def test_birth_time_is_real_where_the_filesystem_has_one(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    os.utime(path, (1_000_000_000, 1_000_000_000))  # mtime moves; the birth time cannot
    facts = facts_of(path)
    assert facts.modify_at == 1_000_000_000
    assert facts.create_at == coreutils_birth_time(path)
    if facts.create_at == 0:
        pytest.skip(f"the filesystem of {tmp_path} records no birth time")
    assert facts.create_at > 1_000_000_000


def test_birth_time_is_zero_where_the_filesystem_has_none():
    fd = os.open("/proc/self/stat", os.O_RDONLY)  # procfs keeps no birth time
    try:
        assert birth_time(fd) == 0 == coreutils_birth_time("/proc/self/stat")
    finally:
        os.close(fd)


def test_md5_and_sha256_are_left_out_or_empty_as_elkeid_says(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert "sha256" not in facts_of(path).as_fields()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # reading a directory fails: EISDIR
    try:
        facts = file_facts(fd, os.fstat(fd), sha256=True)
    finally:
        os.close(fd)
    assert (facts.exe_hash, facts.md5_hash, facts.sha256) == ("-3", "", "")


def test_the_open_file_is_hashed_not_whatever_is_at_its_path_now(tmp_path):
    path = tmp_path / "swapped"
    path.write_bytes(b"the file that was judged\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        replacement = tmp_path / "replacement"
        replacement.write_bytes(b"something else entirely\n")
        os.rename(replacement, path)
        facts = file_facts(fd, os.fstat(fd))
    finally:
        os.close(fd)
    assert facts.md5_hash == hashlib.md5(b"the file that was judged\n").hexdigest()


def test_small_chunks_and_pacing_give_the_same_facts(tmp_path):
    content = random.Random(1).randbytes(100_000)
    path = tmp_path / "f"
    path.write_bytes(content)
    assert facts_of(path, chunk=4096, pace=0.001) == facts_of(path)


def test_digests_already_known_are_not_recomputed(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"content")
    facts = facts_of(path, known={"md5": "m" * 32})
    assert facts.md5_hash == "m" * 32
    assert facts.exe_hash == xxhash.xxh64((7).to_bytes(8, "little") + b"content").hexdigest()


def test_the_raw_statx_system_call_agrees_with_the_c_library(tmp_path, monkeypatch):
    """Hosts with a C library older than glibc 2.28 use the system call directly."""
    from elkscan_core import statx

    raw = statx.syscall_statx()
    if raw is None:
        pytest.skip("no statx system call number known for this architecture")
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = birth_time(fd)
        monkeypatch.setattr(statx, "_statx", raw)
        assert statx.birth_time(fd) == expected == coreutils_birth_time(path)
    finally:
        os.close(fd)
