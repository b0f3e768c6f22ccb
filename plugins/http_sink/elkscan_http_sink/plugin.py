"""Registers the ``http`` sink."""

from __future__ import annotations

from elkscan_core import hookimpl

from .sink import HttpSink


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(HttpSink)
