"""What the engines judged, kept on the record so the sink can move exactly that file.

The ``quarantine`` enricher runs on the worker, on the open file the engines read: it records the
file's device, inode, size, timestamps and SHA-256 as the fact ``judged_file``. The sink runs later, on
its own thread, and reaches the file again by name; it acts only when what it finds there is this.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from attrs import asdict, frozen

from elkscan_core import Detection, Enricher, Subject

#: The fact the enricher sets and the sink reads.
FACT = "judged_file"
CHUNK = 1 << 20


@frozen
class Judged:
    """The identity of a judged file: where it lives (device, inode), what it was (size, mtime, SHA-256),
    when it last changed in any way (ctime, which no user can set), and its access time before the
    engines read it (what a restore gives back)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    sha256: str

    @classmethod
    def of(cls, fd: int, st: os.stat_result) -> Judged:
        digest = hashlib.sha256()
        offset = 0
        while True:
            chunk = os.pread(fd, CHUNK, offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns,
                   digest.hexdigest())

    @classmethod
    def from_facts(cls, facts: Mapping[str, Any]) -> Optional[Judged]:
        """The identity the enricher put on a record; None when it is missing or not what it wrote."""
        value = facts.get(FACT)
        if not isinstance(value, Mapping):
            return None
        ints = ("dev", "ino", "size", "mtime_ns", "ctime_ns", "atime_ns")
        if not all(type(value.get(k)) is int for k in ints) or not isinstance(value.get("sha256"), str):
            return None
        return cls(**{k: value[k] for k in (*ints, "sha256")})

    def as_fact(self) -> dict[str, Any]:
        return asdict(self)


class JudgedFileEnricher(Enricher):
    """Enricher ``quarantine``: the identity of each file with detections (needed by the sink)."""

    id = "quarantine"

    def enrich(self, subject: Subject, detections: Sequence[Detection]) -> Mapping[str, Any]:
        return {FACT: Judged.of(subject.fd, subject.stat).as_fact()}
