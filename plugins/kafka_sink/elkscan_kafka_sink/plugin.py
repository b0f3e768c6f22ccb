"""Registers the ``kafka`` sink."""

from __future__ import annotations

from elkscan_core import hookimpl

from .kafka import KafkaSink


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(KafkaSink)
