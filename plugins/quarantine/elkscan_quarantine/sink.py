"""The ``quarantine`` sink: moves detected files into the vault, by policy.

A record is acted on only when it has detections and no failure of any component, when at least
``min_engines`` engines report a detection of one of ``classes``, and when the file last changed less
than ``max_age`` ago. The file moved is the one the engines judged (see ``fileops``), or none.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Optional

import attrs
from attrs import frozen

from elkscan_core import ComponentError, Duration, ElkscanError, Record, Sink
from elkscan_core.text import visible
from elkscan_core.trust import check_trusted

from .fileops import NotQuarantined, locate, open_judged, remove_if_same
from .judged import Judged
from .vault import Vault

log = logging.getLogger("elkscan")


@frozen
class QuarantineConfig:
    """Options of ``use: quarantine`` (see the plugin README)."""

    #: The vault directory; default ``quarantine`` in the state directory. Relative to the pipeline file.
    vault: str = ""
    #: Distinct engines that must report a detection (of ``classes``) before a file is moved.
    min_engines: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: Signature classes acted on (``Trojan``, ``TestFile``: a detection's ``class``); empty: any.
    classes: list[str] = attrs.field(factory=list)
    #: Only files whose content or metadata changed less than this long ago (none: any age).
    max_age: Optional[Duration] = None
    #: Say what would be quarantined, move nothing.
    dry_run: bool = False


class QuarantineSink(Sink):
    """Runs on the sink's writer thread; one file at a time, in record order."""

    id = "quarantine"
    Config = QuarantineConfig
    call_timeout = 120.0  # a file up to the scan's size limits is copied into the vault within one call

    def __init__(self, config: QuarantineConfig, session) -> None:
        super().__init__(config, session)
        self.vault_path = session.resolve_path(config.vault) if config.vault else os.path.join(
            session.state_dir, "quarantine")
        self.classes = {c.lower() for c in config.classes}
        self.vault: Optional[Vault] = None
        self.counts: collections.Counter[str] = collections.Counter()

    def check(self) -> None:
        """The vault as start() would take it (trusted and private), or where it would be created."""
        self._needs_enricher()
        try:
            if os.path.lexists(self.vault_path):
                Vault.open(self.vault_path).close()
            else:
                existing = os.path.dirname(self.vault_path)
                while not os.path.lexists(existing):
                    existing = os.path.dirname(existing)
                check_trusted(existing, "quarantine vault")
        except ElkscanError as exc:
            raise ComponentError(str(exc)) from None

    def start(self) -> None:
        if self.config.dry_run:
            self.check()
            return
        self._needs_enricher()
        try:
            self.vault = Vault.open(self.vault_path, create=True)
        except ElkscanError as exc:
            raise ComponentError(str(exc)) from None

    def _needs_enricher(self) -> None:
        if self.session.find("enricher", "quarantine") is None:
            raise ComponentError("needs the 'quarantine' enricher, which records which file the engines "
                                 "judged: add 'quarantine' to the pipeline's enrichers")

    def close(self) -> None:
        if self.vault is not None:
            self.vault.close()
            self.vault = None
        if self.counts:
            done = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
            log.warning("quarantine: %s; vault %s", done, self.vault_path)

    # -- policy --------------------------------------------------------------------------------

    def refusal(self, record: Record, judged: Optional[Judged]) -> str:
        """Why the policy leaves this record's file alone ('' to act on it)."""
        if record.target is None or not record.detections:
            return "no detection"
        if record.errors:
            return f"not all components judged it ({record.error})"
        if record.known_good:
            return f"engine {record.known_good} vouches for it (a package's own file)"
        if judged is None:
            return "the quarantine enricher did not record which file was judged"
        wanted = [d for d in record.detections if not self.classes or d.class_.lower() in self.classes]
        if not wanted:
            return f"no detection of classes {', '.join(self.config.classes)}"
        engines = {d.engine for d in wanted}
        if len(engines) < self.config.min_engines:
            return f"{len(engines)} engine(s) agree, min_engines is {self.config.min_engines}"
        if self.config.max_age is not None:
            age = time.time() - max(judged.mtime_ns, judged.ctime_ns) / 1e9
            if age > self.config.max_age:
                return f"last changed {age:.0f}s before, older than max_age"
        return ""

    # -- action --------------------------------------------------------------------------------

    def write(self, record: Record) -> None:
        if record.target is None or not record.detections:
            return
        judged = Judged.from_facts(record.facts)
        path = record.target.path
        refusal = self.refusal(record, judged)
        if refusal:
            log.info("quarantine: %s left alone: %s", visible(path), refusal)
            self.counts["left alone by policy"] += 1
            return
        try:
            self._move(record, judged, path)
        except NotQuarantined:
            self.counts["refused (not what was judged)"] += 1
            raise
        except OSError as exc:
            self.counts["failed"] += 1
            raise ElkscanError(f"{path}: cannot quarantine it: {exc.strerror or exc}") from None

    def _move(self, record: Record, judged: Judged, path: str) -> None:
        signatures = ", ".join(sorted({d.signature for d in record.detections}))
        with locate(path) as (dir_fd, name, real):
            fd, st = open_judged(dir_fd, name, path, judged)
            try:
                if self.vault is None:  # dry_run
                    log.warning("quarantine: would move %s (%s)", visible(path), signatures)
                    self.counts["would be quarantined (dry_run)"] += 1
                    return
                with self.vault.lock():
                    entry = self.vault.put(fd, st, judged, path=path, real_path=real, host=self.session.host,
                                           detections=record.detections, record_id=record.id)
                    try:
                        remove_if_same(dir_fd, name, path, st)
                    except BaseException:
                        self.vault.drop(entry.id)
                        raise
            finally:
                os.close(fd)
        if st.st_nlink > 1:
            log.warning("quarantine: %s had %d other hard link(s), which still hold its content",
                        visible(path), st.st_nlink - 1)
        log.warning("quarantine: moved %s to the vault as %s (%s)", visible(path), entry.id, signatures)
        self.counts["quarantined"] += 1
