"""The ``process`` enricher: Elkeid's process set for targets that name a process (``procscan``,
fanotify events, Elkeid process scans); other targets get nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from attrs import frozen

from elkscan_core import Detection, Enricher, Subject

from .facts import process_facts

WHEN = ("hits", "all")


@frozen
class ProcessConfig:
    """``when``: ``hits`` (results with detections, Elkeid's rule) or ``all``; ``proc``: procfs mount."""

    when: str = attrs.field(default="hits", validator=attrs.validators.in_(WHEN))
    proc: str = "/proc"


class ProcessEnricher(Enricher):
    """Describes ``subject.target.pid`` from the host's view (pids as the ``proc`` mount numbers them)."""

    id = "process"
    Config = ProcessConfig

    def __init__(self, config: ProcessConfig, session) -> None:
        super().__init__(config, session)
        self.wants = config.when

    def enrich(self, subject: Subject, detections: Sequence[Detection]) -> Mapping[str, Any]:
        pid = subject.target.pid
        if pid is None:
            return {}
        return process_facts(pid, self.config.proc).as_fields()
