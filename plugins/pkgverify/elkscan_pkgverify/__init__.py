"""elkscan's package verification: the ``pkgverify`` engine checks files that installed packages ship
against the digests their package manager (dpkg, rpm) recorded."""

from __future__ import annotations

from .dpkg import DpkgDatabase
from .index import Aliases, IndexBuilder, Package, PackageIndex
from .rpm import RpmDatabase

__all__ = ["Aliases", "DpkgDatabase", "IndexBuilder", "Package", "PackageIndex", "RpmDatabase"]
