"""The ``hashes`` enricher: Elkeid's file set (``exe_size``, ``exe_hash``, ``md5_hash``, ``create_at``,
``modify_at``, optionally ``sha256``) for every judged file, for every file judged afresh in a pass (what
a fleet host sends its verifier), or only for those with detections."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import attrs
from attrs import frozen

from elkscan_core import ComponentError, Detection, Duration, Enricher, Size, Subject

from .digests import DEFAULT_CHUNK, file_facts
from .engine import HashlistEngine, positive_size

WHEN = ("hits", "all", "new")
log = logging.getLogger("elkscan.hashes")


@frozen
class HashesConfig:
    """Options of ``use: hashes`` (see the plugin README)."""

    #: ``hits``: only files with detections (Elkeid's periodic scans); ``all``: every judged file, for
    #: hash verification on the backend; ``new``: every file judged afresh in this pass (the verdict
    #: cache answers the rest): a fleet host's steady state sends little.
    when: str = attrs.field(default="hits", validator=attrs.validators.in_(WHEN))
    #: Also report the SHA-256 of the whole file (field ``sha256``).
    sha256: bool = False
    #: Sleep this long after each chunk (Elkeid: 125ms per 512KiB); off by default.
    pace: Optional[Duration] = None
    chunk: Size = attrs.field(default=Size(DEFAULT_CHUNK), validator=positive_size)


class HashesEnricher(Enricher):
    """Computes the file facts from the open file the engines judged, in one read pass."""

    id = "hashes"
    Config = HashesConfig
    forks = True  # nothing of its own that a forked process could share (elkscan_core/shares.py)

    def __init__(self, config: HashesConfig, session) -> None:
        super().__init__(config, session)
        self.wants = config.when

    def start(self) -> None:
        if self.wants == "new" and not self.session.pipeline.limits.cache:
            log.warning("hashes: when: new without the verdict cache (limits: {cache: true}): every file is "
                        "new in every pass, and gets a record")
        try:
            import xxhash  # noqa: F401  (exe_hash is XXH64)
        except ImportError:
            raise ComponentError("the Python package 'xxhash' is missing (exe_hash is XXH64); "
                                 "install it with: pip install xxhash") from None

    def enrich(self, subject: Subject, detections: Sequence[Detection]) -> Mapping[str, Any]:
        known: dict[str, str] = {}
        for detection in detections:  # digests the hashlist engine already read from this same fd
            if detection.engine == HashlistEngine.id:
                known.update(detection.meta.get("digests", {}))
        facts = file_facts(subject.fd, subject.stat, sha256=self.config.sha256, known=known,
                           chunk=self.config.chunk, pace=self.config.pace or 0.0)
        return facts.as_fields()
