"""Elkeid's file facts, computed in one read pass over an open file.

``exe_hash`` is XXH64 (seed 0) over the file size as 8 little-endian bytes followed by the first
min(size, 32 KiB) bytes: Elkeid's cheap identity of an executable. ``md5_hash`` (and, on request,
SHA-256) cover the whole file. Everything is read through the descriptor the scan judged, with
``os.pread``, so a file replaced in between is not misreported and the shared offset is not moved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Optional

from elkscan_core import FileFacts

from elkscan_core.statx import birth_time

#: How much of the file ``exe_hash`` covers.
HEAD_SIZE = 32 * 1024
#: Elkeid reads (and paces) in 512 KiB chunks.
DEFAULT_CHUNK = 512 * 1024
#: Elkeid's exe_hash when the file cannot be read.
EXE_HASH_ERROR = "-3"


def exe_hash(size: int, head: bytes) -> str:
    """Elkeid's ``exe_hash`` of a file of ``size`` bytes whose first bytes are ``head``."""
    import xxhash

    hasher = xxhash.xxh64(size.to_bytes(8, "little"))
    hasher.update(head[:HEAD_SIZE])
    return hasher.hexdigest()


def read_digests(fd: int, size: int, algorithms: Sequence[str], *, chunk: int = DEFAULT_CHUNK,
                 pace: float = 0.0) -> tuple[bytes, dict[str, bytes]]:
    """Read the first ``size`` bytes of ``fd`` once: the head ``exe_hash`` needs, and the digest of
    every ``hashlib`` algorithm named. ``pace`` seconds of sleep follow each chunk but the last (Elkeid
    sleeps 125 ms per 512 KiB to stay out of the way); OSError propagates."""
    import hashlib  # here, not at import: it loads OpenSSL, which only hashing files needs

    hashers = [hashlib.new(name) for name in algorithms]
    head = b""
    offset = 0
    end = size if hashers else min(size, HEAD_SIZE)
    while offset < end:
        data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            break  # the file shrank since it was opened
        if offset < HEAD_SIZE:
            head += data[:HEAD_SIZE - offset]
        for hasher in hashers:
            hasher.update(data)
        offset += len(data)
        if pace and offset < end:
            time.sleep(pace)
    return head, {name: hasher.digest() for name, hasher in zip(algorithms, hashers)}


def file_facts(fd: int, st: os.stat_result, *, sha256: bool = False,
               known: Optional[Mapping[str, str]] = None, chunk: int = DEFAULT_CHUNK,
               pace: float = 0.0) -> FileFacts:
    """Elkeid's file set for the open file ``fd`` whose ``fstat`` is ``st``.

    ``known`` holds hex digests someone already computed from this same descriptor (the hashlist
    engine), which are then not read again. A read error gives Elkeid's error values: ``-3`` for
    ``exe_hash`` and ``""`` for the full-file digests.
    """
    known = dict(known or {})
    wanted = ["md5", "sha256"] if sha256 else ["md5"]
    missing = [name for name in wanted if name not in known]
    size = st.st_size
    head: Optional[bytes] = None
    try:
        head, digests = read_digests(fd, size, missing, chunk=chunk, pace=pace)
        known.update((name, digest.hex()) for name, digest in digests.items())
    except OSError:
        for name in missing:
            known[name] = ""
        try:  # the head may still be readable when a later chunk is not
            head, _ = read_digests(fd, size, ())
        except OSError:
            head = None
    return FileFacts(
        exe_size=size,
        exe_hash=exe_hash(size, head) if head is not None else EXE_HASH_ERROR,
        md5_hash=known["md5"],
        sha256=known["sha256"] if sha256 else None,
        create_at=birth_time(fd),
        modify_at=max(st.st_mtime_ns // 1_000_000_000, 0),
    )
