"""Hook implementations of the hash_extractor plugin: enricher ``hashes`` and engine ``hashlist``."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import HashlistEngine
from .enricher import HashesEnricher


@hookimpl
def elkscan_register_enrichers(registry) -> None:
    registry.add(HashesEnricher)


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(HashlistEngine)
