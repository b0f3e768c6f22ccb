"""Hook implementations of the quarantine plugin: sink ``quarantine`` and its enricher ``quarantine``."""

from __future__ import annotations

from elkscan_core import hookimpl

from .judged import JudgedFileEnricher
from .sink import QuarantineSink


@hookimpl
def elkscan_register_enrichers(registry) -> None:
    registry.add(JudgedFileEnricher)


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(QuarantineSink)
