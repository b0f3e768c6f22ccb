"""``mapping.contents``: what an engine that scans memory sees of a file is all of it, as it was opened or
as it is now, or an error; never a part passed off as the whole."""

from __future__ import annotations

import mmap
import os

from elkscan_core.mapping import READ_BELOW, contents


def opened(path, data: bytes) -> tuple[int, int]:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return fd, os.fstat(fd).st_size


def test_a_small_file_is_read_whole_into_the_threads_buffer(tmp_path):
    fd, size = opened(tmp_path / "f", b"abc" * 1000)
    try:
        with contents(fd, size) as data:
            assert isinstance(data, memoryview) and bytes(data) == b"abc" * 1000
        with contents(fd, size) as again:
            assert again.obj is data.obj  # the same buffer, no allocation a file
    finally:
        os.close(fd)


def test_an_empty_file_is_read_as_nothing(tmp_path):
    fd, size = opened(tmp_path / "f", b"")
    try:
        with contents(fd, size) as data:
            assert bytes(data) == b""
    finally:
        os.close(fd)


def test_a_small_file_that_grew_or_shrank_since_it_was_opened_is_read_as_it_is_now(tmp_path):
    for now in (b"x" * 10, b"y" * 5000):
        fd, size = opened(tmp_path / "f", b"z" * 100)
        try:
            (tmp_path / "f").write_bytes(now)  # the same inode, another size
            with contents(fd, size) as data:
                assert bytes(data) == now
        finally:
            os.close(fd)


def test_a_small_file_that_grew_past_the_read_limit_is_mapped_whole(tmp_path):
    fd, size = opened(tmp_path / "f", b"small")
    try:
        big = os.urandom(READ_BELOW + 4096)
        (tmp_path / "f").write_bytes(big)
        with contents(fd, size) as data:
            assert isinstance(data, mmap.mmap) and data[:] == big
    finally:
        os.close(fd)


def test_a_large_file_is_mapped(tmp_path):
    body = os.urandom(READ_BELOW)
    fd, size = opened(tmp_path / "f", body)
    try:
        with contents(fd, size) as data:
            assert isinstance(data, mmap.mmap) and data[:] == body
    finally:
        os.close(fd)
