"""Registers the ``kafka`` sink and the ``kafka`` source."""

from __future__ import annotations

from elkscan_core import hookimpl

from .kafka import KafkaSink
from .source import KafkaSource


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(KafkaSink)


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(KafkaSource)
