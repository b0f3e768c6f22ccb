"""Hook implementations of the hash_extractor plugin: enricher ``hashes``, engine ``hashlist``, and the
compiled hash index of ``elkscan db hashes``."""

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


@hookimpl
def elkscan_compile_hashes(sources, output):
    from .compiled import compile_lists  # the writer is needed only here

    return compile_lists(sources, output)
