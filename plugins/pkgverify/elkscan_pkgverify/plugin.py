"""Hook implementations of the pkgverify plugin: the engine ``pkgverify``."""

from __future__ import annotations

from elkscan_core import hookimpl

from .engine import PkgVerifyEngine


@hookimpl
def elkscan_register_engines(registry) -> None:
    registry.add(PkgVerifyEngine)
