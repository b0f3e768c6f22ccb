"""Registers the ``clamav`` engine."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import ClamavEngine


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(ClamavEngine)
