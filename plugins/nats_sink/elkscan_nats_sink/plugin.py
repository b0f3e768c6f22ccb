"""Registers the ``nats`` sink and the ``nats`` source."""

from __future__ import annotations

from elkscan_core import hookimpl

from .sink import NatsSink
from .source import NatsSource


@hookimpl
def elkscan_register_sinks(registry) -> None:
    registry.add(NatsSink)


@hookimpl
def elkscan_register_sources(registry) -> None:
    registry.add(NatsSource)
