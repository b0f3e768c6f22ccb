"""Hook implementations of the fanotify source plugin (``use: fanotify``)."""

from __future__ import annotations

from elkscan_core import hookimpl

from .source import FanotifySource


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(FanotifySource)
