"""Hook implementations of the yarax_backend plugin (yara-x is imported only when a scan starts)."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import YaraXEngine


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(YaraXEngine)
