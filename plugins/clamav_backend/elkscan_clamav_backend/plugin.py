"""Registers the ``clamav`` engine, and builds the default rule bundle for ``elkscan db build --default``."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import ClamavEngine


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(ClamavEngine)


@hookimpl
def elkscan_default_bundle(output, password, version):
    from .defaults import build_default_bundle  # the bundle code is needed only here

    return build_default_bundle(output, password=password, version=version)
