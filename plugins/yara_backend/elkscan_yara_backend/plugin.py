"""Hook implementations of the yara_backend plugin (yara-python is imported only when a scan starts)."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import YaraEngine


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(YaraEngine)
