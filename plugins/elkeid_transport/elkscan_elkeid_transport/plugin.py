"""Registers the Elkeid transport: the ``elkeid`` task source (fd 3) and the ``elkeid`` sink (fd 4)."""

from __future__ import annotations

from elkscan_core import hookimpl

from .sink import ElkeidSink
from .tasks import ElkeidTasks


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(ElkeidTasks)


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(ElkeidSink)
