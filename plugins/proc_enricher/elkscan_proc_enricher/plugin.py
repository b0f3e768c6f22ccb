"""Hook implementations of the proc_enricher plugin: enricher ``process``."""

from __future__ import annotations

from elkscan_core import hookimpl

from .enricher import ProcessEnricher


@hookimpl
def elkscan_register_enrichers(registry) -> None:
    registry.add(ProcessEnricher)
